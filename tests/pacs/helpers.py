"""Upload and read-back helpers of the PACS tests (the real Orthanc of ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pydicom

from mmai.pacs.dicomweb import DicomWebSource
from mmai.pacs.dimse import DimseSource
from mmai.pacs.retry import RetryPolicy
from mmai.pacs.sr import read_sr_values
from tests.pacs.orthanc import Orthanc

POLICY = RetryPolicy(attempts=2, base_s=0.1, timeout_s=30)


def case_dirs(cohort: Path) -> list[Path]:
    return sorted(d for d in (cohort / "images").iterdir() if d.is_dir())


def upload(server: Orthanc, dirs: list[Path], how: str) -> int:
    """Send each study folder by STOW-RS (``how="stow"``) or C-STORE (``"cstore"``); the instance count."""
    peer = DicomWebSource(server.dicomweb, POLICY) if how == "stow" else DimseSource(server.dimse, "MMAITEST", POLICY)
    n = 0
    for d in dirs:
        datasets = [pydicom.dcmread(f) for f in sorted(d.glob("*.dcm"))]
        peer.store(datasets)
        n += len(datasets)
    return n


def result_srs(server: Orthanc) -> list[pydicom.Dataset]:
    """Every SR instance on the server, read back by WADO-RS."""
    web = DicomWebSource(server.dicomweb, POLICY)
    found = web.client.search_for_instances(search_filters={"Modality": "SR"})
    out = []
    for item in found:
        ds = pydicom.Dataset.from_json(item)
        out.append(web.client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def sr_table(srs: list[pydicom.Dataset]) -> pd.DataFrame:
    """One row per SR: its study UID and the values it holds."""
    return pd.DataFrame([{"study_uid": str(ds.StudyInstanceUID), **read_sr_values(ds)} for ds in srs])


def study_of_case(cohort: Path) -> dict[str, str]:
    """case_id (the cohort's folder name) -> StudyInstanceUID."""
    return {d.name: str(pydicom.dcmread(next(d.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
            for d in case_dirs(cohort)}
