"""Byte-level reader for the common case: one uncompressed little-endian grayscale frame.

It reads the first 16 KiB of the file, walks the data elements (skipping sequences) up to Pixel
Data (7FE0,0010) and keeps the few header values the loader needs plus the pixel offset: no
pydicom Dataset is built. The pixels are read later with ``readinto`` straight into the volume
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

from mmai.io.dicom_series import Frame

_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

# tag -> (name, kind); kind: "s" text, "f" DS list, "u" US.
_WANTED: dict[int, tuple[str, str]] = {
    0x00080008: ("image_type", "s"),
    0x00080060: ("modality", "s"),
    0x0008103E: ("series_description", "s"),
    0x00180050: ("slice_thickness", "f"),
    0x00200032: ("ipp", "f"),
    0x00200037: ("iop", "f"),
    0x00280002: ("samples", "u"),
    0x00280004: ("photometric", "s"),
    0x00280008: ("frames", "s"),
    0x00280010: ("rows", "u"),
    0x00280011: ("cols", "u"),
    0x00280030: ("pixel_spacing", "f"),
    0x00280100: ("bits_allocated", "u"),
    0x00280101: ("bits_stored", "u"),
    0x00280103: ("pixel_representation", "u"),
    0x00281052: ("intercept", "f"),
    0x00281053: ("slope", "f"),
    0x00283000: ("modality_lut", "x"),
}
_UNPACK_TAG_VR = struct.Struct("<HH2s").unpack_from
_UNPACK_TAG_LEN = struct.Struct("<HHI").unpack_from
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from


class _Unusual(Exception):
    """The file needs pydicom."""


def _skip_sequence(data: bytes, pos: int, explicit: bool) -> int:
    """Skip an undefined-length sequence body starting at ``pos``; return the position after it."""
    while True:
        group, elem, length = _UNPACK_TAG_LEN(data, pos)
        tag = (group << 16) | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Unusual
        pos = _skip_item(data, pos, explicit) if length == _UNDEFINED else pos + length


def _skip_item(data: bytes, pos: int, explicit: bool) -> int:
    """Skip the elements of an undefined-length item up to its delimiter."""
    while True:
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = (group << 16) | elem
        if tag == _ITEM_END:
            return pos + 8
        pos, _, _ = _next_element(data, pos, explicit)


def _next_element(data: bytes, pos: int, explicit: bool) -> tuple[int, int, int]:
    """Step over one element at ``pos``; return (next position, value start, value length)."""
    if explicit:
        group, elem, vr = _UNPACK_TAG_VR(data, pos)
        if vr in _LONG_VRS:
            length = _U32(data, pos + 8)[0]
            start = pos + 12
        else:
            length = _U16(data, pos + 6)[0]
            start = pos + 8
        if length == _UNDEFINED:
            # UN with undefined length is implicit-VR encoded inside (PS3.5 6.2.2).
            return _skip_sequence(data, start, explicit and vr != b"UN"), start, -1
    else:
        group, elem, length = _UNPACK_TAG_LEN(data, pos)
        start = pos + 8
        if length == _UNDEFINED:
            return _skip_sequence(data, start, False), start, -1
    end = start + length
    if end > len(data):
        raise _Unusual
    return end, start, length


def _parse(data: bytes) -> tuple[dict[str, Any], int, int, str]:
    """Header values, pixel value offset and length, transfer syntax; raises _Unusual."""
    if len(data) < 140 or data[128:132] != b"DICM":
        raise _Unusual
    pos = 132
    ts = ""
    while pos + 8 <= len(data) and _U16(data, pos)[0] == 0x0002:
        nxt, start, length = _next_element(data, pos, True)
        if _U16(data, pos + 2)[0] == 0x0010:
            ts = data[start:start + length].decode("ascii").strip(" \x00")
        pos = nxt
    if ts not in (_EXPLICIT_LE, _IMPLICIT_LE):
        raise _Unusual
    explicit = ts == _EXPLICIT_LE
    values: dict[str, Any] = {}
    n = len(data)
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = (group << 16) | elem
        if tag == _PIXEL_DATA:  # the value may lie beyond the bytes read so far
            length, start = (_U32(data, pos + 8)[0], pos + 12) if explicit else (_U32(data, pos + 4)[0], pos + 8)
            if length == _UNDEFINED or (explicit and data[pos + 4:pos + 6] not in (b"OW", b"OB")):
                raise _Unusual  # encapsulated, or an odd VR
            return values, start, length, ts
        nxt, start, length = _next_element(data, pos, explicit)
        spec = _WANTED.get(tag)
        if spec is not None:
            if length < 0 or spec[1] == "x":
                raise _Unusual
            raw = data[start:start + length]
            kind = spec[1]
            if kind == "u":
                if length != 2:
                    raise _Unusual
                values[spec[0]] = _U16(raw, 0)[0]
            else:
                text = raw.decode("latin-1").strip(" \x00")
                if kind == "f":
                    values[spec[0]] = [float(v) for v in text.split("\\") if v.strip()] if text else None
                else:
                    values[spec[0]] = text
        pos = nxt
    raise _Unusual  # no Pixel Data


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
        except (_Unusual, struct.error, UnicodeDecodeError, ValueError):
            if size <= len(data):
                return None
            data += fh.read()  # long header (e.g. big private sequences): parse the whole file
            try:
                v, offset, length, ts = _parse(data)
            except (_Unusual, struct.error, UnicodeDecodeError, ValueError):
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
