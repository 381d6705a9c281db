"""Which studies: ``--query KEY=VALUE`` filters and ``--studies FILE`` lists, and the study records
a search returns (:class:`StudyRef`; the raw PatientID stays in memory, never written)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmai.errors import ConfigError, ManifestError

QUERY_KEYS = ("StudyDate", "ModalitiesInStudy", "AccessionNumber", "PatientID", "StudyInstanceUID")
_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
STUDY_COLUMNS = {"studyinstanceuid": "StudyInstanceUID", "study_uid": "StudyInstanceUID",
                 "accessionnumber": "AccessionNumber", "accession_number": "AccessionNumber",
                 "accession": "AccessionNumber"}


@dataclass(frozen=True)
class StudyRef:
    """One study found on the PACS. ``patient_id`` is the raw PatientID (memory only)."""

    study_uid: str
    patient_id: str = ""
    accession: str = ""
    study_date: str = ""
    modalities: str = ""

    @classmethod
    def from_dataset(cls, ds: Any) -> StudyRef:
        """From a pydicom Dataset of a C-FIND / QIDO-RS study match."""
        from pydicom.multival import MultiValue

        mods = ds.get("ModalitiesInStudy", "")
        mods = "\\".join(str(m) for m in mods) if isinstance(mods, MultiValue | list) else str(mods or "")
        return cls(study_uid=str(ds.get("StudyInstanceUID", "") or "").strip(),
                   patient_id=str(ds.get("PatientID", "") or "").strip(),
                   accession=str(ds.get("AccessionNumber", "") or "").strip(),
                   study_date=str(ds.get("StudyDate", "") or "").strip(), modalities=mods)


def parse_query(items: list[str] | None) -> dict[str, str]:
    """``["StudyDate=20240101-20240131", "ModalitiesInStudy=CT"]`` -> DICOM matching keys.

    Raises:
        ConfigError: not ``KEY=VALUE``, a key outside :data:`QUERY_KEYS`, a key given twice, or a
            StudyDate that is not ``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``YYYYMMDD-`` or ``-YYYYMMDD``.
    """
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ConfigError(f"--query {item!r}: must look like KEY=VALUE, e.g. StudyDate=20240101-20240131")
        if key not in QUERY_KEYS:
            raise ConfigError(f"--query {item!r}: key {key!r} is not allowed; choose one of {list(QUERY_KEYS)}")
        if key in out:
            raise ConfigError(f"--query {key} given twice ({out[key]!r} and {value!r}); give each key once")
        if key == "StudyDate" and (not _DATE.match(value) or value == "-"):
            raise ConfigError(f"--query StudyDate={value!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or "
                              "-YYYYMMDD")
        out[key] = value
    return out


def read_study_list(path: Path) -> list[tuple[str, str]]:
    """``--studies FILE``: a CSV with a StudyInstanceUID (or study_uid) column or an AccessionNumber (or
    accession_number) column. Returns (DICOM key, value) pairs in file order, duplicates dropped.

    Raises:
        ManifestError: no such column (the message lists the allowed names), or an empty value (row named).
    """
    from mmai.io.manifest import read_table

    table = read_table(Path(path), what="study list")
    cols = [(c, STUDY_COLUMNS[c.strip().lower()]) for c in table.columns if c.strip().lower() in STUDY_COLUMNS]
    if not cols:
        raise ManifestError(f"{path}: needs a StudyInstanceUID (or study_uid) or AccessionNumber (or "
                            f"accession_number) column; columns are {list(table.columns)}")
    col, key = cols[0]
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, v in enumerate(table[col]):
        text = "" if v is None or (isinstance(v, float) and v != v) else str(v).strip()
        if not text:
            raise ManifestError(f"{path}: empty {col} on row {i + 2} (header = row 1)")
        if text not in seen:
            seen.add(text)
            out.append((key, text))
    return out
