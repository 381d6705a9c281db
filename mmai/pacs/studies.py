"""The studies of a PACS run: search (``--query`` / ``--studies``), mmai's case ids, and the clinical
join done ONCE on the search results, with the rule and case ids of ``--dicom-root``
(:mod:`mmai.inference.dicom_cases`), so a study gets the same case_id and clinical values either way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mmai.config import PipelineConfig
from mmai.errors import MmaiError
from mmai.inference.dicom_cases import SERIES, JoinReport, check_table, join_clinical
from mmai.pacs.query import StudyRef, read_study_list
from mmai.pacs.retry import PacsError

log = logging.getLogger(__name__)
STUDY = "_study_uid"  # in-memory column: the study's UID


@dataclass
class Selection:
    """Found studies (``refs`` by UID) and the studies asked for that the PACS does not have (errors)."""

    refs: list[StudyRef]
    errors: list[dict[str, str]]


def find_studies(source: Any, query: dict[str, str], studies_file: Path | None) -> Selection:
    """Search the PACS. With ``studies_file`` each listed UID / accession number is one search (AND the
    ``query`` filters); a listed entry with no match is an error row, the others go on.

    Raises:
        PacsError: neither filters nor a list (mmai does not pull a whole PACS), or the search failed.
    """
    if not query and studies_file is None:
        raise PacsError("give --query KEY=VALUE filters or --studies FILE: mmai does not fetch a whole PACS")
    refs: list[StudyRef] = []
    errors: list[dict[str, str]] = []
    if studies_file is None:
        refs = source.find(query)
    else:
        for key, value in read_study_list(studies_file):
            hits = source.find({**query, key: value})
            if not hits:
                errors.append({"case_id": value, "stage": "search", "series": "",
                               "error": f"{key} {value} not found on {source}"
                                        + (f" with {query}" if query else "")})
            refs += hits
    unique: dict[str, StudyRef] = {}
    for r in refs:
        if r.study_uid:
            unique.setdefault(r.study_uid, r)
    log.info("%s: %d stud(ies) found", source, len(unique))
    return Selection(list(unique.values()), errors)


def case_id_of(ref: StudyRef) -> tuple[str, str]:
    """(case_id, patient pseudonym) exactly as :func:`mmai.inference.dicom_cases.select_cases` names it."""
    from mmai.io.deid import pseudonym

    pid = pseudonym(ref.patient_id) or pseudonym(ref.study_uid)
    return f"{pid}-{pseudonym(ref.study_uid)[2:10]}", pid


def study_cases(refs: list[StudyRef], clinical_path: Path | None, config: PipelineConfig, *,
                announce: bool = True) -> tuple[pd.DataFrame, JoinReport]:
    """One row per study: case_id, patient_id (pseudonym), the study UID, the clinical columns joined.

    Raises:
        MmaiError: the image section is missing, or a table-level problem of the clinical table.
    """
    if config.image is None:
        raise MmaiError(f"{config.source}: image: null; a PACS study is read through the image section")
    rows = []
    for ref in refs:
        case_id, pid = case_id_of(ref)
        rows.append({"case_id": case_id, "patient_id": pid, "_raw_patient_id": ref.patient_id, SERIES: "",
                     config.image.column: None, STUDY: ref.study_uid})
    cases = pd.DataFrame(rows, columns=["case_id", "patient_id", "_raw_patient_id", SERIES, config.image.column,
                                        STUDY])
    table = None
    source = str(clinical_path)
    if clinical_path is not None:
        from mmai.io.manifest import read_table

        table = read_table(clinical_path, what="clinical table")
        check_table(table, config, source)
    joined, report = join_clinical(cases, table, config, source=source)
    if table is None and announce:
        log.warning("%s (clinical_present = 0); pass --clinical TABLE to use clinical values", report)
    elif table is not None:
        log.info("%s", report)
    return joined.drop(columns=["_raw_patient_id"]), report


def pick_series(study_dir: Path, config: PipelineConfig) -> tuple[list[str], str, list[dict[str, str]]]:
    """The study folder's selected series: (files, series label, selection errors); the folder rule of
    :func:`mmai.inference.dicom_cases.select_cases`, unchanged."""
    from mmai.inference.dicom_cases import select_cases

    if not study_dir.is_dir() or not any(study_dir.iterdir()):
        raise PacsError("the PACS returned no instance for this study")
    cases, errors = select_cases(study_dir, config, progress=False)
    if errors or cases.empty:
        return [], "", errors
    if len(cases) > 1:
        raise PacsError(f"the retrieved files hold {len(cases)} studies, expected one")
    column = config.image.column if config.image is not None else "image"
    return list(cases[column].iloc[0]), str(cases[SERIES].iloc[0]), []
