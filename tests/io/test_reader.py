"""MmaiDicomReader (MONAI LoadImage / LoadImaged) and load_volume on folders, files and NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage, LoadImaged
from monai.utils import SpaceKeys

from mmai.errors import SeriesSelectionError
from mmai.io.reader import MmaiDicomReader, load_volume, mmai_load_image, mmai_load_imaged
from tests.io import dicom_cases as dc

PHI = {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "patient_id", "patient_name"}


def test_loadimage_on_a_series_folder(tmp_path: Path) -> None:
    """LoadImage gives the (I, J, K) volume, the RAS affine and non-identifying meta; the world
    positions and values agree with dcm2niix's NIfTI."""
    case = dc.series(tmp_path / "s", orientation=dc.OBLIQUE)
    img = LoadImage(reader=MmaiDicomReader(), image_only=True)(str(tmp_path / "s"))
    assert tuple(img.shape) == dc.SHAPE
    np.testing.assert_array_equal(img.numpy(), case.volume)
    np.testing.assert_allclose(img.affine.numpy(), case.affine, atol=1e-5)
    assert img.meta["space"] == SpaceKeys.RAS
    assert tuple(img.meta["spatial_shape"]) == dc.SHAPE
    assert not PHI & set(img.meta)
    assert "ANON" not in repr({k: v for k, v in img.meta.items() if k != "filename_or_obj"})
    ref = dict(dc.dcm2niix(tmp_path / "s", tmp_path / "nii"))["1_1.nii"]
    ours, theirs = dc.world_match(img.numpy(), img.affine.numpy(), ref)
    np.testing.assert_array_equal(ours, theirs)


def test_loadimaged_and_channel_first(tmp_path: Path) -> None:
    case = dc.series(tmp_path / "s")
    for loader in (LoadImaged(keys="image", reader=MmaiDicomReader(), ensure_channel_first=True),
                   mmai_load_imaged("image", ensure_channel_first=True)):
        out = loader({"image": str(tmp_path / "s")})
        assert tuple(out["image"].shape) == (1, *dc.SHAPE)
        np.testing.assert_array_equal(out["image"][0].numpy(), case.volume)


def test_list_of_files_is_one_series(tmp_path: Path) -> None:
    case = dc.series(tmp_path / "s")
    img = LoadImage(reader=MmaiDicomReader(dtype="native"), image_only=True, dtype=None)([str(f) for f in case.files[::-1]])
    assert img.dtype == torch.int16
    np.testing.assert_array_equal(img.numpy(), case.volume)


def test_two_series_in_a_folder_need_a_rule(tmp_path: Path) -> None:
    """SeriesSelectionError lists both candidates; mmai_load_image lets it through (plain
    LoadImage(reader=...) would swallow it and fall back to MONAI's own readers)."""
    dc.two_series(tmp_path / "s")
    with pytest.raises(SeriesSelectionError, match=r"(?s)(?=.*AX 2\.5)(?=.*AX SOFT)"):
        MmaiDicomReader().read(str(tmp_path / "s"))
    with pytest.raises(SeriesSelectionError, match=r"(?s)(?=.*AX 2\.5)(?=.*AX SOFT)"):
        mmai_load_image(image_only=True)(str(tmp_path / "s"))
    with pytest.raises(SeriesSelectionError):
        mmai_load_imaged("image")({"image": str(tmp_path / "s")})
    img = mmai_load_image(select={"description": "soft"}, image_only=True)(str(tmp_path / "s"))
    np.testing.assert_array_equal(img.numpy(), dc.phantom(seed=3))
    assert img.meta["series_description"] == "AX SOFT"


def test_localizer_is_never_a_candidate(tmp_path: Path) -> None:
    case = dc.with_localizer(tmp_path / "s")
    vol = load_volume(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, case.volume)
    np.testing.assert_allclose(vol.affine, case.affine, atol=1e-6)


def test_two_phases_in_a_folder(tmp_path: Path) -> None:
    case = dc.two_phases(tmp_path / "s")
    with pytest.raises(SeriesSelectionError):
        load_volume(tmp_path / "s")
    vol = load_volume(tmp_path / "s", select={"phase": 2})
    np.testing.assert_array_equal(vol.array, case.notes["phase2"].volume)


def test_enhanced_multiframe_phases_through_the_reader(tmp_path: Path) -> None:
    folder = tmp_path / "mf"
    folder.mkdir()
    cases = dc.enhanced(folder / "mf.dcm", modality="MR", n_temporal=2, orientation=dc.OBLIQUE)
    with pytest.raises(SeriesSelectionError):
        load_volume(folder)
    for phase in (1, 2):
        vol = load_volume(folder, select={"phase": phase})
        np.testing.assert_array_equal(vol.array, cases[phase - 1].volume)
        np.testing.assert_allclose(vol.affine, cases[phase - 1].affine, atol=1e-6)


def test_load_volume_nifti_uses_the_same_convention(tmp_path: Path) -> None:
    """A DICOM volume saved as NIfTI loads back identical; dcm2niix's NIfTI of the same series
    (rows flipped on disk) lands on the same world grid with the same values."""
    case = dc.series(tmp_path / "s", orientation=dc.SAGITTAL)
    dicom = load_volume(tmp_path / "s")
    nib.save(nib.Nifti1Image(dicom.array, dicom.affine), tmp_path / "v.nii.gz")
    nii = load_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(nii.array, case.volume)
    np.testing.assert_allclose(nii.affine, dicom.affine, atol=1e-5)
    assert nii.meta["orientation"] == dicom.meta["orientation"] == "sagittal"
    (name, _), = dc.dcm2niix(tmp_path / "s", tmp_path / "nii")
    ref = load_volume(tmp_path / "nii" / name)
    via_monai = mmai_load_image(image_only=True, load_dtype=None)(str(tmp_path / "nii" / name))
    np.testing.assert_array_equal(via_monai.numpy(), ref.array)
    np.testing.assert_allclose(via_monai.affine.numpy(), ref.affine, atol=1e-6)
    ours, theirs = dc.world_match(dicom.array, dicom.affine, nib.Nifti1Image(ref.array, ref.affine))
    np.testing.assert_array_equal(ours, theirs)


def test_verify_suffix(tmp_path: Path) -> None:
    reader = MmaiDicomReader()
    assert reader.verify_suffix(str(tmp_path))
    assert reader.verify_suffix(["a.dcm", "b.DCM", "IM0001"])
    assert reader.verify_suffix("v.nii.gz")  # one NIfTI file: read through nibabel
    assert not reader.verify_suffix(["v.nii.gz", "w.nii.gz"])
    assert not reader.verify_suffix(["a.dcm", "b.png"])
