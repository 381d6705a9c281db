"""Byte-level reader for the common case: one uncompressed little-endian grayscale frame.

It reads the first 16 KiB of the file, walks the data elements up to Pixel Data (7FE0,0010)
with the shared walker (:func:`mmai.io.dicom_elements.walk`) and keeps the few header values
the loader needs plus the pixel offset: no pydicom Dataset is built. The pixels are read later with ``readinto`` straight into the volume
(or a scratch slice when they need rescaling), see ``Frame.read_stored``. Anything unusual (no preamble, compressed or
big-endian transfer syntax, more than one frame or sample, a Modality LUT, malformed bytes)
returns None, and the caller falls back to pydicom. The tests check that both paths give
bit-identical arrays.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from mmai.io.dicom_elements import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    UNDEFINED,
    NeedsPydicom,
    binary_value,
    pixel_element,
    read_meta,
    walk,
)
from mmai.io.dicom_frames import Frame

_PIXEL_DATA = 0x7FE00010
# tag -> (name, kind); kind: "s" text, "f" DS list, "US", "x" refuse (needs pydicom).
_WANTED: dict[int, tuple[str, str]] = {
    0x00080008: ("image_type", "s"),
    0x00080060: ("modality", "s"),
    0x0008103E: ("series_description", "s"),
    0x00180050: ("slice_thickness", "f"),
    0x00200032: ("ipp", "f"),
    0x00200037: ("iop", "f"),
    0x00280002: ("samples", "US"),
    0x00280004: ("photometric", "s"),
    0x00280008: ("frames", "s"),
    0x00280010: ("rows", "US"),
    0x00280011: ("cols", "US"),
    0x00280030: ("pixel_spacing", "f"),
    0x00280100: ("bits_allocated", "US"),
    0x00280101: ("bits_stored", "US"),
    0x00280103: ("pixel_representation", "US"),
    0x00281052: ("intercept", "f"),
    0x00281053: ("slope", "f"),
    0x00283000: ("modality_lut", "x"),
}


def _value(raw: bytes, kind: str) -> Any:
    if kind in ("US", "x"):
        return binary_value(raw, kind)
    text = raw.decode("latin-1").strip(" \x00")
    if kind == "f":
        return [float(v) for v in text.split("\\") if v.strip()] if text else None
    return text


def _parse(data: bytes) -> tuple[dict[str, Any], int, int, str]:
    """Header values, pixel value offset and length, transfer syntax; raises NeedsPydicom."""
    pos, ts, _ = read_meta(data)
    if ts not in (EXPLICIT_LE, IMPLICIT_LE):
        raise NeedsPydicom
    explicit = ts == EXPLICIT_LE
    raw, pos = walk(data, pos, explicit, _WANTED)
    tag, hdr, length, vr = pixel_element(data[pos:pos + 12], True, explicit)
    if tag != _PIXEL_DATA or length == UNDEFINED or (explicit and vr not in (b"OW", b"OB")):
        raise NeedsPydicom  # float pixel data, encapsulated, or an odd VR
    values = {_WANTED[t][0]: _value(v, _WANTED[t][1]) for t, v in raw.items()}
    return values, pos + hdr, length, ts


_HEAD = 16384  # bytes read first; enough for the header of almost every file


def read_frame_fast(path: str) -> Frame | None:
    """Header of one uncompressed single-frame grayscale file; pixels stay in the file (lazy).

    Returns None if the file needs pydicom (see the module docstring).
    """
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(_HEAD)
        try:
            v, offset, length, ts = _parse(data)
        except (NeedsPydicom, struct.error, UnicodeDecodeError, ValueError):
            if size <= len(data):
                return None
            data += fh.read()  # long header (e.g. big private sequences): parse the whole file
            try:
                v, offset, length, ts = _parse(data)
            except (NeedsPydicom, struct.error, UnicodeDecodeError, ValueError):
                return None
    rows, cols = v.get("rows"), v.get("cols")
    ba = v.get("bits_allocated")
    frames = v.get("frames")
    if (not rows or not cols or ba not in (8, 16, 32) or v.get("samples", 1) != 1
            or (frames and frames.strip() not in ("", "1"))
            or v.get("photometric", "MONOCHROME2") not in ("MONOCHROME1", "MONOCHROME2")):
        return None
    signed = v.get("pixel_representation", 0) == 1
    dtype = np.dtype(("<i" if signed else "<u") + str(ba // 8))
    nbytes = rows * cols * dtype.itemsize
    if length < nbytes or offset + nbytes > size:
        return None
    bits_stored = v.get("bits_stored", ba)
    ipp, iop, ps = v.get("ipp"), v.get("iop"), v.get("pixel_spacing")
    slope, intercept, thick = v.get("slope"), v.get("intercept"), v.get("slice_thickness")
    return Frame(
        source=path, rows=rows, cols=cols,
        ipp=np.array(ipp) if ipp and len(ipp) == 3 else None,
        iop=np.array(iop) if iop and len(iop) == 6 else None,
        pixel_spacing=(ps[0], ps[1]) if ps and len(ps) == 2 else None,
        slope=slope[0] if slope else 1.0, intercept=intercept[0] if intercept else 0.0,
        photometric=v.get("photometric", "MONOCHROME2"), bits_stored=bits_stored, stored=None,
        slice_thickness=(thick[0] or None) if thick else None,
        image_type=tuple(s.strip().upper() for s in v.get("image_type", "").split("\\") if s.strip()),
        modality=v.get("modality", ""), series_description=v.get("series_description", ""),
        transfer_syntax=ts, pixel_offset=offset, pixel_dtype=dtype.str,
        unused_bits=ba - bits_stored if 0 < bits_stored < ba else 0,
    )
