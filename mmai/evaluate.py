"""`mmai evaluate`: join predictions to the manifest's targets and report metrics with CIs.

predictions.csv (docs/cli.md): ``case_id``, then ``prob_<class>`` columns (classification; class
names are the suffixes and match the manifest's label values as strings; binary: the positive
class is the second in sorted label order), or ``risk`` (survival, higher = earlier event), or
``prediction`` (regression), and ``model_id``. Each model is evaluated separately. Cases that
cannot be evaluated (not in the manifest, no target, no valid prediction) are counted and named
in the report, never dropped silently. See docs/evaluate.md for the report format.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.engine import metrics as M
from mmai.engine.metrics_report import compute_metrics
from mmai.errors import ManifestError, MmaiError
from mmai.inference.columns import task_of_columns
from mmai.io.manifest import SPLITS
from mmai.labels import label_text

log = logging.getLogger(__name__)

FIRST = 5  # case ids listed per problem
DEFAULT_MODEL = "model"
_HEADLINE = {
    "binary": ("auroc", "auprc", "brier", "ece", "balanced_accuracy"),
    "multiclass": ("auroc", "brier", "balanced_accuracy"),
    "regression": ("mae", "rmse", "r2"),
    "survival": ("c_index",),
}


def _blank(s: pd.Series) -> pd.Series:
    return s.isna() | (s.astype(str).str.strip() == "")


def _cases(ids: list[str]) -> dict[str, Any]:
    return {"count": len(ids), "case_ids": ids[:FIRST]}


def infer_task(columns: list[str], source: str = "predictions") -> tuple[str, list[str]]:
    """Task kind and class names from predictions columns (the one rule:
    :func:`mmai.inference.columns.task_of_columns`)."""
    return task_of_columns(columns, source)


def horizon_columns(columns: list[str], source: str) -> dict[str, float]:
    """``surv_<t>`` columns -> their horizon t (survival probabilities written by ``mmai predict``)."""
    out: dict[str, float] = {}
    for c in columns:
        if str(c).startswith("surv_"):
            try:
                out[c] = float(str(c)[len("surv_"):])
            except ValueError:
                raise ManifestError(f"{source}: column {c!r}: expected surv_<time>, e.g. surv_12") from None
    return out


def _ids(df: pd.DataFrame, source: str) -> pd.Series:
    if "case_id" not in df.columns:
        raise ManifestError(f"{source}: no case_id column (columns: {list(df.columns)})")
    ids = df["case_id"].astype(str).str.strip()
    if _blank(df["case_id"]).any():
        row = int(np.flatnonzero(_blank(df["case_id"]).to_numpy())[0])
        raise ManifestError(f"{source}: empty case_id in row {row + 2} (1-based, header = row 1)")
    return ids


def _numeric(df: pd.DataFrame, col: str, source: str) -> pd.Series:
    """Column as float; empty cells -> NaN; text that is not a number -> ManifestError naming it."""
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce").astype(float)
    bad = num.isna() & ~_blank(raw)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ManifestError(f"{source}: column {col!r}, case {df['case_id'].iloc[i]!r}: "
                            f"{raw.iloc[i]!r} is not a number")
    return num


def _targets(man: pd.DataFrame, kind: str, classes: list[str], target: str, time: str, event: str,
             source: str) -> pd.DataFrame:
    """Manifest -> frame indexed by case_id with y (or time, event), a ``has_target`` flag and the
    ``patient`` of each case (patient_id, or the case_id without one: the bootstrap unit)."""
    need = [time, event] if kind == "survival" else [target]
    missing = [c for c in need if c not in man.columns]
    if missing:
        raise ManifestError(f"{source}: no {' / '.join(repr(c) for c in missing)} column for a {kind} "
                            f"evaluation (columns: {list(man.columns)})")
    out = pd.DataFrame(index=man["case_id"])
    out["patient"] = (man["patient_id"].astype(str) if "patient_id" in man.columns else man["case_id"].astype(str)).to_numpy()
    if kind == "survival":
        out["time"] = _numeric(man, time, source).to_numpy()
        ev = _numeric(man, event, source)
        bad = ev.notna() & ~ev.isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ManifestError(f"{source}: column {event!r}, case {man['case_id'].iloc[i]!r}: "
                                f"{man[event].iloc[i]!r} is not 0 (censored) or 1 (event)")
        out["event"] = ev.to_numpy()
        out["has_target"] = out["time"].notna().to_numpy() & out["event"].notna().to_numpy()
    elif kind == "regression":
        out["y"] = _numeric(man, target, source).to_numpy()
        out["has_target"] = out["y"].notna().to_numpy()
    else:
        blank = _blank(man[target]).to_numpy()
        labels = [None if b else label_text(v) for v, b in zip(man[target], blank, strict=True)]
        for cid, lab in zip(man["case_id"], labels, strict=True):
            if lab is not None and lab not in classes:
                raise ManifestError(f"{source}: column {target!r}, case {cid!r}: label {lab!r} is not one of "
                                    f"the prediction classes {classes} (from the prob_<class> columns)")
        out["y"] = labels
        out["has_target"] = ~blank
    return out


def _prediction_arrays(df: pd.DataFrame, kind: str, classes: list[str], source: str) -> pd.DataFrame:
    """Predictions frame -> numeric prediction columns + ``valid`` (all finite) per row."""
    out = pd.DataFrame({"case_id": df["case_id"].to_numpy(), "model_id": df["model_id"].to_numpy()})
    if kind in ("binary", "multiclass"):
        cols = [f"prob_{c}" for c in classes]
        for c in cols:
            out[c] = _numeric(df, c, source).to_numpy()
        out["label_pred"] = df["prediction"].map(lambda v: None if pd.isna(v) else label_text(v)).to_numpy() \
            if "prediction" in df.columns else None
    else:
        col = "risk" if kind == "survival" else "prediction"
        cols = [col, *(horizon_columns(list(df.columns), source) if kind == "survival" else {})]
        for c in cols:
            out[c] = _numeric(df, c, source).to_numpy()
    values = out[cols].to_numpy(dtype=float)
    out["valid"] = np.isfinite(values).all(1)
    if kind in ("binary", "multiclass"):
        v = out["valid"].to_numpy()
        bad = v & ((values < 0) | (values > 1)).any(1)
        bad |= v & (np.abs(np.nan_to_num(values).sum(1) - 1) > 1e-3)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ManifestError(f"{source}: case {out['case_id'].iloc[i]!r}: probabilities {values[i].tolist()} "
                                f"in {cols} must lie in [0, 1] and sum to 1")
    return out


def select_split(man: pd.DataFrame, split: str | None, source: str) -> tuple[pd.DataFrame, str]:
    """The manifest rows to score and the split's name (the split rule of docs/evaluate.md).

    ``split`` None: the ``test`` rows when the manifest has a ``split`` column, else all rows;
    ``"all"``: every row; ``train`` / ``val`` / ``test``: those rows (the column must exist).
    """
    has = "split" in man.columns and not _blank(man["split"]).all()
    want = split if split is not None else ("test" if has else "all")
    if want == "all":
        return man, "all"
    if want not in SPLITS:
        raise ManifestError(f"--split {want!r} is not allowed; choose one of {[*SPLITS, 'all']}")
    if not has:
        raise ManifestError(f"{source}: --split {want} needs a split column; it has none (use --split all)")
    rows = man[man["split"].astype(str).str.strip() == want]
    if rows.empty:
        found = sorted(set(man["split"].dropna().astype(str).str.strip()))
        raise ManifestError(f"{source}: no rows with split = {want!r} (splits present: {found}); "
                            f"choose one with --split, or --split all")
    return rows, want


def _evaluate(pred: pd.DataFrame, manifest: pd.DataFrame, *, target: str, time: str, event: str, n_boot: int,
              seed: int, pred_source: str = "predictions", man_source: str = "manifest", split: str | None = None
              ) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """The report and, per model, the joined rows (for plots)."""
    pred = pred.copy()
    pred.columns = [str(c).strip() for c in pred.columns]
    kind, classes = infer_task(list(pred.columns), pred_source)
    pred["case_id"] = _ids(pred, pred_source)
    man = manifest.copy()
    man.columns = [str(c).strip() for c in man.columns]
    man["case_id"] = _ids(man, man_source)
    dup = man["case_id"][man["case_id"].duplicated()]
    if len(dup):
        raise ManifestError(f"{man_source}: case_id {dup.iloc[0]!r} appears more than once")
    n_rows = len(man)
    all_ids = set(man["case_id"])
    man, split_name = select_split(man, split, man_source)
    other_split = all_ids - set(man["case_id"])
    if "model_id" in pred.columns:
        pred["model_id"] = pred["model_id"].map(lambda v: DEFAULT_MODEL if pd.isna(v) or not str(v).strip()
                                                else str(v).strip())
    else:
        pred["model_id"] = DEFAULT_MODEL
    dup = pred[pred.duplicated(["model_id", "case_id"])]
    if len(dup):
        raise ManifestError(f"{pred_source}: case_id {dup['case_id'].iloc[0]!r} is predicted more than once "
                            f"by model {dup['model_id'].iloc[0]!r}")
    truth = _targets(man, kind, classes, target, time, event, man_source)
    by_patient = bool(truth["patient"].duplicated().any())  # the bootstrap unit of every CI below
    rows = _prediction_arrays(pred, kind, classes, pred_source)
    report: dict[str, Any] = {"kind": kind, "split": split_name, "n_manifest_rows": n_rows,
                              "n_split_rows": len(man), "n_boot": int(n_boot), "seed": int(seed),
                              "ci": f"{100 * (1 - 0.05):g}% percentile bootstrap over "
                                    + ("patients (a patient's cases drawn together)" if by_patient else "cases")}
    if kind == "survival":
        report.update(time=time, event=event)
    else:
        report["target"] = target
    if classes:
        report["classes"] = classes
        if kind == "binary":
            report["positive_class"] = classes[1]
    models: dict[str, Any] = {}
    joined_by_model: dict[str, pd.DataFrame] = {}
    man_ids = set(truth.index)
    for model in sorted(rows["model_id"].unique(), key=str):
        r = rows[rows["model_id"] == model]
        outside = r["case_id"].isin(other_split).to_numpy()
        r = r[~outside]
        known = r["case_id"].isin(man_ids).to_numpy()
        j = r[known].join(truth, on="case_id")
        no_target = ~j["has_target"].to_numpy(dtype=bool)
        bad_pred = ~j["valid"].to_numpy(dtype=bool) & ~no_target
        use = j[~no_target & ~bad_pred]
        entry: dict[str, Any] = {
            "n_predictions": int(len(r) + outside.sum()), "n_evaluated": int(len(use)),
            "outside_split": int(outside.sum()),
            "not_in_manifest": _cases(r["case_id"][~known].tolist()),
            "missing_target": _cases(j["case_id"][no_target].tolist()),
            "invalid_prediction": _cases(j["case_id"][bad_pred].tolist()),
            "not_predicted": _cases(sorted(man_ids - set(r["case_id"]), key=str)),
        }
        for what in ("not_in_manifest", "missing_target", "invalid_prediction"):
            if entry[what]["count"]:
                log.warning("model %s: %d case(s) %s, left out (first: %s)", model, entry[what]["count"],
                            what.replace("_", " "), ", ".join(entry[what]["case_ids"]))
        if len(use) == 0:
            entry["metrics"] = None
            entry["error"] = "no case has both a valid prediction and a target"
        else:
            entry["metrics"] = _metrics(use, kind, classes, n_boot, seed, by_patient)
            joined_by_model[model] = use
        models[model] = entry
    if not joined_by_model:
        raise ManifestError(
            f"{pred_source} and {man_source}: no case has both a valid prediction and a target in split "
            f"{split_name!r}{' (--split all scores every row)' if split_name != 'all' else ''} (first predicted ids: {rows['case_id'].head(FIRST).tolist()}; "
            f"first manifest ids: {man['case_id'].head(FIRST).tolist()})")
    report["models"] = models
    return report, joined_by_model


def _metrics(use: pd.DataFrame, kind: str, classes: list[str], n_boot: int, seed: int, by_patient: bool
             ) -> dict[str, Any]:
    """Metrics of the joined rows; with ``by_patient`` the bootstrap resamples patients."""
    groups = use["patient"].to_numpy() if by_patient else None
    if kind == "survival":
        out = compute_metrics(kind, time=use["time"].to_numpy(), event=use["event"].to_numpy(),
                              risk=use["risk"].to_numpy(), n_boot=n_boot, seed=seed, groups=groups)
        horizons = horizon_columns(list(use.columns), "predictions")
        if horizons:
            from mmai.engine.survival import horizon_metrics

            out["horizons"] = horizon_metrics(use["time"].to_numpy(), use["event"].to_numpy(),
                                              {t: use[c].to_numpy() for c, t in horizons.items()},
                                              n_boot=n_boot, seed=seed, groups=groups)
        return out
    if kind == "regression":
        return compute_metrics(kind, y=use["y"].to_numpy(), pred=use["prediction"].to_numpy(),
                               n_boot=n_boot, seed=seed, groups=groups)
    P = use[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    pred = None
    lp = use["label_pred"]
    if lp.notna().all() and lp.isin(classes).all():
        pred = lp.to_numpy()  # the model's own decisions (its threshold), when they are class labels
    out = compute_metrics(kind, y=use["y"].to_numpy(), prob=P[:, 1] if kind == "binary" else P,
                          pred=pred, classes=classes, n_boot=n_boot, seed=seed, groups=groups)
    out["decision"] = "prediction column" if pred is not None else (
        "prob >= 0.5" if kind == "binary" else "argmax of prob")
    return out


def evaluate_frame(pred: pd.DataFrame, manifest: pd.DataFrame, *, target: str = "label", time: str = "time",
                   event: str = "event", n_boot: int = 1000, seed: int = 0, split: str | None = None
                   ) -> dict[str, Any]:
    """Evaluate a predictions frame against a manifest frame (see the module docstring).

    Args:
        pred: predictions (case_id, prob_<class>... | risk | prediction, model_id).
        manifest: cases with targets (case_id, ``target`` or ``time`` + ``event``).
        target, time, event: manifest column names of the targets.
        n_boot: bootstrap resamples per metric (0: no CIs).
        seed: bootstrap seed.
        split: manifest rows to score: None (test rows when there is a split column, else all),
            "all", "train", "val" or "test" (:func:`select_split`).

    Returns:
        JSON-able report: {"kind", "split", "n_manifest_rows", "n_split_rows", "classes", "positive_class", "n_boot", "seed", "models":
        {model_id: {"n_predictions", "n_evaluated", "not_in_manifest", "missing_target",
        "invalid_prediction", "not_predicted" ({"count", "case_ids"}), "metrics"}}}.
    """
    return _evaluate(pred, manifest, target=target, time=time, event=event, n_boot=n_boot, seed=seed,
                     split=split)[0]


def _safe_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("._") or DEFAULT_MODEL


def _write_plots(report: dict[str, Any], joined: dict[str, pd.DataFrame], out_dir: Path,
                 time_unit: str | None = None) -> dict[str, str]:
    from mmai import plots

    kind, classes = report["kind"], report.get("classes", [])
    made: dict[str, str] = {}
    notes: list[str] = []

    def attempt(name: str, fn: Any, *args: Any, **kw: Any) -> None:
        try:
            made[name] = fn(*args, **kw).name
        except M.UndefinedMetricError as exc:
            notes.append(f"{name}: not drawn: {exc}")
            log.warning("plot %s not drawn: %s", name, exc)

    if kind in ("binary", "multiclass"):
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for model, j in joined.items():
            y = j["y"].to_numpy()
            shown = [classes[1]] if kind == "binary" else classes
            for c in shown:
                name = model if kind == "binary" else f"{model}: {c} vs rest"
                curves[name] = ((y == c).astype(float), j[f"prob_{c}"].to_numpy(dtype=float))
        sub = f" (positive class {classes[1]})" if kind == "binary" else " (one vs rest)"
        boot = {"n_boot": int(report.get("n_boot") or 0), "seed": int(report.get("seed") or 0)}
        attempt("roc", plots.plot_roc, curves, out_dir / "roc.png", title="ROC" + sub, **boot)
        attempt("pr", plots.plot_pr, curves, out_dir / "pr.png", title="Precision-recall" + sub, **boot)
        attempt("calibration", plots.plot_calibration, curves, out_dir / "calibration.png",
                title="Calibration" + sub, **boot)
    elif kind == "regression":
        curves = {m: (j["y"].to_numpy(), j["prediction"].to_numpy()) for m, j in joined.items()}
        attempt("pred_vs_true", plots.plot_pred_vs_true, curves, out_dir / "pred_vs_true.png")
    else:
        for model, j in joined.items():
            n_groups = min(3, len(j))
            attempt(f"km_{model}", plots.plot_km_by_risk, j["time"].to_numpy(), j["event"].to_numpy(),
                    j["risk"].to_numpy(), out_dir / f"km_{_safe_name(model)}.png", n_groups=n_groups,
                    title=f"{model}: Kaplan-Meier by predicted-risk tertile", time_unit=time_unit)
    if notes:
        report["plot_notes"] = notes
    return made


def evaluate_files(predictions_path: Path, manifest_path: Path, out_dir: Path | None = None, n_boot: int = 1000,
                   seed: int = 0, target: str = "label", time: str = "time", event: str = "event",
                   split: str | None = None, time_unit: str | None = None, explain_dir: Path | None = None,
                   viewer_cases: int = 4) -> dict[str, Any]:
    """Evaluate a predictions CSV against a manifest (CSV, Parquet or Decathlon JSON).

    With ``explain_dir`` (the folder of ``mmai predict --explain``), report.html gains a 3D viewer
    of up to ``viewer_cases`` explained cases (mmai.viewer.report); needs ``out_dir``.

    With ``out_dir``: writes ``report.json``, ``report.html`` (mmai.report) and the plots
    (classification: roc.png, pr.png, calibration.png; regression: pred_vs_true.png; survival:
    km_<model>.png, and calibration_t.png with ``surv_<t>`` columns), listed under "plots".
    ``time_unit`` (e.g. "months") labels the Kaplan-Meier time axis; the plots' bootstrap bands use
    ``n_boot`` and ``seed`` like the CIs.

    Returns:
        The report of :func:`evaluate_frame` plus "predictions", "manifest" (paths) and "plots".
    """
    from mmai.io.manifest import read_table

    if explain_dir is not None and out_dir is None:
        raise MmaiError("--explain puts a 3D viewer into report.html: it needs --out DIR")
    predictions_path, manifest_path = Path(predictions_path), Path(manifest_path)
    if not predictions_path.exists():
        raise ManifestError(f"predictions file not found: {predictions_path}")
    try:
        pred = pd.read_csv(predictions_path, dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{predictions_path}: cannot be read as a CSV table: {exc}") from exc
    manifest = read_table(manifest_path)
    report, joined = _evaluate(pred, manifest, target=target, time=time, event=event, n_boot=n_boot,
                               seed=seed, pred_source=str(predictions_path), man_source=str(manifest_path),
                               split=split)
    report = {"predictions": str(predictions_path), "manifest": str(manifest_path), **report}
    if out_dir is not None:
        from mmai.utils import atomic_write_text

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from mmai.report import plot_horizon_calibration, write_html

        report["plots"] = _write_plots(report, joined, out_dir, time_unit=time_unit)
        if report["kind"] == "survival" and plot_horizon_calibration(report["models"], out_dir / "calibration_t.png"):
            report["plots"]["calibration_t"] = "calibration_t.png"
        report["html"] = "report.html"
        viewer = None
        if explain_dir is not None:  # the 3D viewer section (docs/evaluate.md)
            from mmai.viewer.report import viewer_section

            viewer = viewer_section(report, joined, Path(explain_dir), viewer_cases)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
        write_html(report, out_dir, viewer=viewer)
        log.info("wrote %s, report.html and %d plot(s)", out_dir / "report.json", len(report["plots"]))
    return report


def _fmt(m: dict[str, Any], key: str) -> str:
    v, ci = m.get(key), m.get(f"{key}_ci")
    if v is None:
        return "undefined"
    if ci and None not in ci:
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{v:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """A readable table of the report (one row per model) plus notes on left-out cases."""
    kind = report["kind"]
    keys = _HEADLINE[kind]
    head = f"task: {kind}"
    if kind == "binary":
        head += f" (positive class {report['positive_class']!r})"
    elif kind == "multiclass":
        head += f" (classes {report['classes']}; AUROC = macro one-vs-rest)"
    ci = f"{report['ci']}, {report['n_boot']} resamples, seed {report['seed']}" if report["n_boot"] else "no CIs"
    lines = [head, f"split: {report.get('split', 'all')} ({report.get('n_split_rows', '?')} of "
                   f"{report.get('n_manifest_rows', '?')} manifest rows)", f"metric [95% CI]: {ci}"]
    table = [["model", "n", *[k.replace("balanced_accuracy", "bal_acc") for k in keys]]]
    notes: list[str] = []
    for model, e in report["models"].items():
        m = e.get("metrics") or {}
        table.append([model, str(e["n_evaluated"]), *[_fmt(m, k) if m else "-" for k in keys]])
        for what in ("not_in_manifest", "missing_target", "invalid_prediction"):
            c = e[what]
            if c["count"]:
                notes.append(f"{model}: {c['count']} case(s) {what.replace('_', ' ')}, left out "
                             f"(first: {', '.join(c['case_ids'])})")
        for name, why in (m.get("undefined") or {}).items():
            notes.append(f"{model}: {name} {why}")
        for name, k in (m.get("n_boot_skipped") or {}).items():
            notes.append(f"{model}: {name}: {k} of {report['n_boot']} resamples undefined, skipped")
        if e.get("error"):
            notes.append(f"{model}: {e['error']}")
        if e.get("outside_split"):
            notes.append(f"{model}: {e['outside_split']} predicted case(s) outside split {report.get('split')}, "
                         "not scored")
        for col, h in (m.get("horizons") or {}).items():
            notes.append(f"{model}: {col}: time-dependent AUROC {_fmt(h, 'auroc')}, calibration error "
                         f"{h['calibration']['error']:.3f} (predicted {h['calibration']['predicted_mean']:.3f} "
                         f"vs observed {h['calibration']['observed_all']:.3f})")
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    notes += report.get("plot_notes", [])
    if notes:
        lines += ["notes:"] + [f"  {n}" for n in notes]
    if report.get("plots"):
        lines.append("plots: " + ", ".join(report["plots"].values()))
    return "\n".join(lines)

