"""Volumes built from real scans bundled with pydicom and nibabel (test helpers)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from mmai.io.dicom_write import write_series


def ct_hu_slice() -> np.ndarray:
    """pydicom's CT_small.dcm in HU, (128, 128) float32, indexed (column i, row j)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu.T.copy()


def ct_series(folder: Path, k: int = 20, modality: str = "CT") -> Path:
    """A DICOM series of ``k`` copies of the real CT slice (0.66 x 0.66 x 5 mm), HU stored with intercept -1024."""
    vol = np.repeat(ct_hu_slice()[:, :, None], k, axis=2)
    write_series(vol, folder, spacing=(0.661468, 0.661468, 5.0), modality=modality, rescale_slope=1.0,
                 rescale_intercept=-1024.0, series_description=f"{modality} REAL PIXELS")
    return folder


def mr_series(folder: Path, k: int = 12) -> Path:
    """A DICOM MR series of ``k`` copies of pydicom's MR_small.dcm (0.3125 mm pixels, 0.8 mm slices)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    vol = np.repeat(ds.pixel_array.astype(np.float32).T[:, :, None], k, axis=2)
    write_series(vol, folder, spacing=(0.3125, 0.3125, 0.8), modality="MR", series_description="MR REAL PIXELS")
    return folder


def mr_brain_nifti(path: Path, scale: float = 1.0) -> Path:
    """nibabel's anatomical.nii (a 33 x 41 x 25 MR brain at 2 mm), intensities times ``scale``."""
    img = nib.load(str(Path(data_path) / "anatomical.nii"))
    arr = np.asarray(img.dataobj, dtype=np.float32) * scale
    nib.save(nib.Nifti1Image(arr, img.affine), str(path))
    return path
