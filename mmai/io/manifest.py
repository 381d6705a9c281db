"""Manifests: read (CSV, Parquet, Decathlon-style JSON) and validate against a pipeline config.

Contract (docs/manifest.md): one row per case; ``case_id`` required and unique;
``patient_id`` optional (defaults to case_id); ``image`` a NIfTI file or DICOM folder, relative
to the manifest's folder, empty = missing; clinical columns typed by the pipeline's
``clinical:`` section; targets ``label`` or ``time`` + ``event``; optional ``split``/``fold``.

Validation collects every problem (up to :data:`MAX_REPORTED`) and raises one
:class:`ManifestError` whose lines name the row, the case, the column and the bad value.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmai.config import PipelineConfig
from mmai.errors import ManifestError
from mmai.labels import label_text

log = logging.getLogger(__name__)

MAX_REPORTED = 10
SPLITS = ("train", "val", "test")


def read_table(path: str | Path, what: str = "manifest") -> pd.DataFrame:
    """Read a CSV/TSV, Parquet or Decathlon-style JSON table; cells as text, empty cells NaN/None.

    Args:
        path: the table.
        what: how messages name the table ("manifest", "clinical table" ...).

    Raises:
        ManifestError: the file is missing, empty, unreadable or of an unsupported type.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{what} not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=True)
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path).astype(object)
            df = df.where(df.notna(), None)
        elif suffix == ".json":
            df = _read_decathlon(path)
        else:
            raise ManifestError(f"{path}: unsupported table type {suffix!r}; use .csv, .tsv, .parquet or .json")
    except pd.errors.EmptyDataError as exc:
        raise ManifestError(f"{path}: the table is empty (no header row)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, json.JSONDecodeError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise ManifestError(f"{path}: cannot read the table: {first}") from exc
    if df.empty:
        raise ManifestError(f"{path}: the table has a header but no rows")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _read_decathlon(path: Path) -> pd.DataFrame:
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return pd.DataFrame(data).astype(object)
    rows = []
    for split_name, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        for i, item in enumerate(data.get(split_name, []) or []):
            row = {"image": item} if isinstance(item, str) else dict(item)
            row.setdefault("case_id", Path(str(row.get("image", f"{split}{i}"))).name.split(".")[0])
            row.setdefault("split", split)
            rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: JSON manifest has no 'training', 'validation' or 'test' list of cases")
    return pd.DataFrame(rows).astype(object)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


class _Problems:
    """Collects row-level problems and raises them as one ManifestError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, row: int, case_id: Any, column: str, message: str) -> None:
        self.items.append(f"row {row + 2} (case_id={case_id}), column '{column}': {message}")

    def raise_if_any(self, cls: type[ManifestError] = ManifestError) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise cls(f"{self.source}: {len(self.items)} problem(s):\n  " + "\n  ".join(shown) + tail)


def load_manifest(path: str | Path, config: PipelineConfig, *, require_targets: bool = True,
                  check_files: bool = True, check_clinical: bool = True) -> pd.DataFrame:
    """Read and validate a manifest; see :func:`validate_manifest`."""
    path = Path(path)
    return validate_manifest(read_table(path), config, base_dir=path.parent, source=str(path),
                             require_targets=require_targets, check_files=check_files,
                             check_clinical=check_clinical)


def validate_manifest(df: pd.DataFrame, config: PipelineConfig, *, base_dir: Path, source: str,
                      require_targets: bool = True, check_files: bool = True,
                      check_clinical: bool = True) -> pd.DataFrame:
    """Validate a manifest table and return a normalised copy.

    The copy has ``case_id`` and ``patient_id`` as strings, the image column as absolute path
    strings (None where missing), targets as numbers, and the clinical columns untouched
    (the clinical preprocessor parses them). Batch inference turns ``check_files`` and
    ``check_clinical`` off and reports bad cases one by one instead of failing the batch.

    Raises:
        ManifestError: listing each problem with its row, case_id and column.
        ClinicalError: when a clinical value violates the schema.
    """
    problems = _Problems(source)
    if "case_id" not in df.columns:
        raise ManifestError(f"{source}: required column 'case_id' is missing; columns are {list(df.columns)}")
    out = df.copy()
    out["case_id"] = out["case_id"].astype(object)
    for i, cid in enumerate(out["case_id"]):
        if _blank(cid):
            problems.add(i, "", "case_id", "empty case_id")
    ids = out["case_id"].astype(str).str.strip()
    for cid in ids[ids.duplicated(keep="first")].unique():
        rows = [int(r) + 2 for r in np.flatnonzero((ids == cid).to_numpy())]
        problems.items.append(f"column 'case_id': duplicate case_id {cid!r} on rows {rows}")
    problems.raise_if_any()
    out["case_id"] = ids
    if "patient_id" in out.columns:
        pid = out["patient_id"].astype(object)
        out["patient_id"] = [c if _blank(p) else str(p).strip() for p, c in zip(pid, out["case_id"], strict=True)]
    else:
        out["patient_id"] = out["case_id"]

    if config.image is not None:
        _check_images(out, config.image.column, base_dir, check_files, problems)
    if require_targets:
        _check_targets(out, config, problems)
    if "split" in out.columns:
        for i, (cid, s) in enumerate(zip(out["case_id"], out["split"], strict=True)):
            if not _blank(s) and str(s).strip() not in SPLITS:
                problems.add(i, cid, "split", f"{s!r} is not one of {list(SPLITS)}")
        out["split"] = [None if _blank(s) else str(s).strip() for s in out["split"]]
    problems.raise_if_any()
    if config.clinical is not None:
        missing = [c.name for c in config.clinical.columns if c.name not in out.columns]
        if missing:
            raise ManifestError(f"{source}: clinical column(s) {missing} declared in the pipeline are not in the "
                                f"manifest; its columns are {list(out.columns)}")
        if check_clinical:
            config.clinical.validate(out, source=source, id_column="case_id")  # raises ClinicalError
    return out.reset_index(drop=True)


def _check_images(out: pd.DataFrame, column: str, base_dir: Path, check_files: bool, problems: _Problems) -> None:
    if column not in out.columns:
        raise ManifestError(f"{problems.source}: image column '{column}' is missing (set image.column in the "
                            f"pipeline YAML, or image: null for a clinical-only pipeline); columns are "
                            f"{list(out.columns)}")
    resolved: list[str | None] = []
    for i, (cid, value) in enumerate(zip(out["case_id"], out[column], strict=True)):
        if _blank(value):
            resolved.append(None)
            continue
        p = Path(str(value).strip()).expanduser()
        p = p if p.is_absolute() else (base_dir / p)
        if check_files and not p.exists():
            problems.add(i, cid, column, f"file not found: {p}")
        resolved.append(str(p.resolve()) if p.exists() else str(p))
    out[column] = resolved


def _check_targets(out: pd.DataFrame, config: PipelineConfig, problems: _Problems) -> None:
    task = config.task
    if task.kind == "survival":
        for col in (task.time, task.event):
            if col not in out.columns:
                raise ManifestError(f"{problems.source}: survival target column '{col}' is missing; columns are "
                                    f"{list(out.columns)}")
        times, events = [], []
        for i, (cid, t, e) in enumerate(zip(out["case_id"], out[task.time], out[task.event], strict=True)):
            tv = _number(t)
            if tv is None or tv <= 0:
                problems.add(i, cid, task.time, f"follow-up time must be a positive number, got {t!r}")
            ev = _number(e)
            if ev not in (0.0, 1.0):
                problems.add(i, cid, task.event, f"event must be 0 (censored) or 1 (event), got {e!r}")
            times.append(tv)
            events.append(ev)
        out[task.time], out[task.event] = times, events
        return
    if task.target not in out.columns:
        raise ManifestError(f"{problems.source}: target column '{task.target}' is missing; columns are "
                            f"{list(out.columns)}")
    values: list[str | float | None] = []
    for i, (cid, v) in enumerate(zip(out["case_id"], out[task.target], strict=True)):
        if _blank(v):
            problems.add(i, cid, task.target, "label missing (every training case needs a target)")
            values.append(None)
            continue
        if task.kind == "regression":
            num = _number(v)
            if num is None:
                problems.add(i, cid, task.target, f"not a number: {v!r}")
            values.append(num)
        else:
            values.append(label_text(v))
    out[task.target] = values


def _number(v: Any) -> float | None:
    if _blank(v):
        return None
    try:
        x = float(str(v).strip())
    except ValueError:
        return None
    return x if np.isfinite(x) else None
