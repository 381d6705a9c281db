"""One 2D frame of a DICOM file: its geometry, pixel encoding and stored pixels (:class:`Frame`).

The bottom layer of the loader: :mod:`mmai.io.dicom_fastread` (byte-level) and
:mod:`mmai.io.dicom_multiframe` (enhanced multi-frame) build Frames, :mod:`mmai.io.dicom_series`
assembles them into a volume. Single-frame files that the fast path refuses are decoded here
by pydicom (:func:`frames_from_dataset`); :func:`fill_volume` reads and rescales sorted frames
into one (K, J, I) buffer.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmai.errors import DicomError


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


def float_or(value: Any, default: float) -> float:
    """``float(value)``, or ``default`` for a missing or empty header value."""
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
    slope = float_or(getattr(ds, "RescaleSlope", None), 1.0)
    intercept = float_or(getattr(ds, "RescaleIntercept", None), 0.0)
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
        slice_thickness=float_or(getattr(ds, "SliceThickness", None), 0.0) or None,
        image_type=tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or ())),
        modality=str(getattr(ds, "Modality", "")),
        series_description=str(getattr(ds, "SeriesDescription", "")),
        transfer_syntax=ts,
    )]


def workers_for(n_items: int) -> int:
    """Threads for per-file work: at most 4 and the CPU count."""
    return max(1, min(n_items, os.cpu_count() or 1, 4))


def output_dtype(frames: list[Frame], dtype: str, warnings: list[str]) -> np.dtype:
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


def fill_volume(ordered: list[Frame], dtype: np.dtype, check: bool = False) -> np.ndarray:
    """(K, J, I) volume of rescaled frames, filled by a thread pool (I/O and numpy drop the GIL)."""
    buf = np.empty((len(ordered), ordered[0].rows, ordered[0].cols), dtype=dtype)
    if len(ordered) > 8:
        with ThreadPoolExecutor(workers_for(len(ordered))) as pool:
            list(pool.map(lambda k: _fill_slice(buf[k], ordered[k], check), range(len(ordered))))
    else:
        for k, f in enumerate(ordered):
            _fill_slice(buf[k], f, check)
    return buf


def fill_sorted(ordered: list[Frame], dtype: str, out_dtype: np.dtype) -> np.ndarray:
    """(K, J, I) volume of the sorted frames in ``out_dtype`` (see :func:`output_dtype`).

    For ``dtype="native"`` with an int32 ``out_dtype`` (e.g. uint16 stored + intercept -1024),
    int16 is tried first: it holds the real values almost always, and is checked slice by slice.
    """
    if dtype == "native" and out_dtype == np.int32:
        try:
            return fill_volume(ordered, np.dtype(np.int16), check=True)
        except _Overflow:
            pass
    return fill_volume(ordered, out_dtype)
