"""The evaluation report's 3D viewer: explained cases chosen from the scored rows.

``mmai evaluate --explain DIR`` (DIR: the folder ``mmai predict --explain DIR`` wrote) puts a
"3D viewer" section into report.html: a few scored cases with their scan and saliency map in
three planes, chosen so that the reader sees both sides of the model:

- classification: alternately the case the model got most confidently right (highest predicted
  probability of the true class) and the one it got most wrong (lowest);
- regression: alternately the smallest and the largest absolute error;
- survival: alternately the highest and the lowest predicted risk.

Only cases whose explanation set names the evaluated model (``<stem>_explain.json``'s model_id;
any model when the predictions have no model_id column) and holds a ``_viewer.html`` page can
be chosen. Each case's facts are its truth and its prediction, as the report scored them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.errors import MmaiError

log = logging.getLogger(__name__)

DEFAULT_CASES = 4


def _explained(explain_dir: Path, case_ids: list[str], model: str, any_model: bool) -> dict[str, Path]:
    """case_id -> its viewer page, for the cases of ``case_ids`` explained by ``model``."""
    from mmai.inference.explain import case_files

    out: dict[str, Path] = {}
    for cid in case_ids:
        files = case_files(explain_dir, cid)
        try:
            info = json.loads(files["explain"].read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if info.get("case_id") != cid or (not any_model and info.get("model_id") != model):
            continue
        if files["viewer"].name in info.get("files", []) and files["viewer"].exists():
            out[cid] = files["viewer"]
    return out


def _order(j: pd.DataFrame, kind: str, classes: list[str]) -> tuple[list[str], list[str], str, str]:
    """(best-first ids, worst-first ids, what "best" means, what "worst" means) of the scored rows."""
    ids = j["case_id"].astype(str).to_numpy()
    if kind in ("binary", "multiclass"):
        p_true = np.array([float(j[f"prob_{y}"].iloc[i]) for i, y in enumerate(j["y"].to_numpy())])
        key, best, worst = p_true, "most confidently right", "most wrong"
    elif kind == "regression":
        key = -np.abs(j["prediction"].to_numpy(dtype=float) - j["y"].to_numpy(dtype=float))
        best, worst = "smallest error", "largest error"
    else:
        key, best, worst = j["risk"].to_numpy(dtype=float), "highest risk", "lowest risk"
    order = np.lexsort((ids, -key))  # descending key, ties by case id
    return [str(ids[i]) for i in order], [str(ids[i]) for i in order[::-1]], best, worst


def _facts(row: pd.Series, kind: str, classes: list[str], model: str, why: str) -> list[tuple[str, str]]:
    facts = [("case", str(row["case_id"])), ("model", model), ("shown as", why)]
    if kind == "survival":
        facts += [("time", f"{float(row['time']):g}"), ("event", str(int(row["event"]))),
                  ("predicted risk (log)", f"{float(row['risk']):.3f}")]
        facts += [(c, f"{float(row[c]):.3f}") for c in row.index if str(c).startswith("surv_")]
    elif kind == "regression":
        facts += [("true value", f"{float(row['y']):.3f}"), ("prediction", f"{float(row['prediction']):.3f}")]
    else:
        facts += [("true class", str(row["y"]))] + [(f"P({c})", f"{float(row[f'prob_{c}']):.3f}") for c in classes]
    return facts


def choose_cases(report: dict[str, Any], joined: dict[str, pd.DataFrame], explain_dir: Path, n_cases: int
                 ) -> tuple[str, dict[str, Path], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """(model, case_id -> page, case_id -> facts, case_id -> selector label) of the report's viewer.

    The first model (in report order) with explained cases is shown.
    """
    kind, classes = report["kind"], report.get("classes", [])
    any_model = set(joined) == {"model"}  # predictions without a model_id column
    for model, j in joined.items():
        pages = _explained(explain_dir, j["case_id"].astype(str).tolist(), model, any_model)
        if not pages:
            continue
        j = j[j["case_id"].astype(str).isin(pages)]
        best, worst, best_txt, worst_txt = _order(j, kind, classes)
        chosen: dict[str, str] = {}
        for a, b in zip(best, worst, strict=True):
            for cid, why in ((a, best_txt), (b, worst_txt)):
                if len(chosen) < n_cases and cid not in chosen:
                    chosen[cid] = why
        rows = j.set_index(j["case_id"].astype(str))
        facts = {cid: _facts(rows.loc[cid], kind, classes, model, why) for cid, why in chosen.items()}
        labels = {cid: f"{cid} ({why})" for cid, why in chosen.items()}
        return model, {cid: pages[cid] for cid in chosen}, facts, labels
    return "", {}, {}, {}


def viewer_section(report: dict[str, Any], joined: dict[str, pd.DataFrame], explain_dir: Path,
                   n_cases: int = DEFAULT_CASES) -> str | None:
    """The report's "3D viewer" HTML section; records what it shows in ``report["viewer"]``.

    Returns:
        The HTML fragment, or None (with a note in ``report["viewer"]``) when no scored case has an
        explanation page in ``explain_dir``.

    Raises:
        MmaiError: ``explain_dir`` is not a folder, or ``n_cases`` < 1.
    """
    from mmai.viewer import report_cases
    from mmai.viewer.page import viewer_block

    explain_dir = Path(explain_dir)
    if not explain_dir.is_dir():
        raise MmaiError(f"--explain {explain_dir}: not a folder (give the folder of mmai predict --explain)")
    if n_cases < 1:
        raise MmaiError(f"--viewer-cases must be >= 1, got {n_cases}")
    model, pages, facts, labels = choose_cases(report, joined, explain_dir, n_cases)
    cases = report_cases(pages, facts, labels) if pages else []
    if not cases:
        note = (f"no scored case has an explanation page (<case>_viewer.html) in {explain_dir}; "
                "run mmai predict --explain DIR with this model")
        report["viewer"] = {"explain": str(explain_dir), "cases": [], "note": note}
        log.warning("3D viewer left out of the report: %s", note)
        return None
    report["viewer"] = {"explain": str(explain_dir), "model": model,
                        "cases": [c["facts"][0][1] for c in cases]}
    note = ("Cases chosen alternately from each end of the scored cases that have an explanation "
            f"in {explain_dir} (model {model}); see docs/evaluate.md.")
    return viewer_block(cases, note=note)
