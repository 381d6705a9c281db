"""One DICOM series (a list of single-frame files, or one enhanced multi-frame file) -> volume.

``load_series`` sorts slices along the slice normal (never by InstanceNumber), applies per-slice
RescaleSlope/Intercept, inverts MONOCHROME1, and places every pixel where its header says: the
geometry check (:func:`mmai.io.dicom_geometry.check_stack`, the same one ``mmai scan`` uses)
decides whether the stack is uniform (exact affine, step = end-to-end distance / (K - 1)) or
not (missing slice, uneven spacing, jitter: resampled onto a uniform grid by default, or refused,
or kept raw and flagged ``irregular``), and handles gantry tilt. Uncompressed little-endian files
go through a byte-level fast path (:mod:`mmai.io.dicom_fastread`); everything else through
pydicom and its pixel handlers. See docs/dicom.md for every case, its option and the reference
tool the tests compare against.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmai.errors import DicomError
from mmai.io.dicom_fastread import read_frame_fast
from mmai.io.dicom_frames import Frame, fill_sorted, frames_from_dataset, output_dtype, workers_for
from mmai.io.dicom_geometry import (
    YAML_SECTION,
    GeometryPolicy,
    StackGeometry,
    deshear,
    orientation_label,
    policy_from,
    resample_positions,
    same_orientation,
    same_pixel_spacing,
    stack_geometry,
    uniform_grid,
)
from mmai.io.dicom_mosaic import is_mosaic, mosaic_frames
from mmai.io.dicom_multiframe import frames_from_multiframe, split_frames
from mmai.io.input_flags import META_KEY, add_flag, file_names

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("float32", "native")


@dataclass
class DicomVolume:
    """A loaded volume in the shared convention.

    Attributes:
        array: (I, J, K) float32 (or an integer dtype with ``dtype="native"``); i along the row
            cosine, j along the column cosine, k ascending along the slice normal.
        affine: (4, 4) float64, voxel (i, j, k, 1) -> RAS mm.
        warnings: human-readable problems found (gaps, tilt, dropped localizers ...); a geometry
            warning starts with its problem name(s) from ``meta["problems"]``.
        meta: non-identifying facts only (modality, spacing, shape, orientation, tilt_deg,
            geometry: regular | resampled | irregular, problems, slice_steps, policy ...).
    """

    array: np.ndarray
    affine: np.ndarray
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def read_frames(path: str | Path, *, fast: bool = True) -> list[Frame]:
    """Read one file into frames: the byte-level fast path when possible, else pydicom.

    Enhanced multi-frame files give one Frame per frame (geometry from the functional groups).
    """
    source = str(path)
    if fast:
        frame = read_frame_fast(source)
        if frame is not None and not is_mosaic(frame.image_type):
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
        return frames_from_multiframe(ds, source)
    frames = frames_from_dataset(ds, source)
    if is_mosaic(frames[0].image_type):  # Siemens mosaic: one tile per slice, placed by the CSA header
        return mosaic_frames(ds, frames[0])
    return frames


def _drop_localizers(frames: list[Frame], warnings: list[str]) -> list[Frame]:
    keep = [f for f in frames if "LOCALIZER" not in f.image_type]
    if keep and len(keep) < len(frames):
        dropped = [Path(f.source).name for f in frames if "LOCALIZER" in f.image_type]
        warnings.append(f"dropped {len(dropped)} localizer image(s) (ImageType LOCALIZER): {dropped[:3]}")
        return keep
    return frames


def _check_consistent(frames: list[Frame], policy: GeometryPolicy) -> tuple[np.ndarray, np.ndarray,
                                                                            tuple[float, float]]:
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
        if not same_orientation(f.iop, iop0, policy):
            raise DicomError(
                f"{f.source}: ImageOrientationPatient {f.iop.round(5).tolist()} differs from "
                f"{first.source} {iop0.round(5).tolist()} by more than {YAML_SECTION}.orientation_tolerance "
                f"= {policy.orientation_tolerance:g}; the files are not one stack")
        if not same_pixel_spacing(f.pixel_spacing, ps0):
            raise DicomError(
                f"{f.source}: PixelSpacing {list(f.pixel_spacing)} differs from {first.source} "
                f"{ps0.tolist()}; the files are not one stack")
    ps = (float(ps0[0]), float(ps0[1]))
    return np.stack(ipps), iop0, ps


def _series_label(frames: list[Frame]) -> str:
    """'CT "AX 2.5" (IM00001.dcm +19 files)': names the series without folders (they may hold PHI)."""
    first = frames[0]
    desc = f' "{first.series_description}"' if first.series_description else ""
    n_files = len({f.source.split("#")[0] for f in frames})
    return f"{first.modality or 'DICOM'}{desc} ({Path(first.source).name} +{n_files - 1} files)"


def _refuse_uneven(geom: StackGeometry, policy: GeometryPolicy, label: str) -> str:
    """'' for a uniform stack; else the problem text, or DicomError with ``uneven="error"``."""
    chk = geom.check
    names = [p for p in chk.problems() if p in ("missing slices", "uneven spacing")]
    if not names:
        return ""
    what = f"{' and '.join(names)}: {chk.describe()}"
    if policy.uneven == "error":
        raise DicomError(f"{label}: {what}; {YAML_SECTION}.uneven: error refuses a stack that is not uniform "
                         f"(resample or keep to load it)")
    return what


def _regularise(buf: np.ndarray, geom: StackGeometry, policy: GeometryPolicy, label: str,
                warnings: list[str], flags: dict[str, Any]) -> tuple[np.ndarray, StackGeometry, str]:
    """Apply ``policy`` to a non-uniform or tilted stack.

    Args:
        buf: (K, J, I) slices in ascending position.
        flags: the input flags (:mod:`mmai.io.input_flags`), extended in place with what was repaired.

    Returns:
        (the (K', J', I') slices, their geometry, "regular" | "resampled" | "irregular").
    """
    chk = geom.check
    kind = "regular"
    positions = chk.positions
    what = _refuse_uneven(geom, policy, label)
    if what:
        if policy.uneven == "resample":
            positions = uniform_grid(chk)
            buf = resample_positions(buf, chk.positions, positions)
            geom = replace(geom, spacing=float(positions[1] - positions[0]))
            kind = "resampled"
            if chk.n_missing:
                add_flag(flags, "interpolated_slices", int(chk.n_missing))
            else:
                flags["resampled_spacing"] = 1
            warnings.append(f"{what}; resampled linearly along the slice normal onto {len(positions)} slices "
                            f"of {geom.spacing:.4f} mm from the first to the last slice (set "
                            f"{YAML_SECTION}.uneven: error to refuse such stacks, keep for the raw slices)")
        else:
            kind = "irregular"
            warnings.append(f"{what}; kept the raw {len(positions)} slices ({YAML_SECTION}.uneven: keep): the "
                            f"affine places slice k at the first slice + k x {geom.spacing:.4f} mm, up to "
                            f"{chk.max_deviation_mm:.3f} mm from its header position; the header positions "
                            f"are in meta['slice_positions_mm'] (set {YAML_SECTION}.uneven: resample to fix)")
    if chk.tilted:
        text = (f"gantry tilt: {chk.tilt_deg:.3f} deg, slice origins drift in-plane (above "
                f"{YAML_SECTION}.tilt_tolerance_deg = {policy.tilt_tolerance_deg:g})")
        if policy.tilt == "resample":
            buf, origin = deshear(buf, geom, positions, fill=float(buf.min()))
            geom = replace(geom, origin=origin, drift=np.zeros(3))
            kind = "resampled" if kind == "regular" else kind
            flags["tilt_resampled"] = 1
            warnings.append(text + f"; resampled in-plane onto an orthogonal grid ({YAML_SECTION}.tilt: resample)")
        else:
            warnings.append(text + f"; kept as a sheared affine, exact ({YAML_SECTION}.tilt: resample for "
                            f"an orthogonal grid)")
    return buf, geom, kind


def _meta(frames: list[Frame], geom: StackGeometry, array: np.ndarray, kind: str,
          policy: GeometryPolicy, iop: np.ndarray) -> dict[str, Any]:
    first, chk = frames[0], geom.check
    meta = {
        "modality": first.modality,
        "series_description": first.series_description,
        "shape": list(array.shape),
        "spacing": [geom.pixel_spacing[0], geom.pixel_spacing[1], geom.spacing],
        "orientation": orientation_label(iop),
        "tilt_deg": round(chk.tilt_deg, 4),
        "geometry": kind,
        "problems": chk.problems(),
        "uneven_spacing": not chk.uniform,
        # pixels interpolated: onto a uniform grid, or in-plane to undo a tilt (also with uneven: keep)
        "resampled": kind == "resampled" or (chk.tilted and policy.tilt == "resample"),
        "slice_steps": chk.summary(),
        "policy": dataclasses.asdict(policy),
        "n_files": len({f.source.split("#")[0] for f in frames}),
        "photometric": first.photometric,
        "transfer_syntax": first.transfer_syntax,
        "dtype": str(array.dtype),
    }
    if not chk.uniform:  # every header position, along the normal from slice 0, in array order k
        meta["slice_positions_mm"] = [round(float(p - chk.positions[0]), 4) for p in chk.positions]
    return meta


def assemble(frames: list[Frame], *, dtype: str = "float32", policy: GeometryPolicy | None = None,
             warnings: list[str] | None = None, flags: dict[str, Any] | None = None) -> DicomVolume:
    """Frames of one stack -> DicomVolume (sorting, rescale, geometry policy, affine).

    Args:
        frames: the stack's frames, any order.
        dtype: as in :func:`load_series`.
        policy: geometry tolerances and policy (default :class:`GeometryPolicy`).
        warnings: problems already found (extended in place).
        flags: input flags already found (e.g. dropped files); ``meta["input_flags"]`` on return.
    """
    policy = policy or GeometryPolicy()
    warnings = [] if warnings is None else warnings
    flags = {} if flags is None else dict(flags)
    if not frames:
        raise DicomError("load_series: no frames to assemble (empty file list)")
    frames = _drop_localizers(frames, warnings)
    ipps, iop, pixel_spacing = _check_consistent(frames, policy)
    geom = stack_geometry(ipps, iop, pixel_spacing, slice_thickness=frames[0].slice_thickness,
                          sources=[Path(f.source).name for f in frames], policy=policy)
    label = _series_label(frames)
    _refuse_uneven(geom, policy, label)  # before reading any pixel
    buf = fill_sorted([frames[int(i)] for i in geom.check.order], dtype, output_dtype(frames, dtype, warnings))
    buf, geom, kind = _regularise(buf, geom, policy, label, warnings, flags)
    array = buf.transpose(2, 1, 0)  # (I, J, K), Fortran-contiguous
    resampled = kind == "resampled" or (geom.check.tilted and policy.tilt == "resample")
    if dtype == "native" and array.dtype.kind == "f" and resampled:
        warnings.append("resampling produced float32 output despite dtype='native'")
    for w in warnings:  # the file name only: folder names in archives often carry patient names
        logger.warning("%s: %s", Path(frames[0].source).name, w)
    meta = _meta(frames, geom, array, kind, policy, iop)
    meta[META_KEY] = flags
    return DicomVolume(array=array, affine=geom.affine(), warnings=warnings, meta=meta)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_CHOICES:
        raise DicomError(f"load_series: dtype={dtype!r} is not allowed; choose one of {list(DTYPE_CHOICES)}")


def load_series(
    files: Sequence[str | Path],
    *,
    dtype: str = "float32",
    uneven: str | None = None,
    tilt: str | None = None,
    policy: Any = None,
    fast: bool = True,
    frames: Sequence[int] | None = None,
) -> DicomVolume:
    """Load one series (single-frame files, or one enhanced multi-frame file) as a volume.

    Args:
        files: the series' files (any order). A single multi-frame file must hold one stack; use
            :func:`load_multiframe` for files with several.
        dtype: "float32" (rescaled real values), or "native": the smallest exact integer dtype
            (int16, else int32) when every RescaleSlope/Intercept is an integer, else float32.
        uneven: overrides ``policy.uneven``: a stack that is not uniform within the spacing
            tolerance (missing slice, uneven spacing, jitter): "resample" (default; linear along
            the normal onto a uniform grid from the first to the last slice), "error", "keep"
            (raw slices, ``meta["geometry"] = "irregular"``, positions in ``meta``).
        tilt: overrides ``policy.tilt``: "shear" (default; affine's k column = the real
            slice-to-slice displacement) or "resample" (bilinear in-plane shift, orthogonal grid).
        policy: a :class:`mmai.io.dicom_geometry.GeometryPolicy`, ``mmai.config.DicomConfig``
            (pipeline YAML ``image.dicom``), a mapping of its keys, or None (defaults).
        fast: use the byte-level reader for uncompressed little-endian files (bit-identical to
            pydicom); False forces pydicom for every file.
        frames: 0-based frame indices to keep from a single multi-frame file (what
            ``mmai.io.dicom_scan.SeriesStack.frames`` holds); None keeps all.

    Returns:
        DicomVolume with array (I, J, K) and affine (4, 4) voxel -> RAS.

    Raises:
        DicomError: unreadable file, undecodable pixels (names the file and transfer syntax),
            inconsistent stack, duplicate positions, a non-uniform stack with uneven="error", ...
    """
    _check_dtype(dtype)
    pol = policy_from(policy, uneven=uneven, tilt=tilt)
    paths = [str(p) for p in files]
    if not paths:
        raise DicomError("load_series: the file list is empty")
    if len(paths) > 8:
        with ThreadPoolExecutor(workers_for(len(paths))) as pool:
            per_file = list(pool.map(lambda p: _read_or_error(p, fast), paths))
    else:
        per_file = [_read_or_error(p, fast) for p in paths]
    warnings: list[str] = []
    flags = _drop_unreadable(paths, per_file, warnings)
    found = [f for group in per_file if not isinstance(group, DicomError) for f in group]
    if frames is not None:
        if len(paths) != 1:
            raise DicomError(f"load_series: frames= selects frames of one multi-frame file, got {len(paths)} files")
        keep = set(int(i) for i in frames)
        found = [f for f in found if f.frame_index in keep]
    if len(paths) == 1 and len(found) > 1 and not is_mosaic(found[0].image_type):
        stacks = split_frames(found, pol)
        if len(stacks) > 1:
            raise DicomError(
                f"{paths[0]}: the multi-frame file holds {len(stacks)} stacks/phases "
                f"({', '.join(s.label for s in stacks)}); use load_multiframe() to get each")
        found = stacks[0].frames
    return assemble(found, dtype=dtype, policy=pol, warnings=warnings, flags=flags)


MAX_DROPPED_FRACTION = 0.1


def _read_or_error(path: str, fast: bool) -> list[Frame] | DicomError:
    """The file's frames, or the DicomError that reading it raised (decided on by the caller)."""
    try:
        return read_frames(path, fast=fast)
    except DicomError as exc:
        return exc


def _drop_unreadable(paths: list[str], per_file: list[list[Frame] | DicomError], warnings: list[str]
                     ) -> dict[str, Any]:
    """Leave out the files of a series that cannot be read (truncated, undecodable pixels).

    A series keeps its other slices (the gap is then interpolated, or refused with
    ``image.dicom.uneven: error``) when at most :data:`MAX_DROPPED_FRACTION` of its files fail (so
    a series of 10 files or more may lose one); the warning and the ``dropped_files`` /
    ``dropped_file_names`` flags name the files. More failures raise the first file's error.

    Returns:
        the input flags of the dropped files (empty when every file was read).
    """
    bad = [(p, r) for p, r in zip(paths, per_file, strict=True) if isinstance(r, DicomError)]
    if not bad:
        return {}
    if len(bad) > MAX_DROPPED_FRACTION * len(paths):
        raise bad[0][1]
    names = file_names([p for p, _ in bad])
    reason = str(bad[0][1]).replace(bad[0][0], Path(bad[0][0]).name)
    warnings.append(f"dropped {len(bad)} unreadable file(s) of {len(paths)} in the series ({names}); "
                    f"the others are kept and the gap filled: {reason[:200]}")
    return {"dropped_files": len(bad), "dropped_file_names": names}


def load_multiframe(file: str | Path, *, dtype: str = "float32", uneven: str | None = None,
                    tilt: str | None = None, policy: Any = None) -> list[DicomVolume]:
    """Load every stack/phase of one multi-frame file as its own volume.

    Args:
        file: an enhanced (or legacy) multi-frame CT/MR file.
        dtype, uneven, tilt, policy: as in :func:`load_series`.

    Returns:
        One DicomVolume per stack, ordered by (StackID, TemporalPositionIndex, echo time);
        ``meta["stack"]`` names the stack.
    """
    _check_dtype(dtype)
    pol = policy_from(policy, uneven=uneven, tilt=tilt)
    volumes = []
    for stack in split_frames(read_frames(file, fast=False), pol):
        vol = assemble(stack.frames, dtype=dtype, policy=pol)
        vol.meta["stack"] = stack.label
        vol.meta["n_frames"] = len(stack.frames)
        volumes.append(vol)
    return volumes
