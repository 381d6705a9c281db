"""Siemens mosaic test files built from a known volume (test helpers).

:func:`write_mosaic` packs the K slices of a volume whose voxel -> LPS geometry is known into
one mosaic image of ``m x m`` tiles with a CSA image header (NumberOfImagesInMosaic,
SliceNormalVector) written by :func:`csa2`, and sets ImagePositionPatient to the WHOLE mosaic's
top-left pixel as Siemens does (the first slice's position moved back by half the mosaic-minus-
tile size along the row and column cosines). A reader that places the tiles right gives back
the volume and its geometry; nibabel's ``MosaicWrapper`` reads the same files independently.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def csa2(tags: dict[str, tuple[str, list[str]]]) -> bytes:
    """A CSA2 ("SV10") header: ``{name: (vr, [item text, ...])}`` (the format nibabel's csareader reads)."""
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, items) in tags.items():
        out.append(struct.pack("<64si4s3i", name.encode(), len(items), vr.encode(), 3, len(items), 77))
        for text in items:
            data = text.encode() + b"\x00"
            out.append(struct.pack("<4i", len(data), len(data), 77, len(data)))
            out.append(data + b"\x00" * (-len(data) % 4))
    return b"".join(out)


def mosaic_ipp(first: np.ndarray, iop: np.ndarray, pixel_spacing: tuple[float, float], mosaic_rc: tuple[int, int],
               tile_rc: tuple[int, int]) -> np.ndarray:
    """The mosaic's ImagePositionPatient (LPS) for a first slice at ``first`` (Siemens' convention)."""
    row_cos, col_cos = np.asarray(iop[:3]), np.asarray(iop[3:])
    return (np.asarray(first, float) - col_cos * pixel_spacing[0] * (mosaic_rc[0] - tile_rc[0]) / 2
            - row_cos * pixel_spacing[1] * (mosaic_rc[1] - tile_rc[1]) / 2)


def write_mosaic(path: Path, volume: np.ndarray, *, iop: tuple[float, ...], first_ipp: tuple[float, float, float],
                 pixel_spacing: tuple[float, float] = (2.0, 2.0), dz: float = 3.0, normal: np.ndarray | None = None,
                 series_uid: str | None = None, study_uid: str | None = None, acq: int = 1,
                 csa: bool = True, n_images: int | None = None, template: Dataset | None = None) -> Path:
    """Write ``volume`` (cols, rows, K) uint16 (i along the row cosine, j along the column cosine,
    slice k at ``first_ipp + k * dz * normal``) as one Siemens mosaic file.

    Args:
        normal: the CSA SliceNormalVector (default: row cosine x column cosine).
        csa: write the CSA image header (False: a mosaic mmai cannot place).
        n_images: NumberOfImagesInMosaic to write (default K).
        template: a dataset whose other attributes to keep (e.g. a real Siemens header).
    """
    iop_a = np.asarray(iop, float)
    normal = np.cross(iop_a[:3], iop_a[3:]) if normal is None else np.asarray(normal, float)
    tc, tr, k = volume.shape  # tile columns, tile rows
    m = math.ceil(math.sqrt(k))
    mosaic = np.zeros((m * tr, m * tc), np.uint16)
    for s in range(k):
        r, c = divmod(s, m)
        mosaic[r * tr:(r + 1) * tr, c * tc:(c + 1) * tc] = volume[:, :, s].T
    ds = template.copy() if template is not None else Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.StudyInstanceUID = study_uid or getattr(ds, "StudyInstanceUID", None) or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "MR"
    ds.Manufacturer = "SIEMENS"
    ds.PatientID = "MOSAIC01"
    ds.SeriesDescription = "ep2d_bold MOSAIC"
    ds.SeriesNumber = 5
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.AcquisitionNumber = acq
    ds.InstanceNumber = acq
    ds.Rows, ds.Columns = mosaic.shape
    ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
    ds.ImageOrientationPatient = [f"{v:.8g}" for v in iop_a]
    ipp = mosaic_ipp(np.asarray(first_ipp), iop_a, pixel_spacing, mosaic.shape, (tr, tc))
    ds.ImagePositionPatient = [f"{v:.8g}" for v in ipp]
    ds.SliceThickness = f"{dz:g}"
    ds.SpacingBetweenSlices = f"{dz:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for tag in (0x00291010, 0x00291020):
        if tag in ds:
            del ds[tag]
    if csa:
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        block.add_new(0x10, "OB", csa2({"NumberOfImagesInMosaic": ("US", [str(n_images or k)]),
                                        "AcquisitionMatrixText": ("SH", [f"{tr}*{tc}"]),
                                        "SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal])}))
    ds.PixelData = mosaic.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def known_affine_ras(iop: tuple[float, ...], first_ipp: tuple[float, float, float],
                     pixel_spacing: tuple[float, float], dz: float, normal: np.ndarray | None = None) -> np.ndarray:
    """Voxel (i, j, k) -> RAS of the volume given to :func:`write_mosaic` (the ground truth)."""
    iop_a = np.asarray(iop, float)
    n = np.cross(iop_a[:3], iop_a[3:]) if normal is None else np.asarray(normal, float) / np.linalg.norm(normal)
    lps = np.eye(4)
    lps[:3, 0] = iop_a[:3] * pixel_spacing[1]
    lps[:3, 1] = iop_a[3:] * pixel_spacing[0]
    lps[:3, 2] = n * dz
    lps[:3, 3] = first_ipp
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
