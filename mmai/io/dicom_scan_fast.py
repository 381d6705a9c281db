"""Header records for dicom_scan from the byte walker (:mod:`mmai.io.dicom_elements`), no pydicom.

Handles Part 10 files whose dataset is little endian (explicit or implicit VR, any encapsulated
transfer syntax), with no enhanced multi-frame functional groups and a plain character set
(ASCII, Latin-1 or UTF-8). It reads the first 8 KiB (then 256 KiB) of the file, walks the
elements up to Pixel Data with :func:`mmai.io.dicom_elements.walk`, and decodes only the tags
dicom_scan groups on. Anything else, and
any malformed byte, returns None so the caller uses pydicom; the two paths give identical
records (tests/io/test_dicom_scan.py checks it on pydicom's test files).
"""

from __future__ import annotations

import struct
from typing import Any

from mmai.io.dicom_elements import (
    DICOMDIR_SOP,
    IMPLICIT_LE,
    NeedsPydicom,
    binary_value,
    pixel_check,
    read_meta,
    walk,
)

_FAST_BYTES = (8192, 262144)  # first read, second (larger) read if Pixel Data was not reached
_DEFLATE_OR_BE = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}
_PLAIN_CHARSETS = {"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 192"}
# tag -> (record key, kind): s text, u UI, i IS, f DS, F<n> DS list, US, FD, t ImageType, x refuse
_FAST_TAGS: dict[int, tuple[str, str]] = {
    0x00080005: ("charset", "s"), 0x00080008: ("image_type", "t"), 0x00080016: ("sop_class", "u"),
    0x00080018: ("sop_uid", "u"), 0x00080060: ("modality", "s"), 0x0008103E: ("series_description", "s"),
    0x00100020: ("patient_id", "s"), 0x00180050: ("thickness", "f"), 0x00180086: ("echo", "i"),
    0x00181060: ("trigger", "f"), 0x00181120: ("tilt", "f"), 0x00189087: ("bvalue", "FD"),
    0x0020000D: ("study_uid", "u"), 0x0020000E: ("series_uid", "u"), 0x00200011: ("series_number", "i"),
    0x00200012: ("acq", "i"), 0x00200013: ("instance", "i"), 0x00200032: ("ipp", "F3"),
    0x00200037: ("iop", "F6"), 0x00200100: ("temporal", "i"), 0x00280002: ("spp", "US"),
    0x00280004: ("photometric", "s"), 0x00280008: ("n_frames", "i"), 0x00280010: ("rows", "US"),
    0x00280011: ("cols", "US"), 0x00280030: ("pixel_spacing", "F2"), 0x00280100: ("bits", "US"),
    0x52009229: ("functional_groups", "x"), 0x52009230: ("functional_groups", "x"),
}


def _fast_value(raw: bytes, kind: str) -> Any:
    if kind in ("US", "FD", "x"):
        return binary_value(raw, kind)
    text = raw.decode("utf-8").strip(" \x00")
    if not text:
        return None
    if kind in ("s", "u"):
        if "\\" in text:
            raise NeedsPydicom
        return text
    if kind == "t":
        return tuple(v.strip(" ") for v in text.split("\\"))
    if kind == "i":
        return int(text)
    if kind == "f":
        return float(text)
    vals = tuple(float(v) for v in text.split("\\"))  # F<n>
    if len(vals) != int(kind[1]) or not all(abs(x) < 1e7 for x in vals):
        raise NeedsPydicom
    return vals


def fast_header(fp: Any, size: int, rec: dict[str, Any]) -> dict[str, Any] | None:
    """Fill ``rec`` from raw bytes; None if the file needs pydicom."""
    for limit in _FAST_BYTES:
        fp.seek(0)
        data = fp.read(limit)
        try:
            return _fast_parse(data, fp, size, rec)
        except NeedsPydicom:
            if len(data) >= size or limit == _FAST_BYTES[-1]:
                return None
        except (struct.error, ValueError, UnicodeDecodeError, IndexError, RecursionError):
            return None
    return None


def _fast_parse(data: bytes, fp: Any, size: int, rec: dict[str, Any]) -> dict[str, Any]:
    pos, ts, ms = read_meta(data)
    if not ts or ts in _DEFLATE_OR_BE or ms == DICOMDIR_SOP:
        raise NeedsPydicom
    raw, pos = walk(data, pos, ts != IMPLICIT_LE, _FAST_TAGS)
    vals = {_FAST_TAGS[t][0]: _fast_value(v, _FAST_TAGS[t][1]) for t, v in raw.items()}
    if (vals.get("charset") or "") not in _PLAIN_CHARSETS:
        raise NeedsPydicom
    if not any(vals.get(k) for k in ("sop_class", "study_uid", "series_uid")):
        raise NeedsPydicom
    head = data[pos:pos + 12]
    n_frames = vals.get("n_frames") or 1
    info = {"rows": vals.get("rows"), "cols": vals.get("cols"), "bits": vals.get("bits"),
            "spp": vals.get("spp") or 1, "photometric": vals.get("photometric") or ""}
    has_pixels, problems = pixel_check(head, pos, fp, size, True, n_frames, info)
    rec.update({k: vals.get(k) for k in (
        "sop_uid", "modality", "patient_id", "study_uid", "series_uid", "series_number",
        "series_description", "rows", "cols", "iop", "ipp", "pixel_spacing", "thickness", "image_type",
        "acq", "temporal", "echo", "trigger", "bvalue", "instance", "tilt")})
    rec.update(sop_class=vals.get("sop_class") or ms or None, n_frames=n_frames, transfer_syntax=ts,
               frames=None, has_pixels=has_pixels, problems=problems)
    return rec
