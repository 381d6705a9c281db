"""Siemens mosaics (issue 15): tiles placed through the CSA header, every volume kept by convert,
``scan`` names the series a mosaic, a mosaic mmai cannot place refused in one line naming it.

The mosaics are built from a real MR volume (nibabel's anatomical.nii) with a known geometry
(tests/io/mosaic_cases.py), and from pydicom's MR_small slices under a REAL Siemens header
(nibabel's csa_slice_norm.dcm: an oblique 6x6 mosaic of 32 slices with its CSA header). The
patient position of every pixel is checked against the known geometry and against nibabel's
independent ``MosaicWrapper``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.nicom import dicomwrappers
from nibabel.testing import data_path
from pydicom.data import get_testdata_file

from mmai.cli import main
from mmai.errors import DicomError
from mmai.io.convert import convert_tree
from mmai.io.dicom_scan import scan
from mmai.io.reader import load_volume
from tests.io.mosaic_cases import known_affine_ras, write_mosaic

NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
ORIENTATIONS = {  # iop, SliceNormalVector sign relative to row x column
    "axial": ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 1.0),
    "coronal": ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), 1.0),
    "sagittal": ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), -1.0),  # slices advance against row x column
    "oblique": ((0.98480775, 0.17364818, 0.0, -0.08682409, 0.49240388, -0.86602540), 1.0),
}


def mr_volume() -> np.ndarray:
    """nibabel's anatomical.nii (33 x 41 x 25 MR brain) as uint16 0..4000."""
    arr = np.asarray(nib.load(str(Path(data_path) / "anatomical.nii")).dataobj, dtype=np.float64).clip(0)
    return np.rint(arr / arr.max() * 4000).astype(np.uint16)


def _check_against_truth(vol, truth: np.ndarray, affine_ras: np.ndarray) -> None:
    """Every voxel of ``truth`` (at ``affine_ras``) is found at its patient position in ``vol``."""
    ijk = np.indices(truth.shape).reshape(3, -1).T
    ras = (affine_ras @ np.c_[ijk, np.ones(len(ijk))].T).T
    got = (np.linalg.inv(vol.affine) @ ras.T).T[:, :3]
    idx = np.rint(got).astype(int)
    assert np.abs(got - idx).max() < 1e-3  # every pixel lands on a voxel centre
    assert (idx >= 0).all() and (idx < np.array(vol.array.shape)).all()
    np.testing.assert_array_equal(vol.array[idx[:, 0], idx[:, 1], idx[:, 2]], truth.reshape(-1))


def _check_against_nibabel(vol, path: Path) -> None:
    """Each pixel of nibabel's reading of the mosaic (rows, cols, slices; LPS affine) is in ``vol``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = dicomwrappers.wrapper_from_data(pydicom.dcmread(str(path)))
        assert isinstance(w, dicomwrappers.MosaicWrapper)
        data, lps = w.get_data(), w.affine
    rck = np.indices(data.shape).reshape(3, -1).T
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps @ np.c_[rck, np.ones(len(rck))].T
    got = (np.linalg.inv(vol.affine) @ ras).T[:, :3]
    idx = np.rint(got).astype(int)
    assert np.abs(got - idx).max() < 1e-3
    np.testing.assert_allclose(vol.array[idx[:, 0], idx[:, 1], idx[:, 2]], data[tuple(rck.T)], atol=1e-3)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_mosaic_tiles_land_at_their_patient_positions(tmp_path, orientation):
    iop, sign = ORIENTATIONS[orientation]
    normal = sign * np.cross(iop[:3], iop[3:])
    truth = mr_volume()
    geo = {"iop": iop, "first_ipp": (-40.0, -55.0, -30.0), "pixel_spacing": (2.5, 2.0), "dz": 3.0}
    path = write_mosaic(tmp_path / "s" / "MOSAIC.dcm", truth, normal=normal, **geo)
    vol = load_volume(tmp_path / "s")
    assert vol.array.shape == truth.shape  # 25 slices of 33 x 41, not one 165 x 205 slice
    _check_against_truth(vol, truth.astype(np.float32), known_affine_ras(normal=normal, **geo))
    _check_against_nibabel(vol, path)
    assert vol.meta["geometry"] == "regular" and vol.meta["input_flags"] == {}


def test_real_siemens_header_mosaic(tmp_path):
    """nibabel's csa_slice_norm.dcm: a real oblique Siemens mosaic header (6x6 tiles, 32 slices of
    64 x 64) with pixels from pydicom's MR_small, each tile scaled differently."""
    ds = pydicom.dcmread(str(NIBABEL_DATA / "csa_slice_norm.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    mosaic = np.zeros((384, 384), np.uint16)
    for k in range(32):
        r, c = divmod(k, 6)
        mosaic[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] = np.rint(mr * (0.5 + k / 40)).astype(np.uint16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = mosaic.tobytes()
    ds["PixelData"].VR = "OW"
    path = tmp_path / "real" / "csa_mosaic.dcm"
    path.parent.mkdir()
    ds.save_as(str(path))
    vol = load_volume(path.parent)
    assert vol.array.shape == (64, 64, 32)
    _check_against_nibabel(vol, path)
    rows = scan(tmp_path / "real").stacks
    assert "mosaic" in rows[0].row["problems"] and "single slice" not in rows[0].row["problems"]


def test_convert_keeps_every_volume_and_scan_names_the_mosaic(tmp_path):
    truth = mr_volume()
    geo = {"iop": ORIENTATIONS["axial"][0], "first_ipp": (-40.0, -55.0, -30.0), "pixel_spacing": (2.0, 2.0),
           "dz": 3.0}
    series, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for acq in (1, 2, 3):
        write_mosaic(tmp_path / "in" / "bold" / f"IM{acq:04d}.dcm", truth + 10 * acq, series_uid=series,
                     study_uid=study, acq=acq, **geo)
    write_mosaic(tmp_path / "in" / "nocsa" / "IM0001.dcm", truth, csa=False, study_uid=study, **geo)
    res = scan(tmp_path / "in")
    rows = [s.row for s in res.stacks if s.row["series_uid"] == series]
    assert len(rows) == 3 and all("mosaic" in r["problems"] for r in rows)
    assert all("single slice" not in r["problems"] for r in rows)
    rep = convert_tree(tmp_path / "in", tmp_path / "out")
    assert len(rep.written) == 1 and rep.n_4d == 1
    img = nib.load(str(tmp_path / "out" / rep.written[0]))
    assert img.shape == (33, 41, 25, 3)  # every volume, each with all its slices
    data = np.asarray(img.dataobj)
    np.testing.assert_array_equal(data[..., 2], truth + 30)
    np.testing.assert_allclose(img.affine, known_affine_ras(**geo), atol=1e-4)
    side = json.loads((tmp_path / "out" / rep.written[0].replace(".nii.gz", ".json")).read_text())
    assert side["geometry"] == "regular" and "mosaic" in side["problems"]
    errors = (tmp_path / "out" / "errors.csv").read_text()
    assert errors.count("\n") == 2 and "s005_" in errors and "CSA image header" in errors


def test_mosaic_mmai_cannot_place_is_refused(tmp_path):
    truth = mr_volume()
    geo = {"iop": ORIENTATIONS["axial"][0], "first_ipp": (0.0, 0.0, 0.0), "pixel_spacing": (2.0, 2.0), "dz": 3.0}
    write_mosaic(tmp_path / "a" / "M.dcm", truth, csa=False, **geo)
    with pytest.raises(DicomError, match=r"M.dcm: Siemens mosaic .*no CSA image header.*cannot place"):
        load_volume(tmp_path / "a")
    write_mosaic(tmp_path / "b" / "M.dcm", truth, n_images=30, **geo)  # 30 images: 6x6 tiles do not fit 5x5
    with pytest.raises(DicomError, match=r"does not split into 6x6 equal tiles"):
        load_volume(tmp_path / "b")
    write_mosaic(tmp_path / "c" / "M.dcm", truth, normal=np.array([0.0, 0.6, 0.8]), **geo)
    with pytest.raises(DicomError, match=r"SliceNormalVector .* not normal"):
        load_volume(tmp_path / "c")
    assert main(["convert", str(tmp_path / "a"), "--out", str(tmp_path / "out"), "-q"]) == 1


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless,
                                    pydicom.uid.JPEG2000Lossless])
def test_compressed_mosaic_reads_like_the_uncompressed_one(tmp_path, syntax):
    truth = mr_volume()
    iop, sign = ORIENTATIONS["coronal"]
    geo = {"iop": iop, "first_ipp": (-40.0, 20.0, 30.0), "pixel_spacing": (2.0, 2.0), "dz": 3.0}
    path = write_mosaic(tmp_path / "s" / "M.dcm", truth, **geo)
    ds = pydicom.dcmread(str(path))
    ds.compress(syntax)
    ds.save_as(str(path))
    vol = load_volume(tmp_path / "s")
    _check_against_truth(vol, truth.astype(np.float32), known_affine_ras(**geo))
    assert vol.meta["transfer_syntax"] == str(syntax)
