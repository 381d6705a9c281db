"""convert_tree / `mmai convert`: geometry equals the loader's, 4D phases, errors.csv, selection, no PHI."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.uid import generate_uid

from mmai.errors import ConfigError
from mmai.io.convert import convert_tree, output_stem
from mmai.io.dicom_series import load_series
from tests.io import dicom_cases as dc
from tests.io.test_dicom_scan import CORONAL, make_series

PHI = ("PID-12345", "Doe^Jane", "Doe", "Jane", "19700101")


def errors_of(out: Path) -> list[dict[str, str]]:
    with open(out / "errors.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def niftis(out: Path) -> list[Path]:
    return sorted(out.glob("*.nii.gz"))


def test_geometry_equals_loader_and_expected(tmp_path: Path) -> None:
    case = dc.series(tmp_path / "in" / "ax", series_description="AX 2.5")
    obl = dc.series(tmp_path / "in" / "obl", orientation=dc.OBLIQUE, series_number=2, seed=4)
    rep = convert_tree(tmp_path / "in", tmp_path / "out")
    assert len(rep.written) == 2 and not rep.errors
    for c in (case, obl):
        vol = load_series(c.files)
        match = [p for p in niftis(tmp_path / "out")
                 if np.allclose(nib.load(p).affine, vol.affine, atol=1e-4)]
        assert len(match) == 1
        img = nib.load(match[0])
        np.testing.assert_allclose(img.affine, c.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array)
        np.testing.assert_allclose(np.asarray(img.dataobj), c.volume)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        side = json.loads(match[0].with_name(match[0].name.replace(".nii.gz", ".json")).read_text())
        assert side["shape"] == list(c.volume.shape)
        np.testing.assert_allclose(side["affine_ras"], c.affine, atol=1e-5)
        assert side["Modality"] == "CT" and side["PatientKey"].startswith("p-")
    assert errors_of(tmp_path / "out") == []
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def _two_phase_tree(root: Path) -> None:
    series, study = generate_uid(), generate_uid()
    for v in (1, 2):
        make_series(root, k=6, series_uid=series, study_uid=study, prefix=f"P{v}_",
                    extra={"TemporalPositionIdentifier": v}, series_description="DYN")


def test_phases_as_4d_or_split(tmp_path: Path) -> None:
    _two_phase_tree(tmp_path / "in")
    rep = convert_tree(tmp_path / "in", tmp_path / "out4d")
    assert rep.n_4d == 1 and len(rep.written) == 1
    img = nib.load(niftis(tmp_path / "out4d")[0])
    assert img.shape == (8, 8, 6, 2)
    side = json.loads(next((tmp_path / "out4d").glob("*.json")).read_text())
    assert [p["phase_index"] for p in side["phases"]] == [1, 2]
    rep = convert_tree(tmp_path / "in", tmp_path / "split", split_phases=True)
    assert rep.n_4d == 0 and len(rep.written) == 2
    names = [p.name for p in niftis(tmp_path / "split")]
    assert any(n.endswith("_p1.nii.gz") for n in names) and any(n.endswith("_p2.nii.gz") for n in names)
    assert all(nib.load(p).shape == (8, 8, 6) for p in niftis(tmp_path / "split"))


def test_enhanced_multiframe_phases_4d(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    cases = dc.enhanced(tmp_path / "in" / "mf.dcm", n_temporal=2)
    rep = convert_tree(tmp_path / "in", tmp_path / "out")
    assert rep.n_4d == 1, rep.errors
    img = nib.load(niftis(tmp_path / "out")[0])
    np.testing.assert_allclose(img.affine, cases[0].affine, atol=1e-4)
    data = np.asarray(img.dataobj)
    np.testing.assert_allclose(data[..., 0], cases[0].volume)
    np.testing.assert_allclose(data[..., 1], cases[1].volume)


def test_bad_series_goes_to_errors_csv_others_convert(tmp_path: Path) -> None:
    make_series(tmp_path / "in" / "good", k=5, series_number=1)
    bad = make_series(tmp_path / "in" / "bad", k=5, series_number=2, size=(16, 16))
    data = bad[2].read_bytes()
    bad[2].write_bytes(data[: len(data) - 100])  # pixel data cut short
    make_series(tmp_path / "in" / "loc", k=1, series_number=3, orientation=CORONAL,
                extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    (tmp_path / "in" / "README.txt").write_text("hello")
    rep = convert_tree(tmp_path / "in", tmp_path / "out")
    assert len(rep.written) == 1 and rep.skipped == {"localizer": 1} and rep.n_non_dicom == 1
    rows = errors_of(tmp_path / "out")
    assert len(rows) == 1 and rows[0]["stage"] == "load" and rows[0]["series"].startswith("s002_")
    assert rows[0]["error"]
    assert "1 NIfTI written" in str(rep) and "1 failed" in str(rep)


def test_selection_rule_from_yaml_narrows(tmp_path: Path) -> None:
    make_series(tmp_path / "in" / "a", k=6, series_number=1, series_description="Chest 1mm")
    make_series(tmp_path / "in" / "b", k=6, series_number=2, series_description="Head")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("task: {kind: binary}\nimage:\n  select: {description: chest, min_slices: 4}\n")
    rep = convert_tree(tmp_path / "in", tmp_path / "out", config_path=cfg)
    assert len(rep.written) == 1 and rep.skipped == {"not selected": 1}
    assert "Chest_1mm" in rep.written[0]
    cfg.write_text("image:\n  select: {descriptoin: chest}\n")
    with pytest.raises(ConfigError, match="descriptoin.*p.yaml|p.yaml.*descriptoin"):
        convert_tree(tmp_path / "in", tmp_path / "out2", config_path=cfg)


def test_no_phi_in_outputs_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_series(tmp_path / "in" / "s", k=4, series_description="ok")
    bad = make_series(tmp_path / "in" / "t", k=4, series_number=2, size=(16, 16))
    bad[1].write_bytes(bad[1].read_bytes()[:-50])
    caplog.set_level(logging.DEBUG)
    convert_tree(tmp_path / "in", tmp_path / "out")
    text = caplog.text
    for p in (tmp_path / "out").iterdir():
        text += p.name
        if p.suffix in (".json", ".csv"):
            text += p.read_text()
    for phi in PHI:
        assert phi not in text, phi


def test_output_stem_is_sanitized() -> None:
    stem = output_stem({"series_number": 7, "series_description": "Thorax/1.0 B31f  (Doe?)", "study_uid": "1",
                        "series_uid": "2"}, phase=None)
    assert stem.startswith("s007_Thorax_1.0_B31f_Doe_") and "/" not in stem and "?" not in stem


def test_cli_convert_and_scan(tmp_path: Path) -> None:
    from mmai.cli import main

    make_series(tmp_path / "in" / "s", k=4)
    assert main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "-q"]) == 0
    assert len(niftis(tmp_path / "out")) == 1
    assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "i.csv"), "-q"]) == 0
    assert "PID-12345" not in (tmp_path / "i.csv").read_text()
    assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "j.csv"), "-q", "--include-phi"]) == 0
    assert "PID-12345" in (tmp_path / "j.csv").read_text()


def test_workers_two_same_outputs(tmp_path: Path) -> None:
    make_series(tmp_path / "in" / "a", k=4, series_number=1)
    make_series(tmp_path / "in" / "b", k=5, series_number=2)
    r1 = convert_tree(tmp_path / "in", tmp_path / "o1")
    r2 = convert_tree(tmp_path / "in", tmp_path / "o2", workers=2)
    assert sorted(r1.written) == sorted(r2.written) and len(r1.written) == 2
    for name in r1.written:
        np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "o1" / name).dataobj),
                                      np.asarray(nib.load(tmp_path / "o2" / name).dataobj))


def test_two_stacks_of_one_multiframe_file_get_two_names(tmp_path: Path) -> None:
    from tests.io.test_dicom_scan import AXIAL, write_enhanced

    (tmp_path / "in").mkdir()
    # two StackIDs, same orientation, different positions: two stacks in one file
    write_enhanced(tmp_path / "in" / "mf.dcm", n_per_stack=3, orientations=[AXIAL, AXIAL])
    rep = convert_tree(tmp_path / "in", tmp_path / "out")
    assert len(set(rep.written)) == len(rep.written) == 2, (rep.written, rep.errors)
