"""Write a 3D volume as a DICOM series (one file per slice), fast.

The writer serves the synthetic cohort generator (tens of thousands of small slices) and the
tests' fixtures. It builds one template header with pydicom, serializes the constant parts of it
once, and per slice only encodes the few elements that change (SOPInstanceUID, InstanceNumber,
ImagePositionPatient, SliceLocation, PixelData) before joining bytes. The output is plain
explicit-VR little-endian Part 10 files that pydicom, SimpleITK/GDCM and dcm2niix read.

Geometry follows the shared convention (see docs/dicom.md): ``volume[i, j, k]`` with ``i`` the DICOM
column index (along the first ImageOrientationPatient cosine), ``j`` the row index (along the
second cosine) and ``k`` the slice index along ``normal = cross(row_cosine, col_cosine)``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from mmai.errors import DicomError

logger = logging.getLogger(__name__)

SOP_CLASSES: dict[str, str] = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
_IMAGE_TYPE = {"CT": ["ORIGINAL", "PRIMARY", "AXIAL"], "MR": ["ORIGINAL", "PRIMARY", "OTHER"]}

# Elements that differ from slice to slice; everything else comes from the template.
_SOP_INSTANCE_UID = 0x00080018
_INSTANCE_NUMBER = 0x00200013
_IMAGE_POSITION = 0x00200032
_SLICE_LOCATION = 0x00201041
_PIXEL_DATA = 0x7FE00010
_PER_SLICE = (_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _IMAGE_POSITION, _SLICE_LOCATION, _PIXEL_DATA)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """Encode one explicit-VR little-endian element with a short (2-byte) length field."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _long_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """Encode one explicit-VR little-endian element with a 4-byte length (OB, OW, UN ...)."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _ds(values: np.ndarray | list[float]) -> str:
    return "\\".join(format_number_as_ds(float(v)) for v in values)


def _file_meta(sop_class: str, sop_instance: str) -> bytes:
    """Preamble, 'DICM' and the group-2 file meta information (with its group length)."""
    body = (
        _long_element(0x00020001, b"OB", b"\x00\x01")
        + _element(0x00020002, b"UI", _uid(sop_class))
        + _element(0x00020003, b"UI", _uid(sop_instance))
        + _element(0x00020010, b"UI", _uid(ExplicitVRLittleEndian))
        + _element(0x00020012, b"UI", _uid(PYDICOM_IMPLEMENTATION_UID))
        + _element(0x00020013, b"SH", _text("MMAI_" + pydicom.__version__.replace(".", "")[:10]))
    )
    return b"\x00" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _serialize(elements: list[Any]) -> bytes:
    """Serialize a run of template elements (sorted) as explicit-VR little-endian bytes."""
    ds = Dataset()
    for elem in elements:
        ds.add(elem)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _orientation_axes(orientation: tuple[float, ...] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cos = np.asarray(orientation, dtype=np.float64).reshape(-1)
    if cos.shape != (6,):
        raise DicomError(f"orientation must hold 6 direction cosines (row then column), got {orientation!r}")
    row, col = cos[:3], cos[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-4 or abs(np.linalg.norm(col) - 1) > 1e-4 or abs(row @ col) > 1e-4:
        raise DicomError(f"orientation {orientation!r} is not two orthonormal unit vectors (tolerance 1e-4)")
    return row, col, np.cross(row, col)


def _stored_values(volume: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, int]:
    """Real values -> stored integers; uint16 when every stored value is >= 0, else int16.

    Returns:
        (stored array (I, J, K), PixelRepresentation 0 = unsigned or 1 = signed).
    """
    if slope == 0:
        raise DicomError("rescale_slope must be non-zero, got 0")
    stored = np.rint((np.asarray(volume, dtype=np.float64) - intercept) / slope)
    lo, hi = (float(stored.min()), float(stored.max())) if stored.size else (0.0, 0.0)
    if lo >= 0 and hi <= 65535:
        return stored.astype(np.uint16), 0
    if lo >= -32768 and hi <= 32767:
        return stored.astype(np.int16), 1
    raise DicomError(
        f"volume values give stored integers in [{lo:.0f}, {hi:.0f}] with slope {slope} and intercept "
        f"{intercept}; allowed: [0, 65535] (uint16) or [-32768, 32767] (int16); change slope/intercept"
    )


def _template(
    *, shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation: np.ndarray,
    modality: str, patient_id: str, patient_name: str, study_uid: str, series_uid: str,
    series_number: int, series_description: str, slope: float, intercept: float,
    pixel_representation: int, extra: Mapping[str, Any] | None,
) -> Dataset:
    n_i, n_j, _ = shape
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = _IMAGE_TYPE[modality]
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "mmai"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "mmai synthetic study"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = format_number_as_ds(float(spacing[2]))
    ds.SpacingBetweenSlices = format_number_as_ds(float(spacing[2]))
    if modality == "CT":
        ds.KVP = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in orientation]
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(n_j)
    ds.Columns = int(n_i)
    ds.PixelSpacing = [format_number_as_ds(float(spacing[1])), format_number_as_ds(float(spacing[0]))]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_representation
    ds.RescaleIntercept = format_number_as_ds(float(intercept))
    ds.RescaleSlope = format_number_as_ds(float(slope))
    ds.RescaleType = "HU" if modality == "CT" else "US"
    for keyword, value in (extra or {}).items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise DicomError(f"extra header keyword {keyword!r} is not a DICOM keyword (pydicom dictionary)")
        if tag in _PER_SLICE:
            raise DicomError(
                f"extra header keyword {keyword!r} is set per slice by write_series; it cannot be in extra "
                f"(per-slice keywords: SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation, PixelData)"
            )
        if tag >> 16 == 0x0002:
            raise DicomError(f"extra header keyword {keyword!r} is file meta information (group 0002); not allowed")
        setattr(ds, keyword, value)
    return ds


def _write_slices(stored: np.ndarray, template: Dataset, out_dir: Path, *, sop_class: str,
                  origin: tuple[float, float, float], step: np.ndarray, normal: np.ndarray,
                  file_prefix: str) -> list[Path]:
    """Write slice k of ``stored`` (I, J, K) at ``origin + k * step``: the template's constant
    element runs between the per-slice elements are serialized once and joined per slice."""
    segments: list[list[Any]] = [[] for _ in range(len(_PER_SLICE) + 1)]
    for elem in sorted(template, key=lambda e: e.tag):
        slot = sum(int(elem.tag) > t for t in _PER_SLICE)
        segments[slot].append(elem)
    chunks = [_serialize(seg) for seg in segments]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    origin_arr = np.asarray(origin, dtype=np.float64)
    # (K, J, I) C-contiguous little-endian: slice k's rows x columns, as DICOM stores them.
    frames = np.ascontiguousarray(stored.transpose(2, 1, 0)).astype(stored.dtype.newbyteorder("<"), copy=False)
    width = max(5, len(str(stored.shape[2])))
    paths: list[Path] = []
    for k in range(stored.shape[2]):
        sop_uid = generate_uid()
        position = origin_arr + k * step
        data = b"".join((
            _file_meta(sop_class, sop_uid),
            chunks[0], _element(_SOP_INSTANCE_UID, b"UI", _uid(sop_uid)),
            chunks[1], _element(_INSTANCE_NUMBER, b"IS", _text(str(k + 1))),
            chunks[2], _element(_IMAGE_POSITION, b"DS", _text(_ds(position))),
            chunks[3], _element(_SLICE_LOCATION, b"DS", _text(format_number_as_ds(float(position @ normal)))),
            chunks[4], _long_element(_PIXEL_DATA, b"OW", frames[k].tobytes()),
            chunks[5],
        ))
        path = out / f"{file_prefix}{k + 1:0{width}d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def write_series(
    volume: np.ndarray,
    out_dir: Path,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    modality: str = "CT",
    patient_id: str = "ANON",
    patient_name: str = "ANON^PATIENT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    file_prefix: str = "IM",
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume`` as a single-frame DICOM series, one file per slice ``k``.

    Stored values are ``round((v - intercept) / slope)``, written as uint16 (PixelRepresentation 0)
    when every stored value is >= 0 and fits 16 bits, else int16 (PixelRepresentation 1); values
    that fit neither raise DicomError. Slice ``k`` sits at ``origin + k * spacing[2] * normal``.

    Args:
        volume: (I, J, K) real values (HU for CT): I columns, J rows, K slices.
        out_dir: folder to write into (created if missing); files are ``{file_prefix}{k+1:05d}.dcm``.
        spacing: (column spacing along i, row spacing along j, slice spacing along k) in mm.
            PixelSpacing is written as [spacing[1], spacing[0]] (DICOM: row spacing first).
        origin: ImagePositionPatient (LPS mm) of slice k = 0.
        orientation: ImageOrientationPatient: row cosine (direction of increasing i) then column
            cosine (direction of increasing j), LPS.
        modality: "CT" or "MR" (sets the SOP Class).
        patient_id, patient_name: identifying fields (PatientBirthDate is 19700101), so that
            de-identification can be tested.
        study_uid, series_uid: generated with pydicom.uid.generate_uid when None.
        series_number, series_description: SeriesNumber, SeriesDescription.
        rescale_slope, rescale_intercept: RescaleSlope / RescaleIntercept.
        file_prefix: file name prefix.
        extra: DICOM keyword -> value, set on every slice (e.g. {"AcquisitionNumber": 2}).

    Returns:
        The written paths, in slice order k = 0 .. K-1.

    Raises:
        DicomError: bad shape, modality, orientation, extra keyword, or values that do not fit.
    """
    if modality not in SOP_CLASSES:
        raise DicomError(f"modality {modality!r} is not supported by write_series; allowed: {sorted(SOP_CLASSES)}")
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise DicomError(f"volume must be a non-empty 3D array (I, J, K), got shape {vol.shape}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise DicomError(f"spacing must be 3 positive numbers (i, j, k) in mm, got {spacing!r}")
    _, _, normal = _orientation_axes(orientation)
    stored, pixel_representation = _stored_values(vol, float(rescale_slope), float(rescale_intercept))
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    template = _template(
        shape=vol.shape, spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        orientation=np.asarray(orientation, float),
        modality=modality, patient_id=patient_id, patient_name=patient_name, study_uid=study_uid,
        series_uid=series_uid, series_number=series_number, series_description=series_description,
        slope=float(rescale_slope), intercept=float(rescale_intercept),
        pixel_representation=pixel_representation, extra=extra,
    )
    paths = _write_slices(stored, template, out_dir, sop_class=SOP_CLASSES[modality], origin=origin,
                          step=float(spacing[2]) * normal, normal=normal, file_prefix=file_prefix)
    logger.debug("wrote %d slices of series %s to %s", len(paths), series_uid, out_dir)
    return paths

