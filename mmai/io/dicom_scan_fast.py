"""Byte-level DICOM header walk for dicom_scan: the common case without building a pydicom Dataset.

Handles Part 10 files whose dataset is little endian (explicit or implicit VR, any encapsulated
transfer syntax), with no enhanced multi-frame functional groups and a plain character set
(ASCII, Latin-1 or UTF-8). It reads the first 8 KiB (then 256 KiB) of the file, walks the
elements up to Pixel Data, and decodes only the tags dicom_scan groups on. Anything else, and
any malformed byte, returns None so the caller uses pydicom; the two paths give identical
records (tests/io/test_dicom_scan.py checks it on pydicom's test files). Every loop advances
by at least 8 bytes and checks its bounds, so damaged files cannot make it hang.
"""

from __future__ import annotations

import struct
from typing import Any

DICOMDIR_SOP = "1.2.840.10008.1.3.10"
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN", b"SV", b"UV"}

# Byte-level header walk for the common case (Part 10 file, little-endian dataset, no enhanced
# multi-frame functional groups, plain character set). Anything else -> None -> pydicom path.
# test_dicom_scan checks that both paths give identical records.

_FAST_BYTES = (8192, 262144)  # first read, second (larger) read if Pixel Data was not reached
_DEFLATE_OR_BE = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
_PLAIN_CHARSETS = {"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 192"}
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_TAG_VR = struct.Struct("<HH2s").unpack_from
_TAG_LEN = struct.Struct("<HHI").unpack_from
_HDR = struct.Struct("<HH2sH").unpack_from
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
# tag -> (record key, kind): s text, u UI, i IS, f DS, F DS list, H US, d FD, t ImageType
_FAST_TAGS: dict[int, tuple[str, str]] = {
    0x00080005: ("charset", "s"), 0x00080008: ("image_type", "t"), 0x00080016: ("sop_class", "u"),
    0x00080018: ("sop_uid", "u"), 0x00080060: ("modality", "s"), 0x0008103E: ("series_description", "s"),
    0x00100020: ("patient_id", "s"), 0x00180050: ("thickness", "f"), 0x00180086: ("echo", "i"),
    0x00181060: ("trigger", "f"), 0x00181120: ("tilt", "f"), 0x00189087: ("bvalue", "d"),
    0x0020000D: ("study_uid", "u"), 0x0020000E: ("series_uid", "u"), 0x00200011: ("series_number", "i"),
    0x00200012: ("acq", "i"), 0x00200013: ("instance", "i"), 0x00200032: ("ipp", "F3"),
    0x00200037: ("iop", "F6"), 0x00200100: ("temporal", "i"), 0x00280002: ("spp", "H"),
    0x00280004: ("photometric", "s"), 0x00280008: ("n_frames", "i"), 0x00280010: ("rows", "H"),
    0x00280011: ("cols", "H"), 0x00280030: ("pixel_spacing", "F2"), 0x00280100: ("bits", "H"),
    0x52009229: ("functional_groups", "x"), 0x52009230: ("functional_groups", "x"),
}


class _Slow(Exception):
    """This file needs the pydicom path."""


def _skip_undefined(data: bytes, pos: int, explicit: bool) -> int:
    """Skip an undefined-length value (items up to the sequence delimiter); return the end."""
    while True:
        if pos + 8 > len(data):
            raise _Slow
        group, elem, length = _TAG_LEN(data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise _Slow
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while True:  # undefined-length item: elements up to the item delimiter
            if pos + 8 > len(data):
                raise _Slow
            if _U16(data, pos) == (0xFFFE,) and _U16(data, pos + 2) == (0xE00D,):
                pos += 8
                break
            pos = _step(data, pos, explicit)[0]


def _step(data: bytes, pos: int, explicit: bool) -> tuple[int, int, int, bytes]:
    """One element at ``pos`` -> (next position, value start, length (-1 undefined), VR)."""
    if explicit:
        group, elem, vr = _TAG_VR(data, pos)
        if vr in _LONG_VRS or not vr.isalpha():
            if not vr.isalpha():
                raise _Slow
            length = _U32(data, pos + 8)[0]
            start = pos + 12
        else:
            length = _U16(data, pos + 6)[0]
            start = pos + 8
    else:
        group, elem, length = _TAG_LEN(data, pos)
        start, vr = pos + 8, b""
    if length == 0xFFFFFFFF:
        if (group, elem) == (0x7FE0, 0x0010):
            return start, start, -1, vr
        return _skip_undefined(data, start, explicit and vr != b"UN"), start, -1, vr
    return start + length, start, length, vr


def _fast_value(raw: bytes, kind: str) -> Any:
    if kind == "H":
        if len(raw) != 2:
            raise _Slow
        return _U16(raw, 0)[0]
    if kind == "d":
        if len(raw) != 8:
            raise _Slow
        return struct.unpack("<d", raw)[0]
    text = raw.decode("utf-8").strip(" \x00")
    if not text:
        return None
    if kind in ("s", "u"):
        if "\\" in text:
            raise _Slow
        return text
    if kind == "t":
        return tuple(v.strip(" ") for v in text.split("\\"))
    if kind == "i":
        return int(text)
    if kind == "f":
        return float(text)
    vals = tuple(float(v) for v in text.split("\\"))  # F<n>
    if len(vals) != int(kind[1]) or not all(abs(x) < 1e7 for x in vals):
        raise _Slow
    return vals


def fast_header(fp: Any, size: int, rec: dict[str, Any]) -> dict[str, Any] | None:
    """Fill ``rec`` from raw bytes; None if the file needs pydicom."""
    for limit in _FAST_BYTES:
        fp.seek(0)
        data = fp.read(limit)
        try:
            return _fast_parse(data, fp, size, rec)
        except _Slow:
            if len(data) >= size or limit == _FAST_BYTES[-1]:
                return None
        except (struct.error, ValueError, UnicodeDecodeError, IndexError, RecursionError):
            return None
    return None


def _walk_elements(data: bytes, pos: int, explicit: bool) -> dict[str, Any]:
    """Little-endian elements (explicit or implicit VR) from ``pos`` to Pixel Data -> wanted values."""
    vals: dict[str, Any] = {}
    n = len(data)
    wanted = _FAST_TAGS
    while True:
        if pos + 12 > n:
            raise _Slow  # Pixel Data not reached in this buffer (or no pixel data at all)
        if explicit:
            group, elem, vr, length = _HDR(data, pos)
        else:
            group, elem, length = _TAG_LEN(data, pos)
        if group == 0x7FE0 and elem in (0x0010, 0x0008, 0x0009):
            vals["_pixel_pos"] = pos
            return vals
        tag = (group << 16) | elem
        if not explicit or vr in _SHORT_VRS:
            start = pos + 8
        elif vr in _LONG_VRS:
            length = _U32(data, pos + 8)[0]
            start = pos + 12
        else:
            raise _Slow
        if length == 0xFFFFFFFF:  # (a 16-bit short-VR length never is)
            if tag in wanted:
                raise _Slow
            pos = _skip_undefined(data, start, explicit and vr != b"UN")
            continue
        nxt = start + length
        spec = wanted.get(tag)
        if spec is not None:
            if spec[1] == "x" or nxt > n:
                raise _Slow
            vals[spec[0]] = _fast_value(data[start:nxt], spec[1])
        pos = nxt


def _fast_parse(data: bytes, fp: Any, size: int, rec: dict[str, Any]) -> dict[str, Any]:
    pos, ts, ms = 132, "", ""
    while pos + 8 <= len(data) and _U16(data, pos)[0] == 0x0002:
        nxt, start, length, _ = _step(data, pos, True)
        el = _U16(data, pos + 2)[0]
        if el in (0x0002, 0x0010):
            v = data[start:start + length].decode("ascii").strip(" \x00")
            ts, ms = (v, ms) if el == 0x0010 else (ts, v)
        pos = nxt
    if not ts or ts in _DEFLATE_OR_BE or ms == DICOMDIR_SOP:
        raise _Slow
    explicit = ts != "1.2.840.10008.1.2"
    vals = _walk_elements(data, pos, explicit)
    pos = vals.pop("_pixel_pos")
    if (vals.get("charset") or "") not in _PLAIN_CHARSETS:
        raise _Slow
    if not any(vals.get(k) for k in ("sop_class", "study_uid", "series_uid")):
        raise _Slow
    head = data[pos:pos + 12]
    n_frames = vals.get("n_frames") or 1
    info = {"rows": vals.get("rows"), "cols": vals.get("cols"), "bits": vals.get("bits"),
            "spp": vals.get("spp") or 1, "photometric": vals.get("photometric") or ""}
    from mmai.io.dicom_scan_read import pixel_check

    has_pixels, problems = pixel_check(head, pos, fp, size, True, n_frames, info)
    rec.update({k: vals.get(k) for k in (
        "sop_uid", "modality", "patient_id", "study_uid", "series_uid", "series_number",
        "series_description", "rows", "cols", "iop", "ipp", "pixel_spacing", "thickness", "image_type",
        "acq", "temporal", "echo", "trigger", "bvalue", "instance", "tilt")})
    rec.update(sop_class=vals.get("sop_class") or ms or None, n_frames=n_frames, transfer_syntax=ts,
               frames=None, has_pixels=has_pixels, problems=problems)
    return rec
