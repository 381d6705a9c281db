"""Header-only reading of one DICOM file into a plain, picklable record (used by dicom_scan).

Every file goes through :func:`read_header`, which never raises: a file is ``ok``,
``not_dicom`` (no DICM prefix and no plausible first tag), ``dicomdir`` or ``unreadable``
(with a one-line reason). The common case goes through the byte-level walk of
:mod:`mmai.io.dicom_scan_fast`; everything else through pydicom. Reading is bounded by design:
132 bytes decide whether a parser is called at all, both parsers stop before the pixel data and
only move forward through the file, so a corrupt length can make them read to the end of the
file but never loop.
The pixel-data element header is then checked against the file size, which catches truncated
files without reading the pixels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mmai.io.dicom_elements import DICOMDIR_SOP, SEQUENCE_DELIMITERS, pixel_check
from mmai.io.dicom_scan_fast import fast_header
from mmai.io.dicom_stacks import other_dimensions

log = logging.getLogger(__name__)

MIN_POOL_FILES = 1000  # below this, a pool's start-up costs more than it saves (benchmarks/dicom_scan.py)

SPECIFIC_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "Rows", "Columns", "ImageOrientationPatient", "ImagePositionPatient",
    "PixelSpacing", "SliceThickness", "ImageType", "AcquisitionNumber", "TemporalPositionIdentifier",
    "EchoNumbers", "TriggerTime", "InstanceNumber", "NumberOfFrames", "GantryDetectorTilt",
    "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation", "DiffusionBValue", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]


def _looks_like_raw_dicom(head: bytes) -> bool:
    """True if a file without the DICM prefix starts like a dataset (group 0002 or 0008)."""
    if len(head) < 8:
        return False
    for fmt in ("<HH", ">HH"):
        group, elem = struct.unpack(fmt, head[:4])
        if group in (0x0002, 0x0008) and elem < 0x0200:
            vr = head[4:6]
            if vr.isalpha() and vr.isupper():
                return True
            (length,) = struct.unpack(fmt[0] + "I", head[4:8])
            return length < 4096
    return False


def _val(ds: Any, kw: str, conv: Any = str) -> Any:
    """Value of ``kw`` converted by ``conv``; None if absent, empty or malformed."""
    try:
        elem = ds.get(kw)
        if elem is None or elem == "":
            return None
        return conv(elem)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, struct.error):
        return None


def _floats(n: int) -> Any:
    def conv(v: Any) -> tuple[float, ...] | None:
        vals = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__")
                                        and not isinstance(v, str) else [v]))
        if len(vals) != n or not all(abs(x) < 1e7 for x in vals):
            return None
        return vals
    return conv


def _ints(v: Any) -> list[int]:
    return [int(v)] if isinstance(v, int) else [int(x) for x in v]


def _first_of(item: Any, shared: Any, seq_kw: str, kw: str, conv: Any) -> Any:
    for src in (item, shared):
        if src is None:
            continue
        seq = src.get(seq_kw)
        if seq is not None and len(seq) > 0:
            v = _val(seq[0], kw, conv)
            if v is not None:
                return v
    return None


def _frames(ds: Any) -> list[dict[str, Any]] | None:
    """Per-frame geometry and phase keys of an enhanced multi-frame dataset (None if not one)."""
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    if not pf:
        return None
    sh_seq = ds.get("SharedFunctionalGroupsSequence")
    sh = sh_seq[0] if sh_seq else None
    dims = other_dimensions(ds)
    out = []
    for item in pf:
        fc = item.get("FrameContentSequence")
        fc0 = fc[0] if fc else None
        div = _val(fc0, "DimensionIndexValues", _ints) if fc0 is not None else None
        other = tuple(div[i] for i in dims if i < len(div)) if div else ()
        out.append({
            "dims": other or None,
            "ipp": _first_of(item, sh, "PlanePositionSequence", "ImagePositionPatient", _floats(3)),
            "iop": _first_of(item, sh, "PlaneOrientationSequence", "ImageOrientationPatient", _floats(6)),
            "pixel_spacing": _first_of(item, sh, "PixelMeasuresSequence", "PixelSpacing", _floats(2)),
            "stack_key": _val(fc0, "StackID") if fc0 is not None else None,
            "temporal": _val(fc0, "TemporalPositionIndex", int) if fc0 is not None else None,
            "echo": _first_of(item, sh, "MREchoSequence", "EffectiveEchoTime", float),
            "bvalue": _first_of(item, sh, "MRDiffusionSequence", "DiffusionBValue", float),
            "trigger": _first_of(item, sh, "CardiacSynchronizationSequence",
                                 "NominalCardiacTriggerDelayTime", float),
        })
    return out


def _pixel_problems(fp: Any, ds: Any, size: int, n_frames: int) -> tuple[bool, list[str]]:
    """pydicom path: check the element at the current position (see :func:`mmai.io.dicom_elements.pixel_check`)."""
    pos = fp.tell()
    head = fp.read(12)
    little = ds.original_encoding[1]
    info = {"rows": _val(ds, "Rows", int), "cols": _val(ds, "Columns", int),
            "bits": _val(ds, "BitsAllocated", int), "spp": _val(ds, "SamplesPerPixel", int) or 1,
            "photometric": str(_val(ds, "PhotometricInterpretation") or "")}
    return pixel_check(head, pos, fp, size, little is not False, n_frames, info)


def read_header(path: str, *, fast: bool = True) -> dict[str, Any]:
    """Read the header of one file. Never raises.

    Args:
        path: the file.
        fast: try the byte-level walk first (falls back to pydicom by itself); False = pydicom only.

    Returns:
        a record with ``path``, ``status`` (ok | not_dicom | dicomdir | unreadable), ``reason``
        and, when ok, the fields dicom_scan groups on (UIDs, geometry, phase keys, frames).
    """
    rec: dict[str, Any] = {"path": path, "status": "ok", "reason": ""}
    try:
        return _read_header(path, rec, fast)
    except Exception as exc:  # noqa: BLE001 - the per-file guard: any parser failure is a finding
        rec["status"] = "unreadable"
        rec["reason"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return rec


def _read_header(path: str, rec: dict[str, Any], fast: bool) -> dict[str, Any]:
    import pydicom

    size = os.path.getsize(path)
    with open(path, "rb") as fp:
        head = fp.read(132)
        if len(head) == 132 and head[128:132] == b"DICM":
            force = False
            if fast and fast_header(fp, size, rec) is not None:
                return rec
        elif _looks_like_raw_dicom(head):
            force = True
        else:
            rec["status"] = "not_dicom"
            return rec
        fp.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force, specific_tags=SPECIFIC_TAGS)
            meta = getattr(ds, "file_meta", None)
            ms = _val(meta, "MediaStorageSOPClassUID") if meta is not None else None
            if ms == DICOMDIR_SOP:
                rec["status"] = "dicomdir"
                return rec
            if not any(kw in ds for kw in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")):
                rec["status"] = "unreadable"
                rec["reason"] = ("header has no SOPClassUID, StudyInstanceUID or SeriesInstanceUID "
                                 f"(a {size}-byte file: truncated, or a fragment rather than a DICOM object)")
                return rec
            n_frames = _val(ds, "NumberOfFrames", int) or 1
            has_pixels, problems = _pixel_problems(fp, ds, size, n_frames)
            sop = _val(ds, "SOPClassUID") or ms or ""
            if not has_pixels and fp.tell() >= size:
                cut = _cut_inside(fp, force)
                if cut:
                    problems.append(cut)
                elif _is_image_class(sop):
                    problems.append(f"no pixel data in an {_uid_name(sop)} object (truncated header?)")
            rec.update(
                sop_class=_val(ds, "SOPClassUID") or ms, sop_uid=_val(ds, "SOPInstanceUID"),
                modality=_val(ds, "Modality"),
                patient_id=_val(ds, "PatientID"), study_uid=_val(ds, "StudyInstanceUID"),
                series_uid=_val(ds, "SeriesInstanceUID"), series_number=_val(ds, "SeriesNumber", int),
                series_description=_val(ds, "SeriesDescription"),
                rows=_val(ds, "Rows", int), cols=_val(ds, "Columns", int),
                iop=_val(ds, "ImageOrientationPatient", _floats(6)),
                ipp=_val(ds, "ImagePositionPatient", _floats(3)),
                pixel_spacing=_val(ds, "PixelSpacing", _floats(2)),
                thickness=_val(ds, "SliceThickness", float),
                image_type=_val(ds, "ImageType", lambda v: tuple(str(x).strip(" ") for x in (
                    [v] if isinstance(v, str) else v))),
                acq=_val(ds, "AcquisitionNumber", int), temporal=_val(ds, "TemporalPositionIdentifier", int),
                echo=_val(ds, "EchoNumbers", int), trigger=_val(ds, "TriggerTime", float),
                bvalue=_val(ds, "DiffusionBValue", float), instance=_val(ds, "InstanceNumber", int),
                n_frames=n_frames, tilt=_val(ds, "GantryDetectorTilt", float),
                transfer_syntax=_val(meta, "TransferSyntaxUID") if meta is not None else None,
                frames=_frames(ds),
                has_pixels=has_pixels, problems=problems,
            )
    if rec["frames"] is not None and len(rec["frames"]) != n_frames:
        rec["problems"].append(f"{len(rec['frames'])} per-frame items for {n_frames} frames")
        rec["frames"] = None
    return rec


def _cut_inside(fp: Any, force: bool) -> str:
    """For a file that ended without pixel data: '' if it ends on an element boundary, else why not.

    Parses the whole header once more (only such files: non-image objects or damaged ones) and
    checks that the last top-level element holds as many bytes as its length says, or, for an
    undefined-length sequence, that the file ends with the sequence delimiter.
    """
    import pydicom

    fp.seek(0)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
    tags = list(ds.keys())
    if not tags:
        return ""
    last = ds.get_item(max(tags))
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if getattr(last, "is_raw", False) and length not in (None, 0xFFFFFFFF) and isinstance(value, bytes):
        if len(value) < length:
            return f"file ends inside element {last.tag} ({len(value)} of {length} bytes): truncated"
        return ""
    if getattr(last, "is_undefined_length", False) or length == 0xFFFFFFFF:
        fp.seek(max(0, fp.seek(0, 2) - 8))
        if fp.read(8) not in SEQUENCE_DELIMITERS:
            return f"file ends inside sequence {last.tag} (no sequence delimiter): truncated"
    return ""


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name if uid else "unknown SOP class"


def _is_image_class(uid: str) -> bool:
    """True for SOP classes whose objects must carry pixel data (Image Storage classes)."""
    return _uid_name(uid).endswith("Image Storage")


class _DropBelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's value-validation warnings while scanning.

    They would flood the log for damaged files and can quote header values (PHI) verbatim;
    what matters reaches the index as a problems entry instead.
    """
    from pydicom import config

    logger = logging.getLogger("pydicom")
    flt = _DropBelowError()
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)
        config.settings.reading_validation_mode = old


def _read_many(paths: list[str]) -> list[dict[str, Any]]:
    return [read_header(p) for p in paths]


def _read_chunk_quiet(paths: list[str]) -> list[dict[str, Any]]:
    """Process-pool task: each worker process silences its own pydicom."""
    with quiet_pydicom():
        return _read_many(paths)


def read_headers(paths: list[str], *, workers: int = 1, progress: bool = False,
                 pool: str = "thread") -> list[dict[str, Any]]:
    """Read many headers, in input order, optionally in parallel.

    Args:
        paths: files to read.
        workers: >1 uses a pool; small inputs (< MIN_POOL_FILES) are read in-process.
        progress: tqdm bar on stderr (one tick per file).
        pool: "thread" (default) or "process".

    Returns:
        one record per path (see :func:`read_header`).

    Raises:
        ConfigError: unknown ``pool``.
    """
    from tqdm import tqdm

    if pool not in ("thread", "process"):
        from mmai.errors import ConfigError

        raise ConfigError(f"pool={pool!r} is not one of ['process', 'thread']")
    bar = tqdm(total=len(paths), unit="file", desc="scan", file=sys.stderr, disable=not progress)
    # pydicom's settings are process-global: set them once here (threads share them).
    with quiet_pydicom():
        try:
            if workers <= 1 or len(paths) < MIN_POOL_FILES:
                out = []
                for p in paths:
                    out.append(read_header(p))
                    bar.update(1)
                return out
            chunk = min(2048, max(64, -(-len(paths) // (4 * workers))))  # few big tasks: less IPC
            chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
            results: list[list[dict[str, Any]] | None] = [None] * len(chunks)
            ex: Executor = (ThreadPoolExecutor(max_workers=workers) if pool == "thread"
                            else ProcessPoolExecutor(max_workers=workers))
            task = _read_many if pool == "thread" else _read_chunk_quiet
            try:
                with ex:
                    futs = {ex.submit(task, c): i for i, c in enumerate(chunks)}
                    for fut in as_completed(futs):
                        results[futs[fut]] = fut.result()
                        bar.update(len(chunks[futs[fut]]))
            except BrokenProcessPool:
                log.warning("header-reader pool died; reading the remaining files in-process")
            for i, r in enumerate(results):
                if r is None:
                    results[i] = _read_many(chunks[i])
                    bar.update(len(chunks[i]))
            return [rec for r in results for rec in (r or [])]
        finally:
            bar.close()
