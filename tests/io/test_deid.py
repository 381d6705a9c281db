"""De-identification: the allow-list, pseudonyms, and no PHI in index CSVs, sidecars or logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from mmai.io.deid import PHI_KEYWORDS, SAFE_KEYWORDS, is_safe_keyword, pseudonym, safe_meta
from mmai.io.dicom_scan import scan_tree
from tests.io.test_dicom_scan import make_series


def phi_dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC999"
    ds.InstitutionName = "St Elsewhere"
    ds.InstitutionAddress = "1 Main St"
    ds.ReferringPhysicianName = "House^Greg"
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.KVP = "120"
    ds.SliceThickness = "1.25"
    ds.ConvolutionKernel = "B31f"
    ds.ManufacturerModelName = "Scanner 9000"
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    item = Dataset()
    item.PatientName = "Nested^Name"
    item.Radiopharmaceutical = "FDG"
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    return ds


def test_safe_meta_keeps_acquisition_drops_phi() -> None:
    meta = safe_meta(phi_dataset())
    assert meta["KVP"] == 120.0 and meta["SliceThickness"] == 1.25
    assert meta["ConvolutionKernel"] == "B31f" and meta["ManufacturerModelName"] == "Scanner 9000"
    assert meta["PixelSpacing"] == [0.7, 0.7] and meta["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    text = json.dumps(meta)
    for phi in ("Doe", "PID-12345", "19700101", "ACC999", "Elsewhere", "Main St", "House", "20240102", "Nested"):
        assert phi not in text, phi
    assert not set(meta) & set(PHI_KEYWORDS)


def test_safe_meta_include_phi_is_explicit() -> None:
    meta = safe_meta(phi_dataset(), include_phi=True)
    assert meta["PatientID"] == "PID-12345" and meta["PatientName"] == "Doe^Jane"


def test_allow_list_and_phi_list_are_disjoint() -> None:
    assert not set(SAFE_KEYWORDS) & set(PHI_KEYWORDS)
    assert is_safe_keyword("KVP") and not is_safe_keyword("PatientName") and not is_safe_keyword("Unheard")


def test_pseudonym_stable_salted_and_nonreversible() -> None:
    a = pseudonym("PID-12345")
    assert a == pseudonym("PID-12345") and a.startswith("p-") and len(a) == 18
    assert "12345" not in a
    assert pseudonym("PID-12345", salt="secret") != a
    assert pseudonym("PID-12346") != a
    assert pseudonym("") == ""


def test_index_csv_and_logs_carry_no_phi(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_series(tmp_path / "s", k=3, patient_id="PID-12345", patient_name="Doe^Jane")
    caplog.set_level(logging.DEBUG)
    df = scan_tree(tmp_path, progress=False)
    df.to_csv(tmp_path / "index.csv", index=False)
    text = (tmp_path / "index.csv").read_text() + caplog.text
    for phi in ("PID-12345", "Doe", "Jane", "19700101"):
        assert phi not in text
    assert df.patient_id.iloc[0] == pseudonym("PID-12345")
