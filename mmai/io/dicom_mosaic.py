"""Siemens mosaics: one file holding every slice of one volume as a grid of tiles.

Siemens EPI / DWI / fMRI series store each volume as ONE image (ImageType ``MOSAIC``) of
``m x m`` tiles, ``m = ceil(sqrt(NumberOfImagesInMosaic))``, filled row by row; the header's
ImagePositionPatient is that of the whole mosaic, not of a slice. The private CSA image header
(0029,1010) says how many tiles hold slices (``NumberOfImagesInMosaic``) and in which direction
they advance (``SliceNormalVector``). Read with nibabel's ``nicom.csareader``, the tiles are
placed as dcm2niix and nibabel's ``MosaicWrapper`` place them:

- tile size = mosaic size / m; the first slice's position = ImagePositionPatient moved by half
  the mosaic-minus-tile size along the column and row cosines (in pixels x PixelSpacing);
- slice k = the first slice + k x SpacingBetweenSlices (else SliceThickness) x SliceNormalVector.

Each tile becomes a :class:`~mmai.io.dicom_frames.Frame` with its own position, so the usual
loader (sorting along the normal, spacing checks, affine) builds the volume. Every mosaic that
cannot be placed (no CSA header, no tile count, tiles that do not fit, a slice normal that is
not normal to the tiles, no slice spacing) is refused with a :class:`DicomError` naming the
file and the reason, never read as one big slice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any

import numpy as np

from mmai.errors import DicomError
from mmai.io.dicom_frames import Frame, float_or

MOSAIC = "MOSAIC"
NORMAL_TOLERANCE = 0.01  # |cos| of the angle between SliceNormalVector and row x column cosines, from 1


def is_mosaic(image_type: Any) -> bool:
    """True for a Siemens mosaic (``MOSAIC`` among the ImageType values)."""
    return MOSAIC in tuple(str(v).strip().upper() for v in (image_type or ()))


def _csa(ds: Any, source: str) -> tuple[int | None, np.ndarray | None]:
    """(NumberOfImagesInMosaic, SliceNormalVector) from the CSA image header (None when absent)."""
    from nibabel.nicom import csareader

    why = "no CSA image header (0029,1010)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            csa = csareader.get_csa_header(ds, "image")
    except (csareader.CSAError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise DicomError(f"{source}: Siemens mosaic with an unreadable CSA image header ({exc}); mmai cannot "
                         "place its tiles (convert the series with dcm2niix)") from exc
    if csa is None:
        raise DicomError(f"{source}: Siemens mosaic (ImageType MOSAIC) with {why}; mmai cannot place its tiles "
                         "(convert the series with dcm2niix)")
    try:
        n = csareader.get_n_mosaic(csa)
        normal = csareader.get_slice_normal(csa)
    except (csareader.CSAError, ValueError, KeyError, TypeError, IndexError):
        n, normal = None, None
    return (int(n) if n else None), (np.asarray(normal, dtype=float) if normal is not None else None)


def mosaic_frames(ds: Any, frame: Frame) -> list[Frame]:
    """Split one decoded mosaic frame into its slices, each placed in patient space.

    Args:
        ds: the pydicom dataset (for the CSA header and the slice spacing).
        frame: the file's one frame, pixels decoded (``stored`` (rows, cols)).

    Returns:
        NumberOfImagesInMosaic frames of (rows / m, cols / m) pixels; ``source`` is
        ``<file>#<tile>`` (tile counted from 1, as for multi-frame files).

    Raises:
        DicomError: a mosaic mmai cannot place (one line naming the file and why).
    """
    src = frame.source
    n, normal = _csa(ds, src)
    if not n:
        raise DicomError(f"{src}: Siemens mosaic without NumberOfImagesInMosaic in its CSA image header; mmai "
                         "cannot place its tiles (convert the series with dcm2niix)")
    if normal is None or not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-6:
        raise DicomError(f"{src}: Siemens mosaic without a SliceNormalVector in its CSA image header; mmai cannot "
                         "tell which way its slices advance")
    if frame.ipp is None or frame.iop is None or frame.pixel_spacing is None:
        raise DicomError(f"{src}: Siemens mosaic without ImagePositionPatient / ImageOrientationPatient / "
                         "PixelSpacing; cannot place it in patient space")
    m = math.ceil(math.sqrt(n))
    rows, cols = frame.rows, frame.cols
    if rows % m or cols % m:
        raise DicomError(f"{src}: a {rows}x{cols} mosaic does not split into {m}x{m} equal tiles for "
                         f"NumberOfImagesInMosaic {n}; mmai cannot place its tiles")
    row_cos, col_cos = np.asarray(frame.iop[:3], float), np.asarray(frame.iop[3:], float)
    normal = normal / np.linalg.norm(normal)
    if abs(abs(float(normal @ np.cross(row_cos, col_cos))) - 1) > NORMAL_TOLERANCE:
        raise DicomError(f"{src}: the CSA SliceNormalVector {normal.round(4).tolist()} is not normal to the "
                         f"ImageOrientationPatient plane; mmai cannot place the mosaic's tiles")
    dz = float_or(getattr(ds, "SpacingBetweenSlices", None), 0.0) or float_or(getattr(ds, "SliceThickness", None), 0.0)
    if not dz > 0:
        raise DicomError(f"{src}: Siemens mosaic without SpacingBetweenSlices or SliceThickness; the distance "
                         "between its slices is unknown")
    tr, tc = rows // m, cols // m
    row_spacing, col_spacing = frame.pixel_spacing
    first = (np.asarray(frame.ipp, float) + col_cos * row_spacing * (rows - tr) / 2
             + row_cos * col_spacing * (cols - tc) / 2)
    stored = frame.read_stored()
    out = []
    for k in range(n):
        r, c = divmod(k, m)
        tile = np.ascontiguousarray(stored[r * tr:(r + 1) * tr, c * tc:(c + 1) * tc])
        out.append(replace(frame, source=f"{src}#{k + 1}", rows=tr, cols=tc, ipp=first + k * dz * normal,
                           stored=tile, slice_thickness=frame.slice_thickness, frame_index=k, pixel_offset=-1))
    return out
