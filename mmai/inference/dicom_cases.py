"""A DICOM root (+ optional clinical table) -> one case per study, series picked by the pipeline rule.

The join rule (docs/cli.md), explicit and reported:

- the table has a ``patient_id`` column: **by patient**. Each key is compared with the study's
  raw DICOM PatientID (in memory only) and with mmai's pseudonym of it (``p-`` + 16 hex digits,
  as ``mmai scan`` writes it, under the same secret); either matches, and the report counts which
  did. A table ``case_id`` column names the matched cases (``<case_id>-<study>`` when the patient
  has several studies).
- else the table has a ``case_id`` column: **by case_id**, against the case ids mmai gives the
  studies of the root (``<patient pseudonym>-<study pseudonym>``, as ``mmai preprocess ROOT`` writes).
- no table: every clinical value is missing.

An empty key, two rows for one key (or for one patient, raw and pseudonym) and a declared clinical
column the table lacks are table-level errors naming the rows/columns. A study without a table row
is kept, its clinical values missing (the model's missing modality); unmatched studies and table
rows are counted and listed in the :class:`JoinReport`. Studies where selection fails are returned
as errors naming the series, never dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mmai.config import PipelineConfig
from mmai.errors import ConfigError, ManifestError, SeriesSelectionError

log = logging.getLogger(__name__)

FIRST = 20  # unmatched studies / rows listed in the report
SERIES = "_series"  # in-memory column: the series label used in error rows (UID or folder under the root)


@dataclass
class JoinReport:
    """How the clinical table met the studies; written beside the predictions as JSON."""

    rule: str  # "none" | "patient_id" | "case_id"
    n_studies: int = 0
    n_table_rows: int = 0
    n_matched: int = 0
    matched_by: dict[str, int] = field(default_factory=dict)  # "raw PatientID" / "pseudonym" / "case_id"
    n_unmatched_studies: int = 0
    unmatched_studies: list[str] = field(default_factory=list)  # case ids (first FIRST)
    n_unmatched_rows: int = 0
    unmatched_rows: list[int] = field(default_factory=list)  # table rows, 1-based with the header as row 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if self.rule == "none":
            return f"no clinical table: {self.n_studies} studies predicted with clinical values missing"
        by = ", ".join(f"{n} by {k}" for k, n in self.matched_by.items() if n) or "none"
        return (f"clinical join by {self.rule}: {self.n_matched} of {self.n_studies} studies matched ({by}); "
                f"{self.n_unmatched_studies} studies without a row (clinical missing), "
                f"{self.n_unmatched_rows} of {self.n_table_rows} table rows unused")


def _series_label(stack: Any, root: Path) -> str:
    uid = str(stack.row.get("series_uid") or "")
    if uid:
        return f"series {uid}"
    folder = Path(str(stack.row.get("path") or ""))
    try:
        return f"folder {folder.relative_to(root)}"
    except ValueError:
        return "series (unknown UID)"


def select_cases(root: Path, config: PipelineConfig, *, workers: int = 1, progress: bool = True
                 ) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Scan ``root``; per study pick one series. Returns (cases, errors).

    ``cases`` has case_id, patient_id (pseudonym), _raw_patient_id (in memory only, never written),
    ``_series`` (the picked series' UID, for error rows) and the image column holding the selected
    stack's file list. Pseudonyms use the key in force (:func:`mmai.io.deid.pseudonym_key`).
    """
    from mmai.io.deid import pseudonym
    from mmai.io.dicom_scan import scan_stacks
    from mmai.io.dicom_select import SelectionRule, group_by_study, select_one

    if config.image is None:
        raise ConfigError(f"{config.source}: image: null; cannot read a DICOM root")
    root = Path(root)
    rule = SelectionRule.from_dict(config.image.select, f"{config.source}: image.select")
    stacks = [s for s in scan_stacks(root, workers=workers, progress=progress, include_phi=True)
              if s.row.get("kind", "image") == "image"]
    rows, errors = [], []
    for study, group in group_by_study(stacks).items():
        raw_pid = str(group[0].row.get("patient_id") or "").strip()
        pid = pseudonym(raw_pid) or pseudonym(study)
        case_id = f"{pid}-{pseudonym(study)[2:10]}"
        try:
            stack = select_one(group, rule, study_label=case_id)
        except SeriesSelectionError as exc:
            errors.append({"case_id": case_id, "stage": "select", "series": f"study of {len(group)} series",
                           "error": str(exc)})
            continue
        rows.append({"case_id": case_id, "patient_id": pid, "_raw_patient_id": raw_pid,
                     SERIES: _series_label(stack, root), config.image.column: [str(f) for f in stack.files]})
    if not rows and not errors:
        raise ManifestError(f"{root}: no DICOM image series found")
    cols = ["case_id", "patient_id", "_raw_patient_id", SERIES, config.image.column]
    return pd.DataFrame(rows, columns=cols), errors


def _keys(table: pd.DataFrame, column: str, source: str) -> list[str]:
    """The table's join keys as stripped text; empty keys and duplicates are errors naming the rows."""
    keys = [("" if v is None or (isinstance(v, float) and v != v) else str(v).strip()) for v in table[column]]
    empty = [i + 2 for i, k in enumerate(keys) if not k]
    if empty:
        raise ManifestError(f"{source}: empty {column} on row(s) {empty[:FIRST]} (header = row 1); "
                            f"every row needs a join key")
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise ManifestError(f"{source}: rows {seen[k] + 2} and {i + 2} have the same {column} "
                                f"(header = row 1); the join needs one row per key")
        seen[k] = i
    return keys


def _match(cases: pd.DataFrame, table: pd.DataFrame, source: str) -> tuple[list[int | None], JoinReport]:
    """Per case, the index of its table row (or None), by the join rule of the module docstring."""
    if "patient_id" in table.columns:
        keys = _keys(table, "patient_id", source)
        index = {k: i for i, k in enumerate(keys)}
        report = JoinReport(rule="patient_id", matched_by={"raw PatientID": 0, "pseudonym": 0})
        rows: list[int | None] = []
        for raw, pid in zip(cases["_raw_patient_id"], cases["patient_id"], strict=True):
            hits = {how: index[k] for how, k in (("raw PatientID", raw), ("pseudonym", pid)) if k and k in index}
            if len(set(hits.values())) > 1:
                a, b = sorted(hits.values())
                raise ManifestError(f"{source}: rows {a + 2} and {b + 2} are the same patient (one by raw "
                                    "PatientID, one by pseudonym); the join needs one row per patient")
            for how in hits:
                report.matched_by[how] += 1
                break
            rows.append(next(iter(hits.values()), None))
        return rows, report
    keys = _keys(table, "case_id", source)
    index = {k: i for i, k in enumerate(keys)}
    rows = [index.get(c) for c in cases["case_id"]]
    return rows, JoinReport(rule="case_id", matched_by={"case_id": sum(r is not None for r in rows)})


def _roi_columns(config: PipelineConfig) -> list[str]:
    """The lesion-box columns of an ``image.roi`` pipeline (mask path or centre), joined like the
    clinical ones so a DICOM root is predicted with its boxes (relative mask paths: the table's folder)."""
    roi = config.image.roi if config.image is not None else None
    if roi is None:
        return []
    return [roi.mask] if roi.mask is not None else list(roi.center or ())


def join_clinical(cases: pd.DataFrame, table: pd.DataFrame | None, config: PipelineConfig, *,
                  source: str = "clinical table") -> tuple[pd.DataFrame, JoinReport]:
    """Attach the clinical columns of ``table`` to the DICOM ``cases`` (see the module docstring).

    Returns:
        (cases with every declared clinical column, None where missing; the join report).

    Raises:
        ManifestError: no key column, an empty or duplicated key, a declared clinical column missing,
            or two cases given the same case_id by the table.
    """
    names = [c.name for c in config.clinical.columns] if config.clinical is not None else []
    out = cases.copy()
    if table is None:
        for name in names:
            out[name] = None
        return out, JoinReport(rule="none", n_studies=len(cases), n_unmatched_studies=len(cases),
                               unmatched_studies=list(cases["case_id"][:FIRST]))
    check_table(table, config, source)
    rows, report = _match(cases, table, source)
    for name in names + [c for c in _roi_columns(config) if c in table.columns and c not in names]:
        out[name] = [None if r is None else table[name].iloc[r] for r in rows]
    if report.rule == "patient_id" and "case_id" in table.columns:
        n_studies = pd.Series([r for r in rows if r is not None]).value_counts()
        out["case_id"] = [c if r is None else str(table["case_id"].iloc[r]).strip() if n_studies[r] == 1
                          else f"{str(table['case_id'].iloc[r]).strip()}-{c.rsplit('-', 1)[-1]}"
                          for c, r in zip(cases["case_id"], rows, strict=True)]
        dup = out["case_id"][out["case_id"].duplicated()]
        if len(dup):
            raise ManifestError(f"{source}: case_id {dup.iloc[0]!r} names two studies (its table row and an "
                                "unmatched study's mmai id); rename it")
    used = {r for r in rows if r is not None}
    report.n_studies, report.n_table_rows, report.n_matched = len(cases), len(table), len(used)
    unmatched = [c for c, r in zip(out["case_id"], rows, strict=True) if r is None]
    report.n_unmatched_studies, report.unmatched_studies = len(unmatched), unmatched[:FIRST]
    free = [i + 2 for i in range(len(table)) if i not in used]
    report.n_unmatched_rows, report.unmatched_rows = len(free), free[:FIRST]
    return out, report


def check_table(table: pd.DataFrame, config: PipelineConfig, source: str) -> str:
    """Table-level checks before any scan: the key column, its keys, the declared clinical columns.

    Returns:
        The join rule, ``patient_id`` or ``case_id``.
    """
    rule = "patient_id" if "patient_id" in table.columns else "case_id" if "case_id" in table.columns else ""
    if not rule:
        raise ManifestError(f"{source}: needs a patient_id column (raw DICOM PatientID or mmai's pseudonym) or "
                            f"a case_id column (mmai's case ids of the studies); columns are {list(table.columns)}")
    _keys(table, rule, source)
    names = [c.name for c in config.clinical.columns] if config.clinical is not None else []
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise ManifestError(f"{source}: clinical column(s) {missing} declared in the pipeline are not in the "
                            f"table; its columns are {list(table.columns)}")
    return rule


def cases_from_dicom_root(root: Path, clinical_path: Path | None, config: PipelineConfig, *, workers: int = 1,
                          progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Cases of a DICOM root (case_id, patient_id pseudonym, image file lists), for ``mmai preprocess``;
    with ``clinical_path`` the table's clinical columns are joined as in :func:`predict_cases`."""
    if clinical_path is not None:
        cases, errors, _ = predict_cases(root, clinical_path, config, workers=workers, progress=progress)
        return cases.drop(columns=[SERIES]), errors
    cases, errors = select_cases(root, config, workers=workers, progress=progress)
    return cases.drop(columns=["_raw_patient_id", SERIES]), errors


def predict_cases(root: Path, clinical_path: Path | None, config: PipelineConfig, *, workers: int = 1,
                  progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, str]], JoinReport]:
    """Cases of a DICOM root with the clinical table joined (:func:`join_clinical`) for ``mmai predict``.

    The table is read and checked (:func:`check_table`) before the scan, so a table-level problem
    fails at once. Returns (cases, errors, report); ``cases`` keeps the in-memory ``_series`` column
    (error rows name the series) and every declared clinical column; the raw PatientID is dropped.
    """
    table = None
    source = str(clinical_path)
    if clinical_path is not None:
        from mmai.io.manifest import read_table

        table = read_table(clinical_path, what="clinical table")
        check_table(table, config, source)
    cases, errors = select_cases(root, config, workers=workers, progress=progress)
    cases, report = join_clinical(cases, table, config, source=source)
    if table is None:
        log.warning("%s (clinical_present = 0); pass --clinical TABLE to use clinical values", report)
    else:
        log.info("%s", report)
    if report.n_unmatched_studies and table is not None:
        log.warning("%d of %d studies have no row in %s (clinical values missing, clinical_present = 0); "
                    "first: %s", report.n_unmatched_studies, report.n_studies, source,
                    ", ".join(report.unmatched_studies[:5]))
    return cases.drop(columns=["_raw_patient_id"]), errors, report
