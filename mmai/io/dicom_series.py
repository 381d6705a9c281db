"""One DICOM series (a list of single-frame files, or one enhanced multi-frame file) -> volume.

``load_series`` sorts slices along the slice normal (never by InstanceNumber), applies per-slice
RescaleSlope/Intercept, inverts MONOCHROME1, detects missing slices, uneven spacing, duplicate
positions and gantry tilt, and returns the (I, J, K) array with a voxel -> RAS affine.
Uncompressed little-endian files go through a byte-level fast path
(:mod:`mmai.io.dicom_fastread`); everything else through pydicom and its pixel handlers.
See docs/dicom.md for every case, its option and the reference tool the tests compare against.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mmai.errors import DicomError
from mmai.io.dicom_geometry import (
    StackGeometry,
    describe_gaps,
    deshear,
    orientation_label,
    resample_even,
    stack_geometry,
)

logger = logging.getLogger(__name__)

UNEVEN_CHOICES = ("warn", "resample", "error")
TILT_CHOICES = ("shear", "resample")
DTYPE_CHOICES = ("float32", "native")
T = TypeVar("T")


@dataclass
class DicomVolume:
    """A loaded volume in the shared convention.

    Attributes:
        array: (I, J, K) float32 (or an integer dtype with ``dtype="native"``); i along the row
            cosine, j along the column cosine, k ascending along the slice normal.
        affine: (4, 4) float64, voxel (i, j, k, 1) -> RAS mm.
        warnings: human-readable problems found (gaps, tilt, dropped localizers ...).
        meta: non-identifying facts only (modality, spacing, shape, orientation, tilt_deg ...).
    """

    array: np.ndarray
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Frame:
    """One 2D frame: its geometry, pixel encoding and stored (not yet rescaled) pixels.

    ``stored`` is (rows, cols) = (J, I) in the file's integer dtype, or None when the fast path
    left the pixels in the file: then ``pixel_offset`` / ``pixel_dtype`` say where they are and
    ``unused_bits`` how many high bits to clear (sign-extending) after reading. ``stack_key``
    groups the frames of a multi-frame file (StackID, temporal index, echo time, orientation).
    """

    source: str
    rows: int
    cols: int
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    photometric: str
    bits_stored: int
    stored: np.ndarray | None
    slice_thickness: float | None = None
    image_type: tuple[str, ...] = ()
    modality: str = ""
    series_description: str = ""
    transfer_syntax: str = ""
    stack_key: tuple[Any, ...] = ()
    frame_index: int = 0
    pixel_offset: int = -1
    pixel_dtype: str = ""
    unused_bits: int = 0

    def read_stored(self, out: np.ndarray | None = None) -> np.ndarray:
        """(rows, cols) stored values; read from the file (into ``out`` if given) when lazy."""
        if self.stored is not None:
            return self.stored
        dtype = np.dtype(self.pixel_dtype)
        arr = np.empty((self.rows, self.cols), dtype=dtype) if out is None else out
        with open(self.source, "rb", buffering=0) as fh:
            fh.seek(self.pixel_offset)
            got = fh.readinto(arr.data.cast("B"))
        if got != arr.nbytes:
            raise DicomError(f"{self.source}: pixel data truncated: read {got} of {arr.nbytes} bytes")
        if self.unused_bits:  # same correction as pydicom: clear unused high bits, sign-extend if signed
            np.left_shift(arr, self.unused_bits, out=arr)
            np.right_shift(arr, self.unused_bits, out=arr)
        return arr


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DicomError(f"load_series: {name}={value!r} is not allowed; choose one of {list(allowed)}")


def _float(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    return float(value)


def frames_from_dataset(ds: Any, source: str) -> list[Frame]:
    """Frames of a single-frame pydicom dataset (pixels decoded by pydicom's handlers)."""
    ts_uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    ts = str(ts_uid or "")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, TypeError) as exc:
        name = getattr(ts_uid, "name", "unknown")
        raise DicomError(
            f"{source}: cannot decode pixel data (transfer syntax {ts} {name}): {exc}. Decoders in use: "
            f"pydicom's own, pylibjpeg (-libjpeg, -openjpeg, -rle) and python-gdcm; install the one "
            f"for this transfer syntax or convert the file (e.g. gdcmconv --raw)"
        ) from exc
    if pixels.ndim != 2:
        raise DicomError(f"{source}: expected one grayscale frame, got pixel array shape {pixels.shape} "
                         f"(SamplesPerPixel {getattr(ds, 'SamplesPerPixel', '?')}); colour images are not volumes")
    slope = _float(getattr(ds, "RescaleSlope", None), 1.0)
    intercept = _float(getattr(ds, "RescaleIntercept", None), 0.0)
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        from pydicom.pixels import apply_modality_lut

        pixels = np.asarray(apply_modality_lut(pixels, ds))
        slope, intercept = 1.0, 0.0
    ipp = getattr(ds, "ImagePositionPatient", None)
    iop = getattr(ds, "ImageOrientationPatient", None)
    ps = getattr(ds, "PixelSpacing", None)
    return [Frame(
        source=source, rows=int(ds.Rows), cols=int(ds.Columns),
        ipp=np.array([float(v) for v in ipp]) if ipp else None,
        iop=np.array([float(v) for v in iop]) if iop else None,
        pixel_spacing=(float(ps[0]), float(ps[1])) if ps else None,
        slope=slope, intercept=intercept,
        photometric=str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")),
        bits_stored=int(getattr(ds, "BitsStored", pixels.dtype.itemsize * 8)),
        stored=pixels,
        slice_thickness=_float(getattr(ds, "SliceThickness", None), 0.0) or None,
        image_type=tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or ())),
        modality=str(getattr(ds, "Modality", "")),
        series_description=str(getattr(ds, "SeriesDescription", "")),
        transfer_syntax=ts,
    )]


def read_frames(path: str | Path, *, fast: bool = True) -> list[Frame]:
    """Read one file into frames: the byte-level fast path when possible, else pydicom.

    Enhanced multi-frame files give one Frame per frame (geometry from the functional groups).
    """
    source = str(path)
    if fast:
        from mmai.io.dicom_fastread import read_frame_fast

        frame = read_frame_fast(source)
        if frame is not None:
            return [frame]
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(source)
        except InvalidDicomError:  # no preamble/'DICM' (raw data set): accept it only with pixels
            ds = pydicom.dcmread(source, force=True)
            if "PixelData" not in ds or "Rows" not in ds:
                raise
            if "TransferSyntaxUID" not in ds.file_meta:  # raw data set: native encoding as read
                implicit, little = ds.original_encoding
                ds.file_meta.TransferSyntaxUID = (
                    pydicom.uid.ImplicitVRLittleEndian if implicit else
                    pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise DicomError(f"{source}: not a readable DICOM file: {exc}") from exc
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        from mmai.io.dicom_multiframe import frames_from_multiframe

        return frames_from_multiframe(ds, source)
    return frames_from_dataset(ds, source)


def _workers(n_items: int) -> int:
    return max(1, min(n_items, os.cpu_count() or 1, 4))


def _drop_localizers(frames: list[Frame], warnings: list[str]) -> list[Frame]:
    keep = [f for f in frames if "LOCALIZER" not in f.image_type]
    if keep and len(keep) < len(frames):
        dropped = [f.source for f in frames if "LOCALIZER" in f.image_type]
        warnings.append(f"dropped {len(dropped)} localizer image(s) (ImageType LOCALIZER): {dropped[:3]}")
        return keep
    return frames


def _check_consistent(frames: list[Frame]) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Every frame has geometry, one size, one orientation and one pixel spacing.

    Returns:
        ((K, 3) ImagePositionPatient per frame, (6,) orientation, PixelSpacing (row, col)).
    """
    first = frames[0]
    ipps = []
    for f in frames:
        if f.ipp is None or f.iop is None or f.pixel_spacing is None:
            missing = [n for n, v in (("ImagePositionPatient", f.ipp), ("ImageOrientationPatient", f.iop),
                                      ("PixelSpacing", f.pixel_spacing)) if v is None]
            raise DicomError(f"{f.source}: lacks {', '.join(missing)}; cannot place it in patient space")
        ipps.append(f.ipp)
        iop0, ps0 = np.asarray(first.iop), np.asarray(first.pixel_spacing)
        if (f.rows, f.cols) != (first.rows, first.cols):
            raise DicomError(
                f"{f.source}: {f.rows}x{f.cols} pixels but {first.source} has {first.rows}x{first.cols}; "
                f"the files are not one series (select one stack, see docs/dicom_scan.md)")
        if np.abs(f.iop - iop0).max() > 1e-4:
            raise DicomError(
                f"{f.source}: ImageOrientationPatient {f.iop.round(5).tolist()} differs from "
                f"{first.source} {iop0.round(5).tolist()}; the files are not one stack")
        if np.abs(np.subtract(f.pixel_spacing, ps0)).max() > 1e-4:
            raise DicomError(
                f"{f.source}: PixelSpacing {list(f.pixel_spacing)} differs from {first.source} "
                f"{ps0.tolist()}; the files are not one stack")
    ps = (float(ps0[0]), float(ps0[1]))
    return np.stack(ipps), iop0, ps


def _output_dtype(frames: list[Frame], dtype: str, warnings: list[str]) -> np.dtype:
    """float32, or for "native" the smallest exact integer dtype over the stored dtype's range."""
    if dtype == "float32":
        return np.dtype(np.float32)
    integral = all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames)
    if not integral:
        warnings.append("dtype='native' asked, but RescaleSlope/Intercept are not integers: returned float32")
        return np.dtype(np.float32)
    ends = []
    for f in frames:
        info = np.iinfo(f.stored.dtype if f.stored is not None else np.dtype(f.pixel_dtype))
        lo, hi = (0, (1 << f.bits_stored) - 1) if info.min == 0 else (-(1 << (f.bits_stored - 1)), (1 << (f.bits_stored - 1)) - 1)
        ends += [lo * f.slope + f.intercept, hi * f.slope + f.intercept]
    for cand in (np.int16, np.int32):
        if np.iinfo(cand).min <= min(ends) and max(ends) <= np.iinfo(cand).max:
            return np.dtype(cand)
    return np.dtype(np.float64)


_local = threading.local()


def _scratch(f: Frame) -> np.ndarray:
    """A per-thread (rows, cols) buffer for lazily read pixels (no fresh pages per slice)."""
    key = (f.rows, f.cols, f.pixel_dtype)
    if getattr(_local, "key", None) != key:
        _local.key, _local.buf = key, np.empty((f.rows, f.cols), dtype=np.dtype(f.pixel_dtype))
    return _local.buf


class _Overflow(Exception):
    """A native int16 volume cannot hold a slice's values (the caller retries with int32)."""


def _fill_slice(out: np.ndarray, f: Frame, check: bool = False) -> None:
    """out (J, I) <- rescale(stored), with MONOCHROME1 inverted in the stored domain.

    With ``check`` (an integer ``out`` narrower than the stored range allows), raise _Overflow
    before writing values that do not fit.
    """
    plain = f.slope == 1.0 and f.intercept == 0.0 and f.photometric != "MONOCHROME1"
    if f.stored is None and plain and out.dtype == np.dtype(f.pixel_dtype):
        f.read_stored(out)  # straight from the file into the volume
        return
    stored = f.read_stored(_scratch(f) if f.stored is None else None)
    if f.photometric == "MONOCHROME1":
        wide = stored.astype(np.int64)
        stored = (-1 - wide) if stored.dtype.kind == "i" else (((1 << f.bits_stored) - 1) - wide)
    if check and stored.size:
        ends = (float(stored.min()) * f.slope + f.intercept, float(stored.max()) * f.slope + f.intercept)
        info = np.iinfo(out.dtype)
        if min(ends) < info.min or max(ends) > info.max:
            raise _Overflow
    if f.slope != 1.0:
        np.multiply(stored, f.slope, out=out, casting="unsafe")
        if f.intercept != 0.0:
            out += out.dtype.type(f.intercept)
    elif f.intercept != 0.0:  # one pass over the output
        np.add(stored, out.dtype.type(f.intercept), out=out, casting="unsafe")
    else:
        np.copyto(out, stored, casting="unsafe")


def _fill_volume(ordered: list[Frame], dtype: np.dtype, check: bool = False) -> np.ndarray:
    """(K, J, I) volume of rescaled frames, filled by a thread pool (I/O and numpy drop the GIL)."""
    buf = np.empty((len(ordered), ordered[0].rows, ordered[0].cols), dtype=dtype)
    if len(ordered) > 8:
        with ThreadPoolExecutor(_workers(len(ordered))) as pool:
            list(pool.map(lambda k: _fill_slice(buf[k], ordered[k], check), range(len(ordered))))
    else:
        for k, f in enumerate(ordered):
            _fill_slice(buf[k], f, check)
    return buf


def assemble(frames: list[Frame], *, dtype: str = "float32", uneven: str = "warn",
             tilt: str = "shear", warnings: list[str] | None = None) -> DicomVolume:
    """Frames of one stack -> DicomVolume (sorting, rescale, gaps, tilt, affine).

    Args:
        frames: the stack's frames, any order.
        dtype, uneven, tilt: as in :func:`load_series`.
        warnings: problems already found (extended in place).
    """
    warnings = [] if warnings is None else warnings
    if not frames:
        raise DicomError("load_series: no frames to assemble (empty file list)")
    frames = _drop_localizers(frames, warnings)
    ipps, iop, pixel_spacing = _check_consistent(frames)
    sources = [f.source for f in frames]
    geom: StackGeometry = stack_geometry(ipps, iop, pixel_spacing, slice_thickness=frames[0].slice_thickness,
                                         sources=sources)
    if geom.uneven:
        text = (f"uneven slice spacing (median {geom.spacing:.4f} mm) - missing slice(s) or gaps at "
                f"{describe_gaps(geom)}")
        if uneven == "error":
            raise DicomError(f"{sources[0]} (+{len(sources) - 1} files): {text}; uneven='error'")
        warnings.append(text + ("; resampled to even spacing (linear along k)" if uneven == "resample"
                                else "; the affine uses the median spacing (uneven='resample' to fix)"))
    if geom.tilted:
        warnings.append(f"gantry tilt {geom.tilt_deg:.3f} deg: slice origins drift in-plane "
                        + ("(kept as a sheared affine)" if tilt == "shear" else "(resampled to an orthogonal grid)"))
    out_dtype = _output_dtype(frames, dtype, warnings)
    ordered = [frames[int(i)] for i in geom.order]
    if dtype == "native" and out_dtype == np.int32:
        try:  # e.g. uint16 stored + intercept -1024: int16 holds the real values almost always
            buf = _fill_volume(ordered, np.dtype(np.int16), check=True)
        except _Overflow:
            buf = _fill_volume(ordered, out_dtype)
    else:
        buf = _fill_volume(ordered, out_dtype)
    positions, origin, was_uneven = geom.positions, geom.origin, geom.uneven
    resampled = False
    if geom.uneven and uneven == "resample":
        buf, positions = resample_even(buf, geom)
        resampled = True
    if geom.tilted and tilt == "resample":
        buf, origin = deshear(buf, geom, positions, fill=float(buf.min()))
        resampled = True
    spacing_k = float(positions[1] - positions[0]) if resampled and len(positions) > 1 else geom.spacing
    if resampled:
        geom = replace(geom, positions=positions, origin=origin, spacing=spacing_k, gaps=[],
                       drift=geom.drift if tilt == "shear" else np.zeros(3))
    affine = geom.affine(shear=(tilt == "shear"))
    array = buf.transpose(2, 1, 0)  # (I, J, K), Fortran-contiguous
    if dtype == "native" and array.dtype.kind == "f" and resampled:
        warnings.append("resampling produced float32 output despite dtype='native'")
    for w in warnings:  # the file name only: folder names in archives often carry patient names
        logger.warning("%s: %s", Path(str(sources[0])).name, w)
    first = frames[0]
    meta = {
        "modality": first.modality,
        "series_description": first.series_description,
        "shape": list(array.shape),
        "spacing": [geom.pixel_spacing[0], geom.pixel_spacing[1], spacing_k],
        "orientation": orientation_label(iop),
        "tilt_deg": round(geom.tilt_deg, 4),
        "uneven_spacing": was_uneven,
        "resampled": resampled,
        "n_files": len(set(f.source.split("#")[0] for f in frames)),
        "photometric": first.photometric,
        "transfer_syntax": first.transfer_syntax,
        "dtype": str(array.dtype),
    }
    return DicomVolume(array=array, affine=affine, warnings=warnings, meta=meta)


def load_series(
    files: Sequence[str | Path],
    *,
    dtype: str = "float32",
    uneven: str = "warn",
    tilt: str = "shear",
    fast: bool = True,
    frames: Sequence[int] | None = None,
) -> DicomVolume:
    """Load one series (single-frame files, or one enhanced multi-frame file) as a volume.

    Args:
        files: the series' files (any order). A single multi-frame file must hold one stack; use
            :func:`mmai.io.dicom_multiframe.load_multiframe` for files with several.
        dtype: "float32" (rescaled real values), or "native": the smallest exact integer dtype
            (int16, else int32) when every RescaleSlope/Intercept is an integer, else float32.
        uneven: missing slices / uneven spacing: "warn" (keep the slices, median spacing in the
            affine, warning naming the gaps), "resample" (linear along k to even spacing), "error".
        tilt: gantry tilt: "shear" (affine's k column = the real slice-to-slice displacement),
            "resample" (bilinear in-plane shift onto an orthogonal grid).
        fast: use the byte-level reader for uncompressed little-endian files (bit-identical to
            pydicom); False forces pydicom for every file.
        frames: 0-based frame indices to keep from a single multi-frame file (what
            ``mmai.io.dicom_scan.SeriesStack.frames`` holds); None keeps all.

    Returns:
        DicomVolume with array (I, J, K) and affine (4, 4) voxel -> RAS.

    Raises:
        DicomError: unreadable file, undecodable pixels (names the file and transfer syntax),
            inconsistent stack, duplicate positions (split with :func:`split_by_phase`), ...
    """
    _check_choice("dtype", dtype, DTYPE_CHOICES)
    _check_choice("uneven", uneven, UNEVEN_CHOICES)
    _check_choice("tilt", tilt, TILT_CHOICES)
    paths = [str(p) for p in files]
    if not paths:
        raise DicomError("load_series: the file list is empty")
    if len(paths) > 8:
        with ThreadPoolExecutor(_workers(len(paths))) as pool:
            per_file = list(pool.map(lambda p: read_frames(p, fast=fast), paths))
    else:
        per_file = [read_frames(p, fast=fast) for p in paths]
    found = [f for group in per_file for f in group]
    if frames is not None:
        if len(paths) != 1:
            raise DicomError(f"load_series: frames= selects frames of one multi-frame file, got {len(paths)} files")
        keep = set(int(i) for i in frames)
        found = [f for f in found if f.frame_index in keep]
    if len(paths) == 1 and len(found) > 1:
        from mmai.io.dicom_multiframe import split_frames

        stacks = split_frames(found)
        if len(stacks) > 1:
            raise DicomError(
                f"{paths[0]}: the multi-frame file holds {len(stacks)} stacks/phases "
                f"({', '.join(s.label for s in stacks)}); use load_multiframe() to get each")
        found = stacks[0].frames
    return assemble(found, dtype=dtype, uneven=uneven, tilt=tilt)


_PHASE_KEYS = ("TemporalPositionIdentifier", "EchoNumbers", "TriggerTime", "AcquisitionNumber")


def split_by_phase(datasets: Sequence[T]) -> list[list[T]]:
    """Split datasets whose slice positions repeat (interleaved phases/echoes) into stacks.

    Tries TemporalPositionIdentifier, EchoNumbers, TriggerTime, AcquisitionNumber in that order and
    uses the first key whose groups each have unique slice positions. Lists without repeated
    positions come back whole (``[list(datasets)]``), so it is safe to call on every series.

    Args:
        datasets: objects with pydicom-style attributes (``ImagePositionPatient``,
            ``ImageOrientationPatient`` and the phase keywords), e.g. header-only Datasets.

    Returns:
        Groups in ascending order of the key value (each keeps the input order).

    Raises:
        DicomError: repeated positions that none of the keys separates.
    """
    items = list(datasets)

    def position(ds: Any) -> tuple[float, ...]:
        return tuple(round(float(v), 3) for v in ds.ImagePositionPatient)

    positions = [position(ds) for ds in items]
    if len(set(positions)) == len(positions):
        return [items]
    for key in _PHASE_KEYS:
        raw = [getattr(ds, key, None) for ds in items]
        if any(v is None or v == "" for v in raw):
            continue
        groups: dict[float, list[int]] = {}
        for idx, v in enumerate(raw):
            groups.setdefault(float(v), []).append(idx)  # type: ignore[arg-type]
        if len(groups) < 2:
            continue
        if all(len({positions[i] for i in idx}) == len(idx) for idx in groups.values()):
            return [[items[i] for i in groups[v]] for v in sorted(groups)]
    raise DicomError(
        f"{len(items) - len(set(positions))} slice position(s) repeat and none of {list(_PHASE_KEYS)} "
        f"separates them into stacks with unique positions; select the files by hand")
