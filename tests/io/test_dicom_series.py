"""DICOM series writer and loader: write_series round trips, then load_series case by case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mmai.errors import DicomError
from mmai.io.dicom_write import write_series

ORIENTATIONS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": (0.8660254, 0.5, 0.0, -0.3535534, 0.6123724, 0.7071068),
}


def _sitk_read(paths: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    return reader.Execute()


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_write_series_geometry_and_values_match_simpleitk(tmp_path: Path, name: str) -> None:
    """SimpleITK (GDCM) reads back the same origin, spacing, direction and HU values."""
    rng = np.random.default_rng(1)
    vol = rng.integers(-1024, 3000, size=(12, 9, 7)).astype(np.float32)
    iop = ORIENTATIONS[name]
    spacing, origin = (0.7, 0.9, 2.5), (-12.5, 30.25, 101.0)
    paths = write_series(vol, tmp_path / name, spacing=spacing, origin=origin, orientation=iop)
    assert [p.name for p in paths] == [f"IM{k:05d}.dcm" for k in range(1, 8)]
    img = _sitk_read(paths)
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-4)
    direction = np.array(img.GetDirection()).reshape(3, 3)  # columns = axis directions (LPS)
    np.testing.assert_allclose(direction[:, 0], row, atol=1e-4)
    np.testing.assert_allclose(direction[:, 1], col, atol=1e-4)
    np.testing.assert_allclose(direction[:, 2], normal, atol=1e-4)
    arr = sitk.GetArrayFromImage(img)  # (K, J, I)
    np.testing.assert_array_equal(arr.transpose(2, 1, 0).astype(np.float32), vol)


def test_write_series_headers(tmp_path: Path) -> None:
    """Headers a validating pydicom accepts: UIDs, PixelSpacing order, rescale, identifying fields."""
    vol = np.full((6, 4, 3), 40.0, dtype=np.float32)
    vol[0, 0, 0] = -1024
    paths = write_series(vol, tmp_path / "s", spacing=(0.5, 0.75, 3.0), modality="MR", patient_id="P42",
                         patient_name="DOE^JANE", series_number=7, series_description="T1 AX",
                         rescale_slope=2.0, rescale_intercept=-1024.0, extra={"EchoTime": 12.5})
    with pydicom.config.strict_reading():
        headers = [pydicom.dcmread(p) for p in paths]
    ds = headers[0]
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len({h.SOPInstanceUID for h in headers}) == 3
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.FrameOfReferenceUID for h in headers}) == 1
    assert [int(h.InstanceNumber) for h in headers] == [1, 2, 3]
    assert [float(v) for v in ds.PixelSpacing] == [0.75, 0.5]  # [row spacing (j), column spacing (i)]
    assert (ds.Rows, ds.Columns) == (4, 6)
    assert float(ds.SliceThickness) == 3.0
    assert ds.PatientID == "P42" and str(ds.PatientName) == "DOE^JANE" and ds.PatientBirthDate
    assert ds.SeriesNumber == 7 and ds.SeriesDescription == "T1 AX" and float(ds.EchoTime) == 12.5
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
    assert ds.PixelRepresentation == 0  # every stored value >= 0 -> uint16
    real = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(real.T, vol[:, :, 0])
    assert [float(h.ImagePositionPatient[2]) for h in headers] == [0.0, 3.0, 6.0]


def test_write_series_signed_when_needed(tmp_path: Path) -> None:
    vol = np.array([-2000.0, 0.0, 500.0]).reshape(3, 1, 1)
    (path,) = write_series(vol, tmp_path / "s")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(ds.pixel_array[0] + float(ds.RescaleIntercept), [-2000, 0, 500])


def test_write_series_rejects_bad_input(tmp_path: Path) -> None:
    vol = np.zeros((4, 4, 2))
    with pytest.raises(DicomError, match="modality 'XA'"):
        write_series(vol, tmp_path, modality="XA")
    with pytest.raises(DicomError, match="orthonormal"):
        write_series(vol, tmp_path, orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(DicomError, match="InstanceNumber"):
        write_series(vol, tmp_path, extra={"InstanceNumber": 3})
    with pytest.raises(DicomError, match="NotAKeyword"):
        write_series(vol, tmp_path, extra={"NotAKeyword": 3})
    with pytest.raises(DicomError, match=r"\[0, 65535\]"):
        write_series(np.full((2, 2, 1), 1e6), tmp_path)
