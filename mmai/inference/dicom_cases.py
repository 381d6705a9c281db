"""A DICOM root (+ optional clinical table) -> one case per study, series picked by the pipeline rule.

Cases are named without PHI: ``case_id`` comes from the clinical table when it has one for
the patient (matched on its ``patient_id`` column against the DICOM PatientID, in memory
only), else it is ``<patient pseudonym>-<study pseudonym>``. Studies where selection fails
are returned as errors (with the candidate list), never dropped silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mmai.config import PipelineConfig
from mmai.errors import ConfigError, ManifestError, SeriesSelectionError

log = logging.getLogger(__name__)


def select_cases(root: Path, config: PipelineConfig, *, workers: int = 1, progress: bool = True
                 ) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Scan ``root``; per study pick one series. Returns (cases, errors).

    ``cases`` has case_id, patient_id (pseudonym), _raw_patient_id (in memory only, never written)
    and the image column holding the selected stack's file list.
    """
    from mmai.io.deid import pseudonym
    from mmai.io.dicom_scan import scan_stacks
    from mmai.io.dicom_select import SelectionRule, group_by_study, select_one

    if config.image is None:
        raise ConfigError(f"{config.source}: image: null; cannot read a DICOM root")
    rule = SelectionRule.from_dict(config.image.select, f"{config.source}: image.select")
    stacks = [s for s in scan_stacks(Path(root), workers=workers, progress=progress, include_phi=True)
              if s.row.get("kind", "image") == "image"]
    rows, errors = [], []
    for study, group in group_by_study(stacks).items():
        raw_pid = str(group[0].row.get("patient_id") or "")
        pid = pseudonym(raw_pid) or pseudonym(study)
        case_id = f"{pid}-{pseudonym(study)[2:10]}"
        try:
            stack = select_one(group, rule, study_label=case_id)
        except SeriesSelectionError as exc:
            errors.append({"case_id": case_id, "stage": "select", "error": str(exc)})
            continue
        rows.append({"case_id": case_id, "patient_id": pid, "_raw_patient_id": raw_pid,
                     config.image.column: [str(f) for f in stack.files]})
    if not rows and not errors:
        raise ManifestError(f"{root}: no DICOM image series found")
    return pd.DataFrame(rows, columns=["case_id", "patient_id", "_raw_patient_id", config.image.column]), errors


def cases_from_dicom_root(root: Path, clinical_path: Path | None, config: PipelineConfig, *, workers: int = 1,
                          progress: bool = True) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Cases of a DICOM root, joined to a clinical table by patient when one is given."""
    cases, errors = select_cases(root, config, workers=workers, progress=progress)
    if clinical_path is not None:
        from mmai.io.manifest import read_table

        table = read_table(clinical_path)
        if "patient_id" not in table.columns:
            raise ManifestError(f"{clinical_path}: needs a patient_id column (matched to the DICOM PatientID)")
        table = table.copy()
        table["_raw_patient_id"] = table["patient_id"].astype(str).str.strip()
        table = table.drop(columns=["patient_id"])
        if "case_id" in table.columns:
            table = table.rename(columns={"case_id": "_table_case_id"})
        merged = cases.merge(table, on="_raw_patient_id", how="left", indicator=True)
        for cid in merged.loc[merged["_merge"] == "left_only", "case_id"]:
            log.warning("case %s: no row for its patient in %s; clinical values missing", cid, clinical_path)
        if "_table_case_id" in merged.columns:
            has = merged["_table_case_id"].notna()
            merged.loc[has, "case_id"] = merged.loc[has, "_table_case_id"].astype(str)
            merged = merged.drop(columns=["_table_case_id"])
        cases = merged.drop(columns=["_merge"])
    return cases.drop(columns=["_raw_patient_id"]), errors
