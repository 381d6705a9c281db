"""The fast chain equals the reference chain (to float32 rounding) on full-size real CT slices,
on the NIfTI a real converter (dcm2niix) makes of them, and on every case of the synthetic cohorts
(``mmai synth``: the demo cohort as DICOM and NIfTI, the nodule cohort).

Real pixels: pydicom ships two full-size (512 x 512) CT slices, ``693_J2KI.dcm`` (axial, JPEG 2000)
and ``J2K_pixelrep_mismatch.dcm`` (an oblique, gantry-tilted acquisition); no installed package
ships a CT volume as NIfTI, so the NIfTI cases are written from these pixels, by dcm2niix (scaled
int16, its own orientation handling) and by nibabel (unscaled int16, the stored dtype path).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from mmai.config import ImageConfig
from mmai.io.dicom_write import write_series
from tests.io import dicom_cases as dc
from tests.transforms.test_fast_chain import assert_same, both, ready


def real_ct_volume(name: str, k: int) -> tuple[np.ndarray, pydicom.Dataset]:
    """(512, 512, k) HU float32 (column i, row j, slice): the real slice, rolled 3 rows further per
    slice so that every axis has real structure to resample; and the slice's dataset."""
    ds = pydicom.dcmread(get_testdata_file(name))
    hu = (ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
    return np.stack([np.roll(hu, 3 * s, axis=1) for s in range(k)], axis=2), ds


def real_ct_series(folder: Path, name: str = "693_J2KI.dcm", k: int = 16, slice_mm: float = 1.25) -> Path:
    vol, ds = real_ct_volume(name, k)
    px = [float(v) for v in ds.PixelSpacing]
    write_series(vol, folder, spacing=(px[1], px[0], slice_mm),
                 origin=tuple(float(v) for v in ds.ImagePositionPatient),
                 orientation=tuple(float(v) for v in ds.ImageOrientationPatient), modality="CT",
                 rescale_slope=1.0, rescale_intercept=-1024.0, series_description="CT REAL PIXELS 512")
    return folder


@pytest.mark.parametrize("pipeline", ["ct_chest", "ct_head"])
def test_full_size_real_ct_series(tmp_path, pipeline):
    folder = str(real_ct_series(tmp_path / "ct"))
    ref, fast = both(ready(pipeline), folder)
    assert_same(ref, fast)
    assert fast["image"].shape[0] == 2 and min(fast["image"].shape[1:]) >= 16


def test_oblique_real_ct_series(tmp_path):
    """The gantry-tilted real slice: not a scaled permutation, the fast chain's MONAI fallback."""
    folder = str(real_ct_series(tmp_path / "ct", "J2K_pixelrep_mismatch.dcm", k=12, slice_mm=2.0))
    assert_same(*both(ready("ct_chest"), folder))


def test_real_ct_as_dcm2niix_nifti(tmp_path):
    real_ct_series(tmp_path / "ct", k=16)
    (name, img), = dc.dcm2niix(tmp_path / "ct", tmp_path / "nii")
    assert img.get_data_dtype() == np.int16
    assert_same(*both(ready("ct_chest"), str(tmp_path / "nii" / name)))


def test_real_ct_as_unscaled_int16_nifti(tmp_path):
    vol, _ = real_ct_volume("693_J2KI.dcm", 16)
    aff = np.diag([-0.478516, -0.478516, 1.25, 1.0])  # LPS-stored columns and rows, as scanners write
    aff[:3, 3] = [122.5, 112.4, 47.0]
    img = nib.Nifti1Image(vol.astype(np.int16), aff)
    img.set_data_dtype(np.int16)
    nib.save(img, str(tmp_path / "ct.nii"))
    for name in ("ct_chest", "ct_head"):
        assert_same(*both(ready(name), str(tmp_path / "ct.nii")))


def _demo_cfg() -> ImageConfig:
    from mmai.config import load_config

    return load_config("pipelines/demo.yaml").image


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_every_case_of_the_demo_cohort(tmp_path, fmt):
    from mmai.synth import SynthSpec, write_cohort

    write_cohort(tmp_path, SynthSpec(n=4, fmt=fmt), progress=False)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    for image in manifest["image"]:
        for cfg in (_demo_cfg(), ready("ct_chest")):  # one window at 9 mm on a fixed grid; two windows at 1.5 mm
            assert_same(*both(cfg, str(tmp_path / image)))


def test_every_case_of_the_nodule_cohort(tmp_path):
    from mmai.synth_nodule import write_nodule_cohort

    write_nodule_cohort(tmp_path, n=4, progress=False)
    for image in pd.read_csv(tmp_path / "manifest.csv")["image"]:
        assert_same(*both(ready("ct_chest"), str(tmp_path / image)))
