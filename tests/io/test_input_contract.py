"""The input-quality contract (issue 15), from the failing cases: a truncated DICOM file inside a
series, NaN voxels, a 4D NIfTI, a single slice (2D DICOM, 64x64x1 NIfTI), an MR NIfTI through a
CT pipeline and a CT through an MR pipeline. Real pixels (pydicom's CT_small / MR_small, nibabel's
anatomical.nii). Every repaired case carries ``input_flags``; every refused one is an error row
naming the case and the reason."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmai.config import ImageConfig, IntensityConfig
from mmai.errors import PreprocessError
from mmai.io.input_flags import format_flags, merge_flags, parse_flags
from mmai.io.modality_guess import guess_modality
from mmai.io.reader import load_volume
from mmai.preprocess import run_preprocess
from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms
from tests.data.real_pixels import ct_hu_slice, ct_series, mr_brain_nifti

CT_AFFINE = np.diag([0.661468, 0.661468, 5.0, 1.0])


def _ct_volume(k: int = 20) -> np.ndarray:
    return np.repeat(ct_hu_slice()[:, :, None], k, axis=2)  # (128, 128, k) HU, with air/lung


def _save(path: Path, arr: np.ndarray, affine: np.ndarray = CT_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(path))
    return path


def _truncate(path: Path, frac: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * frac)])


def test_flags_string_form_round_trips():
    text = format_flags({"nonfinite_voxels": 72000, "interpolated_slices": 1, "dropped_files": 1})
    assert text == "dropped_files=1;interpolated_slices=1;nonfinite_voxels=72000"
    assert parse_flags(text) == {"dropped_files": "1", "interpolated_slices": "1", "nonfinite_voxels": "72000"}
    assert format_flags({}) == "" and parse_flags("") == {} and parse_flags(float("nan")) == {}
    assert merge_flags("a=1", {"b": 2}, "") == "a=1;b=2"


@pytest.mark.parametrize("cut", [0.6, 0.02])  # pixel data cut short; header cut (no SeriesInstanceUID left)
def test_truncated_file_inside_a_series_is_dropped_and_flagged(tmp_path, cut, caplog):
    folder = ct_series(tmp_path / "s", k=20)
    _truncate(folder / "IM00005.dcm", cut)
    vol = load_volume(folder)
    assert vol.array.shape == (128, 128, 20)  # the gap interpolated on the uniform grid
    flags = vol.meta["input_flags"]
    assert flags["dropped_files"] == 1 and flags["dropped_file_names"] == "IM00005.dcm"
    assert flags["interpolated_slices"] == 1
    assert "IM00005.dcm" in caplog.text


def test_clean_series_has_no_flags(tmp_path):
    vol = load_volume(ct_series(tmp_path / "s", k=12))
    assert vol.meta["input_flags"] == {}


def test_too_many_broken_files_refuse_the_series(tmp_path):
    folder = ct_series(tmp_path / "s", k=10)
    for name in ("IM00004.dcm", "IM00005.dcm"):  # 2 of 10: more than the 10 % a series may lose
        _truncate(folder / name, 0.6)
    with pytest.raises(PreprocessError.__mro__[1], match="IM0000[45].dcm"):
        load_volume(folder)


def _cfg(**kw) -> ImageConfig:
    base = {"modality": "CT", "spacing": (4.0, 4.0, 5.0), "size": None, "size_multiple": 8, "cache": "none",
            "intensity": IntensityConfig(kind="window", a_min=-1000.0, a_max=400.0)}
    base.update(kw)
    return ImageConfig(**base)


def _run(cfg: ImageConfig, path: Path) -> dict:
    return apply_chain(preprocess_transforms(cfg), {KEY: str(path)})


def test_nonfinite_voxels_error_by_default_fill_on_request(tmp_path):
    arr = _ct_volume()
    arr[10:40, 10:40, :] = np.nan  # 30 x 30 x 20 = 18000 voxels
    arr[0, 0, 0] = np.inf
    path = _save(tmp_path / "nan.nii.gz", arr)
    with pytest.raises(PreprocessError, match=r"nan.nii.gz: 18001 non-finite voxel.*image.nonfinite: fill"):
        _run(_cfg(), path)
    out = _run(_cfg(nonfinite="fill"), path)
    assert out["input_flags"] == "nonfinite_voxels=18001"
    assert np.isfinite(np.asarray(out[KEY])).all()


@pytest.mark.parametrize("shape", [(64, 64, 1), (64, 2, 64), (1, 64, 64)])
def test_single_slice_and_slab_refused(tmp_path, shape):
    path = _save(tmp_path / "flat.nii.gz", np.full(shape, -1000.0) + np.arange(np.prod(shape)).reshape(shape) % 50)
    with pytest.raises(PreprocessError, match=r"flat.nii.gz: .*fewer than 3 along axis.*not a 3D volume"):
        _run(_cfg(), path)


def test_thin_slab_refused_by_extent(tmp_path):
    arr = _ct_volume(k=4)  # 4 slices of 0.1 mm: 0.4 mm, under 3 x 4 mm of the pipeline's grid
    path = _save(tmp_path / "slab.nii.gz", arr, np.diag([0.661468, 0.661468, 0.1, 1.0]))
    with pytest.raises(PreprocessError, match=r"slab.nii.gz: 0.40 mm along axis 2"):
        _run(_cfg(), path)


def test_single_dicom_file_refused(tmp_path):
    folder = ct_series(tmp_path / "s", k=3)
    with pytest.raises(PreprocessError, match="IM00001.dcm.*fewer than 3 along axis 2"):
        _run(_cfg(), folder / "IM00001.dcm")


def test_4d_nifti_refused_naming_the_file(tmp_path):
    path = _save(tmp_path / "fmri.nii.gz", np.stack([_ct_volume()] * 3, axis=-1))
    with pytest.raises(Exception, match=r"fmri.nii.gz: NIfTI shape \(128, 128, 20, 3\) is not 3D"):
        _run(_cfg(), path)


# ------------------------------------------------------------------ modality of untagged NIfTI


def test_mr_nifti_through_a_ct_pipeline_is_refused(tmp_path):
    path = mr_brain_nifti(tmp_path / "t1.nii.gz")
    with pytest.raises(PreprocessError, match=r"t1.nii.gz: looks like MR, not CT .*image.modality_check: false"):
        _run(_cfg(spacing=(2.0, 2.0, 2.0)), path)
    out = _run(_cfg(spacing=(2.0, 2.0, 2.0), modality_check=False), path)  # the documented override
    assert out["modality"] == "CT"


def test_ct_nifti_through_an_mr_pipeline_is_refused(tmp_path):
    path = _save(tmp_path / "chest.nii.gz", _ct_volume())
    cfg = _cfg(modality="MR", intensity=IntensityConfig(kind="zscore"))
    with pytest.raises(PreprocessError, match=r"chest.nii.gz: looks like CT, not MR .*air"):
        _run(cfg, path)
    assert _run(_cfg(modality="any", intensity=IntensityConfig(kind="zscore")), path)["modality"] == "unknown"


def test_real_scans_are_not_refused(tmp_path):
    ct = _ct_volume()
    cropped = ct[0:124, 68:128]  # inside the body: no air, fat to bone
    assert guess_modality(cropped) is None
    _run(_cfg(), _save(tmp_path / "crop.nii.gz", cropped))
    assert guess_modality(ct) == "CT"
    mr = np.asarray(nib.load(str(mr_brain_nifti(tmp_path / "t1.nii.gz"))).dataobj, dtype=np.float32)
    assert mr.min() < 0  # nibabel's anatomical.nii itself has negative values (processing)
    bias = mr * (1000.0 / 13000.0) - 40.0 * (np.indices(mr.shape)[0] / mr.shape[0])  # negatives after correction
    assert bias.min() < -30
    mr_cfg = _cfg(modality="MR", spacing=(2.0, 2.0, 2.0), intensity=IntensityConfig(kind="zscore"))
    for name, vol in (("t1", mr), ("bias", bias), ("padded", np.pad(mr, 8))):
        _run(mr_cfg, _save(tmp_path / f"{name}.nii.gz", vol, nib.load(str(tmp_path / "t1.nii.gz")).affine))
        assert guess_modality(vol) != "CT"


# ------------------------------------------------------------------ preprocess: manifest + errors


def test_preprocess_manifest_flags_and_error_rows(tmp_path):
    cfg_path = tmp_path / "ct.yaml"
    cfg_path.write_text("task: {kind: binary, target: label}\n"
                        "image: {modality: CT, spacing: [4, 4, 5], size: null, size_multiple: 8, cache: none,\n"
                        "        intensity: {kind: window, a_min: -1000, a_max: 400}}\n")
    d = tmp_path / "in"
    d.mkdir()
    nan = _ct_volume()
    nan[:30, :30, :] = np.nan
    cases = {
        "clean": _save(d / "clean.nii.gz", _ct_volume()),
        "nanvox": _save(d / "nan.nii.gz", nan),
        "flat": _save(d / "flat.nii.gz", _ct_volume(k=1)),
        "fourd": _save(d / "fourd.nii.gz", np.stack([_ct_volume()] * 2, axis=-1)),
        "mr": mr_brain_nifti(d / "mr.nii.gz"),
        "trunc": ct_series(d / "trunc", k=20),
    }
    _truncate(d / "trunc" / "IM00007.dcm", 0.5)
    pd.DataFrame({"case_id": list(cases), "image": [str(p) for p in cases.values()], "label": 0}).to_csv(
        tmp_path / "m.csv", index=False)
    run_preprocess(config_path=cfg_path, input_path=tmp_path / "m.csv", out_dir=tmp_path / "out", progress=False)
    man = pd.read_csv(tmp_path / "out" / "manifest.csv", keep_default_na=False).set_index("case_id")
    err = pd.read_csv(tmp_path / "out" / "errors.csv").set_index("case_id")
    assert sorted(man.index) == ["clean", "trunc"]
    assert man.loc["clean", "input_flags"] == ""
    assert man.loc["trunc", "input_flags"] == "dropped_file_names=IM00007.dcm;dropped_files=1;interpolated_slices=1"
    assert sorted(err.index) == ["flat", "fourd", "mr", "nanvox"]
    assert "non-finite" in err.loc["nanvox", "error"] and "fewer than 3" in err.loc["flat", "error"]
    assert "not 3D" in err.loc["fourd", "error"] and "looks like MR" in err.loc["mr", "error"]
    from mmai.data.provenance import read_provenance

    assert read_provenance(tmp_path / "out" / man.loc["trunc", "image"])["input_flags"].startswith("dropped")
    cfg_path.write_text(cfg_path.read_text().replace("cache: none", "cache: none, nonfinite: fill"))
    run_preprocess(config_path=cfg_path, input_path=tmp_path / "m.csv", out_dir=tmp_path / "out2", progress=False)
    man2 = pd.read_csv(tmp_path / "out2" / "manifest.csv", keep_default_na=False).set_index("case_id")
    assert man2.loc["nanvox", "input_flags"] == f"nonfinite_voxels={30 * 30 * 20}"


def test_sidecar_modality_is_the_series_modality(tmp_path):
    """A NIfTI written by `mmai convert` / dcm2niix carries its DICOM Modality in the JSON sidecar:
    that is checked like a DICOM series' (no intensity guess needed)."""
    import json

    path = _save(tmp_path / "s1.nii.gz", _ct_volume())
    (tmp_path / "s1.json").write_text(json.dumps({"Modality": "CT"}))
    assert _run(_cfg(), path)["modality"] == "CT"
    (tmp_path / "s1.json").write_text(json.dumps({"Modality": "MR"}))
    with pytest.raises(PreprocessError, match="series modality is MR, this pipeline is for CT"):
        _run(_cfg(), path)


def test_4d_nifti_in_a_cohort_statistics_pipeline_names_the_case(tmp_path):
    """Issue 15: a 4D NIfTI through mr_brain.yaml said "no training case has foreground voxels"."""
    cfg_path = tmp_path / "mr.yaml"
    cfg_path.write_text("task: {kind: binary, target: label}\n"
                        "image: {modality: MR, spacing: [2, 2, 2], size: null, cache: none,\n"
                        "        intensity: {kind: percentile}}\n")
    path = _save(tmp_path / "bold.nii.gz", np.stack([np.ones((20, 20, 20))] * 3, axis=-1))
    pd.DataFrame({"case_id": ["c1"], "image": [str(path)], "label": [0]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(PreprocessError, match=r"none of the 1 training case\(s\) could be loaded; first: case c1: "
                                              r".*bold.nii.gz: NIfTI shape \(20, 20, 20, 3\) is not 3D"):
        run_preprocess(config_path=cfg_path, input_path=tmp_path / "m.csv", out_dir=tmp_path / "out",
                       progress=False)


def test_file_list_with_a_header_cut_sibling_is_flagged(tmp_path):
    """`mmai predict --dicom-root` loads a stack's file list: a sibling whose header is cut (not in
    the list, it cannot name its series) is flagged like in a folder load."""
    from mmai.io.reader import MmaiDicomReader

    folder = ct_series(tmp_path / "s", k=20)
    _truncate(folder / "IM00005.dcm", 0.02)
    files = [f for f in sorted(folder.iterdir()) if f.name != "IM00005.dcm"]
    vol = MmaiDicomReader().read(files)
    assert vol.meta["input_flags"] == {"interpolated_slices": 1, "dropped_files": 1,
                                       "dropped_file_names": "IM00005.dcm"}
    clean = MmaiDicomReader().read(sorted(ct_series(tmp_path / "c", k=12).iterdir()))
    assert clean.meta["input_flags"] == {}


def test_trailing_singleton_dimension_is_one_volume(tmp_path):
    path = _save(tmp_path / "one.nii.gz", _ct_volume()[..., None])  # (128, 128, 20, 1)
    vol = load_volume(path)
    assert vol.array.shape == (128, 128, 20)
    np.testing.assert_array_equal(vol.array, _ct_volume())


def test_convert_sidecar_carries_input_flags(tmp_path):
    import json

    from mmai.io.convert import convert_tree

    folder = ct_series(tmp_path / "in" / "s", k=20)
    _truncate(folder / "IM00009.dcm", 0.6)
    ct_series(tmp_path / "in" / "clean", k=12)
    rep = convert_tree(tmp_path / "in", tmp_path / "out")
    sides = [json.loads((tmp_path / "out" / w.replace(".nii.gz", ".json")).read_text()) for w in rep.written]
    flags = sorted(s["input_flags"] for s in sides)
    assert flags == ["", "dropped_file_names=IM00009.dcm;dropped_files=1;interpolated_slices=1"]
