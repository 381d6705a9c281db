"""The one byte-level DICOM element walker, for headers (scan) and pixels (loader).

Part 10 files whose dataset is little endian, explicit or implicit VR: :func:`read_meta` reads
the file meta group, :func:`walk` steps over the dataset's elements (skipping sequences, also
undefined-length ones) up to Pixel Data and returns the raw bytes of the wanted tags plus the
Pixel Data element's offset; :func:`pixel_element` reads that element's header and
:func:`pixel_check` checks it against the file size. No pydicom Dataset is built. Anything
unusual (unknown VR, a wanted value of undefined length or beyond the bytes given, no Pixel
Data) raises :class:`NeedsPydicom` and the caller falls back to pydicom. Every loop advances by
at least 8 bytes and checks its bounds, so damaged files cannot make it hang.

Users: :mod:`mmai.io.dicom_scan_fast` (header records for ``mmai scan``) and
:mod:`mmai.io.dicom_fastread` (the loader's header + pixel offset).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DICOMDIR_SOP = "1.2.840.10008.1.3.10"
#: VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                      b"UT", b"UV"})
SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                       b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
UNDEFINED = 0xFFFFFFFF
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float, Double Float
_PIXEL_ELEMS = (0x0010, 0x0008, 0x0009)
_SEQ_DELIM_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQ_DELIM_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"
#: The Sequence Delimitation Item with a zero length, little and big endian.
SEQUENCE_DELIMITERS = (_SEQ_DELIM_LE, _SEQ_DELIM_BE)

U16 = struct.Struct("<H").unpack_from
U32 = struct.Struct("<I").unpack_from
_TAG_LEN = struct.Struct("<HHI").unpack_from
_HDR = struct.Struct("<HH2sH").unpack_from


class NeedsPydicom(Exception):
    """The bytes are outside what the walker handles; read the file with pydicom."""


def binary_value(raw: bytes, kind: str) -> int | float:
    """A binary value: kind "US" (2 bytes) or "FD" (8 bytes); NeedsPydicom for "x" (a tag the
    caller refuses to handle), another kind or a value of the wrong length (VM > 1 included)."""
    size = {"US": 2, "FD": 8}.get(kind)
    if size is None or len(raw) != size:
        raise NeedsPydicom
    return U16(raw, 0)[0] if kind == "US" else struct.unpack("<d", raw)[0]


def skip_undefined(data: bytes, pos: int, explicit: bool) -> int:
    """Skip an undefined-length value (items up to the sequence delimiter); return the end."""
    while True:
        if pos + 8 > len(data):
            raise NeedsPydicom
        group, elem, length = _TAG_LEN(data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise NeedsPydicom
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # undefined-length item: elements up to the item delimiter
            if pos + 8 > len(data):
                raise NeedsPydicom
            if U16(data, pos) == (0xFFFE,) and U16(data, pos + 2) == (0xE00D,):
                pos += 8
                break
            pos = element(data, pos, explicit)[0]


def element(data: bytes, pos: int, explicit: bool) -> tuple[int, int, int, bytes]:
    """One element at ``pos`` -> (next position, value start, length (-1 undefined), VR or b'')."""
    if pos + 8 > len(data):
        raise NeedsPydicom
    if explicit:
        group, elem, vr, length = _HDR(data, pos)
        if vr in SHORT_VRS:
            start = pos + 8
        elif vr in LONG_VRS:
            length = U32(data, pos + 8)[0]
            start = pos + 12
        else:
            raise NeedsPydicom  # unknown or damaged VR
    else:
        group, elem, length = _TAG_LEN(data, pos)
        start, vr = pos + 8, b""
    if length == UNDEFINED:
        if ((group << 16) | elem) in PIXEL_TAGS:
            return start, start, -1, vr
        return skip_undefined(data, start, explicit and vr != b"UN"), start, -1, vr
    return start + length, start, length, vr


def read_meta(data: bytes) -> tuple[int, str, str]:
    """File meta group of a Part 10 file -> (dataset start, TransferSyntaxUID, MediaStorageSOPClassUID).

    Raises:
        NeedsPydicom: no 'DICM' prefix at byte 128.
    """
    if len(data) < 140 or data[128:132] != b"DICM":
        raise NeedsPydicom
    pos, ts, ms = 132, "", ""
    while pos + 8 <= len(data) and U16(data, pos)[0] == 0x0002:
        nxt, start, length, _ = element(data, pos, True)
        el = U16(data, pos + 2)[0]
        if el in (0x0002, 0x0010) and length >= 0:
            v = data[start:start + length].decode("ascii").strip(" \x00")
            ts, ms = (v, ms) if el == 0x0010 else (ts, v)
        pos = nxt
    return pos, ts, ms


def walk(data: bytes, pos: int, explicit: bool, wanted: Mapping[int, Any]) -> tuple[dict[int, bytes], int]:
    """Elements from ``pos`` up to Pixel Data -> ({wanted tag: raw value bytes}, Pixel Data offset).

    Raises:
        NeedsPydicom: Pixel Data not reached within ``data``, a wanted tag with an undefined length
            or a value beyond ``data``, or an unknown VR.
    """
    vals: dict[int, bytes] = {}
    n = len(data)
    while True:
        if pos + 12 > n:
            raise NeedsPydicom  # Pixel Data not reached in this buffer (or no pixel data at all)
        if explicit:
            group, elem, vr, length = _HDR(data, pos)
        else:
            group, elem, length = _TAG_LEN(data, pos)
        if group == 0x7FE0 and elem in _PIXEL_ELEMS:
            return vals, pos
        tag = (group << 16) | elem
        if not explicit or vr in SHORT_VRS:
            start = pos + 8
        elif vr in LONG_VRS:
            length = U32(data, pos + 8)[0]
            start = pos + 12
        else:
            raise NeedsPydicom
        if length == UNDEFINED:  # (a 16-bit short-VR length never is)
            if tag in wanted:
                raise NeedsPydicom
            pos = skip_undefined(data, start, explicit and vr != b"UN")
            continue
        nxt = start + length
        if tag in wanted:
            if nxt > n:
                raise NeedsPydicom
            vals[tag] = data[start:nxt]
        pos = nxt


def pixel_element(head: bytes, little: bool = True, explicit: bool | None = None) -> tuple[int, int, int, bytes]:
    """Header of the Pixel Data element in ``head`` (its first 12 bytes or more).

    Args:
        head: the bytes at the element.
        little: byte order.
        explicit: the dataset's VR form; None reads it from the bytes (pydicom silently switches
            when a file lies about it, so the scan checks what is really there).

    Returns:
        (tag, header length 8 or 12, value length (UNDEFINED if encapsulated), VR or b'').
    """
    e = "<" if little else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    vr = head[4:6]
    if explicit is None:
        explicit = vr.isalpha() and vr.isupper()
    if not explicit:
        return (group << 16) | elem, 8, struct.unpack(e + "I", head[4:8])[0], b""
    if vr in LONG_VRS:
        return (group << 16) | elem, 12, struct.unpack(e + "I", head[8:12])[0], vr
    return (group << 16) | elem, 8, struct.unpack(e + "H", head[6:8])[0], vr


def pixel_check(head: bytes, pos: int, fp: Any, size: int, little: bool, n_frames: int,
                info: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """Check the Pixel Data element header at file offset ``pos`` against the file size.

    Args:
        head: the first 12 bytes at ``pos``.
        fp: the open file (read only for encapsulated data: its last 256 bytes).
        size: the file size.
        little: byte order of the dataset.
        n_frames: NumberOfFrames.
        info: rows, cols, bits (BitsAllocated), spp (SamplesPerPixel), photometric.

    Returns:
        (has_pixels, problems)
    """
    if len(head) < 8:
        return False, []
    group, elem = struct.unpack(("<" if little else ">") + "HH", head[:4])
    if ((group << 16) | elem) not in PIXEL_TAGS:
        return False, []
    if len(head) < 12 and head[4:6] in LONG_VRS:
        return True, ["pixel data element cut off"]
    _, hdr, length, _ = pixel_element(head, little)
    if length == UNDEFINED:
        fp.seek(max(pos, size - 256))
        tail = fp.read()
        if _SEQ_DELIM_LE not in tail and _SEQ_DELIM_BE not in tail:
            return True, ["encapsulated pixel data has no end marker (truncated?)"]
        return True, []
    present = size - pos - hdr
    if length > present:
        return True, [f"pixel data truncated (header says {length} bytes, file has {present})"]
    rows, cols, bits, spp = info["rows"], info["cols"], info["bits"], info["spp"] or 1
    if rows and cols and bits:
        n = rows * cols * spp * max(n_frames, 1)
        if spp == 3 and str(info["photometric"]).endswith("_422"):
            n = n * 2 // 3  # 4:2:2 subsampled chroma
        expected = (n + 7) // 8 if bits == 1 else n * ((bits + 7) // 8)
        if length < expected:
            return True, [f"pixel data too short ({length} bytes, Rows x Columns x frames needs {expected})"]
    return True, []
