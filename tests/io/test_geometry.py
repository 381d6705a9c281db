"""Every geometry case against its own DICOM headers (tests/io/geometry_check.py), with the defaults.

Exact cases (uniform stacks, also tilted ones: sheared affine) must reproduce every sampled
pixel within 1 HU; resampled ones (missing slice, 2.5 then 5 mm, GE-like 1.4% jitter, tilt
corrected) within 8 HU with >= 95% of the pixels inside the volume. Both the loader's volume
and the NIfTI written by ``mmai convert`` are checked. Then scan and loader must give the same
verdict on the same stacks, and the YAML key / CLI flag must reach the loader.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mmai.config import DicomConfig
from mmai.errors import DicomError
from mmai.io.convert import convert_tree
from mmai.io.dicom_geometry import GEOMETRY_PROBLEMS
from mmai.io.dicom_scan import scan_tree
from mmai.io.dicom_series import load_series
from mmai.io.reader import mmai_load_imaged
from tests.io import dicom_cases as dc
from tests.io.geometry_check import assert_geometry, check_geometry

EXACT = {
    "regular": lambda d: dc.series(d),
    "reversed": dc.reversed_instances,
    "feet_first": dc.feet_first,
    "sagittal": lambda d: dc.series(d, orientation=dc.SAGITTAL),
    "coronal": lambda d: dc.series(d, orientation=dc.CORONAL),
    "oblique": lambda d: dc.series(d, orientation=dc.OBLIQUE),
    "tilt": lambda d: dc.tilted_series(d, tilt_deg=15.0),
    "ge_no_jitter": lambda d: dc.ge_jitter_series(d, jitter=False),
}
RESAMPLED = {
    "missing_slice": lambda d: dc.missing_slice(d, drop=7, smooth=True),
    "2.5_then_5mm": dc.two_step_series,
    "ge_jitter_1.4pct": dc.ge_jitter_series,
}


def _converted(folder: Path, out: Path, **kwargs) -> tuple[np.ndarray, np.ndarray, dict]:
    rep = convert_tree(folder, out, **kwargs)
    assert len(rep.written) == 1, (rep.written, rep.errors)
    path = out / rep.written[0]
    img = nib.load(path)
    side = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
    return np.asarray(img.dataobj), img.affine, side


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_cases_place_every_pixel_where_its_header_says(tmp_path: Path, name: str) -> None:
    case = EXACT[name](tmp_path / "s")
    vol = load_series(case.files)
    assert vol.meta["geometry"] == "regular" and not vol.meta["resampled"]
    assert_geometry(vol.array, vol.affine, case.files, atol=1.0, min_inside=1.0)
    array, affine, side = _converted(tmp_path / "s", tmp_path / "out")
    assert_geometry(array, affine, case.files, atol=1.0, min_inside=1.0)
    assert side["geometry"] == "regular" and side["resampled"] is False and "slice_positions_mm" not in side


@pytest.mark.parametrize("name", sorted(RESAMPLED))
def test_non_uniform_cases_are_resampled_by_default(tmp_path: Path, name: str) -> None:
    case = RESAMPLED[name](tmp_path / "s")
    vol = load_series(case.files)
    assert vol.meta["geometry"] == "resampled" and vol.meta["resampled"]
    assert_geometry(vol.array, vol.affine, case.files, atol=8.0)
    array, affine, side = _converted(tmp_path / "s", tmp_path / "out")
    assert_geometry(array, affine, case.files, atol=8.0)
    assert side["geometry"] == "resampled" and side["resampled"] is True
    assert side["geometry_policy"]["uneven"] == "resample"
    steps = np.diff(side["slice_positions_mm"])
    assert side["original_slices"]["step_min_mm"] == pytest.approx(steps.min(), abs=1e-3)
    assert side["original_slices"]["step_max_mm"] == pytest.approx(steps.max(), abs=1e-3)


def test_ge_jitter_end_to_end_step_not_median(tmp_path: Path) -> None:
    """The GE-like series: resampled onto 20 slices of the end-to-end mean step, first and last
    slice kept; the median step (the old affine) would misplace the last slice by > 0.1 mm."""
    case = dc.ge_jitter_series(tmp_path / "s")
    z = case.notes["z"]
    vol = load_series(case.files)
    assert vol.array.shape[2] == 20
    assert vol.meta["spacing"][2] == pytest.approx((z[-1] - z[0]) / 19, abs=1e-4)
    assert abs(np.median(np.diff(z)) * 19 - (z[-1] - z[0])) > 0.1
    first_last = np.linalg.inv(vol.affine) @ np.array([[-dc.ORIGIN[0], -dc.ORIGIN[1], dc.ORIGIN[2] + zk, 1.0]
                                                       for zk in (z[0], z[-1])]).T
    np.testing.assert_allclose(first_last[2], [0, 19], atol=1e-3)


def test_tilt_corrected_within_8(tmp_path: Path) -> None:
    case = dc.tilted_series(tmp_path / "s", tilt_deg=15.0, smooth=True)
    vol = load_series(case.files, tilt="resample")
    assert vol.meta["geometry"] == "resampled"
    np.testing.assert_allclose(vol.affine[:3, :3], np.diag([-0.8, -0.9, 2.5]), atol=1e-6)  # orthogonal
    assert_geometry(vol.array, vol.affine, case.files, atol=8.0, margin=1)
    assert check_geometry(vol.array, vol.affine, case.files).inside == 1.0  # edges too


def test_keep_is_flagged_and_records_every_position(tmp_path: Path) -> None:
    """uneven='keep': raw slices, affine from slice 0 with the end-to-end step, flagged irregular,
    the header positions listed; the helper sees the misplacement the flag warns about."""
    case = dc.missing_slice(tmp_path / "s", drop=7, smooth=True)
    vol = load_series(case.files, uneven="keep")
    assert vol.array.shape[2] == 19 and vol.meta["geometry"] == "irregular"
    expected = [2.5 * k for k in range(20) if k != 7]
    np.testing.assert_allclose(vol.meta["slice_positions_mm"], expected, atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 3], dc.expected_affine()[:3, 3], atol=1e-6)  # slice 0
    assert vol.affine[2, 2] == pytest.approx(47.5 / 18)
    assert check_geometry(vol.array, vol.affine, case.files).max_err > 8.0
    _, _, side = _converted(tmp_path / "s", tmp_path / "out", uneven="keep")
    assert side["geometry"] == "irregular" and side["resampled"] is False
    np.testing.assert_allclose(side["slice_positions_mm"], expected, atol=1e-4)
    assert any("image.dicom.uneven: keep" in w for w in side["warnings"])


def test_error_names_series_and_steps(tmp_path: Path) -> None:
    case = dc.two_step_series(tmp_path / "s")
    with pytest.raises(DicomError, match=r"IM00001\.dcm \+31 files\): missing slices: 32 slices, steps "
                                         r"2\.500-5\.000 mm.*image\.dicom\.uneven: error"):
        load_series(case.files, uneven="error")
    rep = convert_tree(tmp_path / "s", tmp_path / "out", uneven="error")
    assert not rep.written
    with open(tmp_path / "out" / "errors.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["stage"] == "load" and "steps 2.500-5.000 mm" in row["error"]


def test_helper_catches_a_wrong_affine(tmp_path: Path) -> None:
    """The check itself can fail: half a millimetre along the slices, or the LPS/RAS flip."""
    case = dc.series(tmp_path / "s", smooth=True)
    vol = load_series(case.files)
    shifted = vol.affine.copy()
    shifted[2, 3] += 0.5
    assert check_geometry(vol.array, shifted, case.files).max_err > 8.0
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    assert check_geometry(vol.array, lps, case.files).inside < 0.95


VERDICT_CASES = {
    "ge_jitter_1.4pct": dc.ge_jitter_series,
    "ge_no_jitter": lambda d: dc.ge_jitter_series(d, jitter=False),
    "missing_slice": lambda d: dc.missing_slice(d, drop=7),
    "missing_and_uneven": lambda d: dc.uneven_series(d, gaps=(2.5,) * 8 + (5.0, 3.3) + (2.5,) * 9),
    "2.5_then_5mm": dc.two_step_series,
    "tilt_15deg": dc.tilted_series,
    "tilt_0.05deg": lambda d: dc.tilted_series(d, tilt_deg=0.05),
    "regular": lambda d: dc.series(d),
}


@pytest.mark.parametrize("name", sorted(VERDICT_CASES))
def test_scan_and_loader_agree(tmp_path: Path, name: str) -> None:
    """The same stack: every geometry problem scan reports is one the loader warns about, and
    every geometry warning of the loader is a problem scan reports."""
    case = VERDICT_CASES[name](tmp_path / "s")
    (row,) = scan_tree(tmp_path / "s").itertuples()
    scan_problems = [p for p in row.problems.split(";") if p in GEOMETRY_PROBLEMS]
    vol = load_series(case.files)
    assert vol.meta["problems"] == scan_problems
    geometry_warnings = [w for w in vol.warnings if w.split(":")[0].split(" and ")[0] in GEOMETRY_PROBLEMS]
    assert len(geometry_warnings) == len(vol.warnings)
    named = {p for w in geometry_warnings for p in w.split(":")[0].split(" and ")}
    assert named == set(scan_problems)
    if name == "ge_jitter_1.4pct":
        assert scan_problems == ["uneven spacing"] and row.tilt_deg == pytest.approx(0.022, abs=2e-3)
    if name in ("ge_no_jitter", "regular", "tilt_0.05deg"):
        assert scan_problems == [] and vol.warnings == []


def test_yaml_policy_reaches_the_monai_loader(tmp_path: Path) -> None:
    """image.dicom (DicomConfig) passed as mmai_load_imaged(dicom=...) decides what happens."""
    dc.missing_slice(tmp_path / "s", drop=7)
    data = {"image": str(tmp_path / "s")}
    with pytest.raises(DicomError, match="image.dicom.uneven: error"):
        mmai_load_imaged("image", dicom=DicomConfig(uneven="error"))(data)
    kept = mmai_load_imaged("image", dicom=DicomConfig(uneven="keep"))(data)["image"]
    assert kept.shape[-1] == 19 and kept.meta["geometry"] == "irregular"
    assert json.loads(kept.meta["slice_positions_mm"])[7] == pytest.approx(20.0)
    default = mmai_load_imaged("image")(data)["image"]
    assert default.shape[-1] == 20 and default.meta["geometry"] == "resampled"
    assert default.meta["problems"] == "missing slices"


def test_cli_convert_uneven_flag(tmp_path: Path) -> None:
    from mmai.cli import main

    dc.missing_slice(tmp_path / "in" / "s", drop=7)
    assert main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--uneven", "keep", "-q"]) == 0
    (side,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert side["geometry"] == "irregular" and side["geometry_policy"]["uneven"] == "keep"
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--uneven", "warn"])


def test_convert_reads_the_yaml_policy(tmp_path: Path) -> None:
    dc.missing_slice(tmp_path / "in" / "s", drop=7)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("image:\n  dicom: {uneven: keep}\n")
    _, _, side = _converted(tmp_path / "in", tmp_path / "out", config_path=cfg)
    assert side["geometry"] == "irregular"
    _, _, side = _converted(tmp_path / "in", tmp_path / "out2", config_path=cfg, uneven="resample")
    assert side["geometry"] == "resampled"  # the flag wins over the YAML


def test_cli_scan_reads_the_yaml_tolerances(tmp_path: Path) -> None:
    """`mmai scan --config` judges stacks with the pipeline's image.dicom tolerances, as the loader
    of that pipeline does: the GE-like 1.4% jitter is 'uneven spacing' by default and nothing
    under a 5% spacing tolerance."""
    from mmai.cli import main

    dc.ge_jitter_series(tmp_path / "in" / "s")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("image:\n  dicom: {spacing_tolerance: 0.05}\n")
    assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "a.csv"), "-q"]) == 0
    assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "b.csv"), "-q", "--config", str(cfg)]) == 0
    (a,), (b,) = (list(csv.DictReader((tmp_path / n).open())) for n in ("a.csv", "b.csv"))
    assert "uneven spacing" in a["problems"]
    assert "uneven spacing" not in b["problems"]


def test_keep_with_tilt_resample_says_the_pixels_were_resampled(tmp_path: Path) -> None:
    """uneven: keep + tilt: resample interpolates in-plane: the metadata must not say resampled: false."""
    case = dc.tilted_series(tmp_path / "s", tilt_deg=15.0)
    files = sorted(case.files)
    del files[7]  # a gap: the stack is kept raw (irregular), the tilt is still undone in-plane
    vol = load_series(files, policy=DicomConfig(uneven="keep", tilt="resample"))
    assert vol.meta["geometry"] == "irregular" and vol.meta["resampled"] is True
