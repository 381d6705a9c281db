"""Slice geometry of a DICOM stack: every tolerance, the one check scan and loader share, the affine.

Pure numpy, no file access. Positions are LPS millimetres (DICOM). The affine maps (i, j, k, 1)
to RAS millimetres (NIfTI / MONAI), with i along the row cosine, j along the column cosine and
k ascending along ``normal = cross(row_cosine, col_cosine)`` (docs/dicom.md).

:func:`check_stack` is the only place that decides whether a stack is uniform, has missing
slices, uneven spacing or jitter, duplicate positions or gantry tilt. ``mmai scan``'s
``problems`` column (:mod:`mmai.io.dicom_scan`) and the loader's warnings
(:mod:`mmai.io.dicom_series`) both come from it, with the tolerances of one
:class:`GeometryPolicy` (pipeline YAML ``image.dicom``), so they always agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmai.errors import DicomError

#: LPS -> RAS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

UNEVEN_CHOICES = ("resample", "error", "keep")
TILT_CHOICES = ("shear", "resample")
#: Where the policy lives in a pipeline YAML (messages name it).
YAML_SECTION = "image.dicom"

#: Slices closer than this (mm, along the normal) share one position (phases, echoes, copies).
DUPLICATE_TOL_MM = 0.01
#: Position rounding noise (mm): slice-position deviations and in-plane drift below it are zero.
NOISE_MM = 1e-3
#: In-plane drift of the slice origins below this (mm, over the stack) is rounding, not tilt.
DRIFT_NOISE_MM = 1e-2
#: PixelSpacing values of one stack agree within this (mm).
PIXEL_SPACING_TOL_MM = 1e-4
#: A slice origin further than this many pixels from the stack's straight line: not one stack.
LINE_TOL_PIXELS = 0.1

#: Problem names (the ``mmai scan`` vocabulary, docs/dicom_scan.md) that :func:`check_stack` decides.
GEOMETRY_PROBLEMS = ("duplicate positions", "missing slices", "uneven spacing", "gantry tilt",
                     "origins off one line")


@dataclass(frozen=True)
class GeometryPolicy:
    """Geometry tolerances and what to do with a non-uniform stack (pipeline YAML ``image.dicom``).

    Attributes:
        uneven: a stack whose slices are not uniformly spaced within ``spacing_tolerance``
            (missing slice, uneven spacing, jitter): "resample" (linear along the slice normal onto
            a uniform grid from the first to the last slice), "error" (raise), "keep" (the raw
            slices; the affine uses slice 0 and the end-to-end step, ``meta["geometry"] =
            "irregular"`` and every slice position in ``meta["slice_positions_mm"]``).
        tilt: gantry tilt above ``tilt_tolerance_deg``: "shear" (the affine's k column follows the
            slices; exact) or "resample" (in-plane shift onto an orthogonal grid).
        spacing_tolerance: largest distance of a slice from its place on the uniform grid (first
            to last slice, step = end-to-end distance / (K - 1)), as a fraction of that step.
        tilt_tolerance_deg: tilt up to this angle is kept in the affine (exact) without a warning.
        orientation_tolerance: largest difference of ImageOrientationPatient cosines within a stack.
    """

    uneven: str = "resample"
    tilt: str = "shear"
    spacing_tolerance: float = 0.01
    tilt_tolerance_deg: float = 0.1
    orientation_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        for name, allowed in (("uneven", UNEVEN_CHOICES), ("tilt", TILT_CHOICES)):
            if getattr(self, name) not in allowed:
                raise DicomError(f"{YAML_SECTION}.{name} = {getattr(self, name)!r} is not allowed; "
                                 f"choose one of {list(allowed)}")
        for name, lo, hi in (("spacing_tolerance", 0.0, 0.5), ("tilt_tolerance_deg", 0.0, 45.0),
                             ("orientation_tolerance", 0.0, 0.1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
                raise DicomError(f"{YAML_SECTION}.{name} = {value!r} is not allowed; choose a number "
                                 f"in ({lo:g}, {hi:g})")


DEFAULT_POLICY = GeometryPolicy()
_FIELDS = tuple(f.name for f in dataclasses.fields(GeometryPolicy))


def policy_from(source: Any = None, **overrides: Any) -> GeometryPolicy:
    """A GeometryPolicy from None (defaults), a GeometryPolicy, a mapping, or any object with the
    same attribute names (``mmai.config.DicomConfig``); keyword ``overrides`` that are not None win.

    Raises:
        DicomError: an unknown key or a value outside its allowed set (names ``image.dicom.<key>``).
    """
    if source is None:
        values: dict[str, Any] = {}
    elif isinstance(source, GeometryPolicy):
        values = dataclasses.asdict(source)
    elif isinstance(source, Mapping):
        unknown = [k for k in source if k not in _FIELDS]
        if unknown:
            raise DicomError(f"unknown key '{YAML_SECTION}.{unknown[0]}'; allowed: {list(_FIELDS)}")
        values = dict(source)
    else:
        values = {f: getattr(source, f) for f in _FIELDS if hasattr(source, f)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GeometryPolicy(**values)


def slice_normal(iop: Sequence[float] | np.ndarray) -> np.ndarray:
    """(3,) unit slice normal (LPS) = cross(row cosine, column cosine); zeros if degenerate."""
    cos = np.asarray(iop, dtype=np.float64)
    n = np.cross(cos[:3], cos[3:6])
    norm = float(np.linalg.norm(n))
    return n / norm if norm > 0 else n


def orientation_label(iop: Sequence[float] | np.ndarray, *, max_angle_deg: float = 10.0) -> str:
    """'axial', 'coronal', 'sagittal' or 'oblique' from ImageOrientationPatient.

    The slice normal must lie within ``max_angle_deg`` of a patient axis to get that axis' name.
    """
    normal = slice_normal(iop)
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(max_angle_deg)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def same_orientation(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                     policy: GeometryPolicy = DEFAULT_POLICY) -> bool:
    """True if two ImageOrientationPatient values agree within ``policy.orientation_tolerance``."""
    return bool(np.abs(np.subtract(a, b, dtype=np.float64)).max() <= policy.orientation_tolerance)


def same_pixel_spacing(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> bool:
    """True if two PixelSpacing values agree within PIXEL_SPACING_TOL_MM."""
    return bool(np.abs(np.subtract(a, b, dtype=np.float64)).max() <= PIXEL_SPACING_TOL_MM)


@dataclass(frozen=True)
class StackCheck:
    """What :func:`check_stack` found about one stack's slice positions.

    Attributes:
        order: (K,) input indices in ascending position along the normal.
        positions: (K,) sorted positions along the normal (mm).
        step: end-to-end step (last - first) / (K - 1) (mm; 0 for K = 1).
        median_step: median of the steps between distinct positions (mm; 0 for K = 1).
        max_deviation_mm: largest distance of a slice from the uniform grid with ``step``.
        uniform: ``max_deviation_mm`` within ``spacing_tolerance * step`` (and no duplicates).
        n_duplicates: neighbouring pairs closer than DUPLICATE_TOL_MM.
        n_missing: slices that would fill the gaps that are whole multiples of ``median_step``.
        gaps: (before, after, step) for every step that is neither the median step nor a whole
            multiple of it (within tolerance); only filled for a non-uniform stack.
        drift: (3,) in-plane displacement of the slice origin per mm along the normal.
        tilt_deg: the angle of ``drift`` (0 when the drift is rounding noise).
        off_line_mm: largest distance of a slice origin from the straight line through them.
        off_line_index: the input index of that slice.
        policy: the tolerances used.
    """

    order: np.ndarray
    positions: np.ndarray
    step: float
    median_step: float
    max_deviation_mm: float
    uniform: bool
    n_duplicates: int
    n_missing: int
    gaps: list[tuple[float, float, float]]
    drift: np.ndarray
    tilt_deg: float
    off_line_mm: float
    off_line_index: int
    policy: GeometryPolicy

    @property
    def tilted(self) -> bool:
        """Tilt above the policy's tolerance (a problem: warned, resampled with tilt='resample')."""
        return self.tilt_deg > self.policy.tilt_tolerance_deg

    def problems(self, pixel_spacing: float | None = None) -> list[str]:
        """The stack's geometry problems in the ``mmai scan`` vocabulary (GEOMETRY_PROBLEMS order).

        Args:
            pixel_spacing: the smaller PixelSpacing (mm); with it, origins further than
                LINE_TOL_PIXELS pixels from one line give "origins off one line".
        """
        out = []
        if self.n_duplicates:
            out.append("duplicate positions")
        if not self.uniform and not self.n_duplicates:
            if self.n_missing:
                out.append("missing slices")
            if self.gaps or not self.n_missing:
                out.append("uneven spacing")
        if self.tilted:
            out.append("gantry tilt")
        if pixel_spacing is not None and self.off_line_mm > LINE_TOL_PIXELS * pixel_spacing:
            out.append("origins off one line")
        return out

    def describe(self, limit: int = 3) -> str:
        """Human text of the spacing, e.g. 'steps 2.500-5.000 mm (median 2.500, end-to-end 2.632),
        slice up to 2.368 mm off a uniform grid; gaps 116.000->121.000 mm (5.000)'."""
        steps = np.diff(self.positions)
        text = (f"{len(self.positions)} slices, steps {steps.min():.3f}-{steps.max():.3f} mm (median "
                f"{self.median_step:.4f}, end-to-end {self.step:.4f}), a slice up to "
                f"{self.max_deviation_mm:.3f} mm off a uniform grid (tolerance "
                f"{self.policy.spacing_tolerance:g} x step)")
        if self.gaps:
            parts = [f"{a:.3f}->{b:.3f} mm ({g:.3f})" for a, b, g in self.gaps[:limit]]
            more = f" and {len(self.gaps) - limit} more" if len(self.gaps) > limit else ""
            text += "; uneven steps at " + ", ".join(parts) + more
        if self.n_missing:
            text += f"; {self.n_missing} slice(s) missing"
        return text

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary of the original slice steps (for sidecars and ``meta``)."""
        steps = np.diff(self.positions) if len(self.positions) > 1 else np.zeros(1)
        return {"n_slices": int(len(self.positions)), "step_min_mm": round(float(steps.min()), 4),
                "step_max_mm": round(float(steps.max()), 4), "step_median_mm": round(self.median_step, 4),
                "step_end_to_end_mm": round(self.step, 4), "max_deviation_mm": round(self.max_deviation_mm, 4),
                "n_missing": self.n_missing, "tilt_deg": round(self.tilt_deg, 4)}


def _classify_steps(pos: np.ndarray, median: float, tol: float) -> tuple[int, list[tuple[float, float, float]]]:
    """(slices missing in whole-multiple gaps, other steps off the median step by more than tol)."""
    n_missing, gaps = 0, []
    for a, b in zip(pos[:-1], pos[1:], strict=True):
        st = float(b - a)
        m = int(round(st / median)) if median > 0 else 1
        if m >= 2 and abs(st - m * median) <= tol * m:
            n_missing += m - 1
        elif abs(st - median) > tol:
            gaps.append((float(a), float(b), st))
    return n_missing, gaps


def _drift(ipps_sorted: np.ndarray, normal: np.ndarray) -> tuple[np.ndarray, float, int]:
    """(drift (3,) per mm along the normal, largest off-line distance, its sorted index)."""
    rel = ipps_sorted - ipps_sorted[0]
    along = rel @ normal
    inplane = rel - np.outer(along, normal)
    if float(np.abs(inplane).max(initial=0.0)) <= DRIFT_NOISE_MM or float(np.ptp(along)) <= 0:
        return np.zeros(3), 0.0, 0
    drift = np.linalg.lstsq(along[:, None], inplane, rcond=None)[0][0]
    resid = np.linalg.norm(inplane - np.outer(along, drift), axis=1)
    worst = int(np.argmax(resid))
    return drift, float(resid[worst]), worst


def check_stack(ipps: np.ndarray, iop: Sequence[float] | np.ndarray,
                policy: GeometryPolicy = DEFAULT_POLICY) -> StackCheck:
    """Sort slices along the normal and measure uniformity, gaps, duplicates and tilt.

    Args:
        ipps: (K, 3) ImagePositionPatient of each slice (LPS mm), any order.
        iop: (6,) the stack's ImageOrientationPatient.
        policy: the tolerances.

    Returns:
        StackCheck (never raises; :func:`stack_geometry` turns its findings into errors).
    """
    ipps = np.asarray(ipps, dtype=np.float64).reshape(-1, 3)
    normal = slice_normal(iop)
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    pos = dist[order]
    k = len(pos)
    steps = np.diff(pos)
    n_dup = int(np.count_nonzero(steps < DUPLICATE_TOL_MM))
    distinct = steps[steps >= DUPLICATE_TOL_MM]
    median = float(np.median(distinct)) if distinct.size else 0.0
    step = float(pos[-1] - pos[0]) / (k - 1) if k > 1 else 0.0
    dev = float(np.abs(pos - (pos[0] + step * np.arange(k))).max()) if k > 1 else 0.0
    uniform = n_dup == 0 and dev <= max(policy.spacing_tolerance * step, NOISE_MM)
    n_missing = 0
    gaps: list[tuple[float, float, float]] = []
    if not uniform and not n_dup and median > 0:
        n_missing, gaps = _classify_steps(pos, median, max(policy.spacing_tolerance * median, NOISE_MM))
    drift, off_line, worst = _drift(ipps[order], normal)
    tilt = math.degrees(math.atan(float(np.linalg.norm(drift))))
    return StackCheck(order=order, positions=pos, step=step, median_step=median, max_deviation_mm=dev,
                      uniform=uniform, n_duplicates=n_dup, n_missing=n_missing, gaps=gaps, drift=drift,
                      tilt_deg=tilt, off_line_mm=off_line, off_line_index=int(order[worst]), policy=policy)


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of one sorted stack of parallel slices.

    Attributes:
        check: what :func:`check_stack` found (order, positions, steps, tilt, policy).
        origin: (3,) LPS position of the first sorted slice.
        row, col, normal: (3,) LPS unit vectors (i, j and slice directions).
        pixel_spacing: (sx, sy) mm along i and j (PixelSpacing[1], PixelSpacing[0]).
        spacing: slice step along the normal (end-to-end; SliceThickness for K = 1).
        drift: (3,) in-plane displacement of the slice origin per mm along the normal.
    """

    check: StackCheck
    origin: np.ndarray
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    spacing: float
    drift: np.ndarray

    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> RAS affine; the k column follows the real slice drift (shear)."""
        lps = np.eye(4)
        lps[:3, 0] = self.row * self.pixel_spacing[0]
        lps[:3, 1] = self.col * self.pixel_spacing[1]
        lps[:3, 2] = (self.normal + self.drift) * self.spacing
        lps[:3, 3] = self.origin
        return LPS_TO_RAS @ lps


def stack_geometry(ipps: np.ndarray, iop: np.ndarray, pixel_spacing: tuple[float, float], *,
                   slice_thickness: float | None, sources: Sequence[str],
                   policy: GeometryPolicy = DEFAULT_POLICY) -> StackGeometry:
    """:func:`check_stack`, then refuse what cannot be one volume, and build the geometry.

    Args:
        ipps: (K, 3) ImagePositionPatient of each slice (LPS mm), in file order.
        iop: (6,) the stack's ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing) in mm.
        slice_thickness: used as the spacing of a single-slice stack.
        sources: (K,) file names (or file#frame) for error messages.
        policy: the tolerances.

    Raises:
        DicomError: two slices at one position (interleaved phases/echoes), or slice origins that
            do not lie on one straight line.
    """
    cos = np.asarray(iop, dtype=np.float64)
    row = cos[:3] / np.linalg.norm(cos[:3])
    col = cos[3:] / np.linalg.norm(cos[3:])
    normal = slice_normal(cos)
    chk = check_stack(ipps, cos, policy)
    sx, sy = float(pixel_spacing[1]), float(pixel_spacing[0])
    if chk.n_duplicates:
        steps = np.diff(chk.positions)
        d = int(np.flatnonzero(steps < DUPLICATE_TOL_MM)[0])
        raise DicomError(
            f"{chk.n_duplicates} pair(s) of slices share one position along the normal, e.g. "
            f"{sources[chk.order[d]]} and {sources[chk.order[d + 1]]} at {chk.positions[d]:.3f} mm: the "
            f"list mixes phases, echoes or acquisitions; load the folder (mmai.io.reader.load_volume, "
            f"select={{'phase': n}}) or one stack of mmai.io.dicom_scan.scan_stacks")
    if chk.off_line_mm > LINE_TOL_PIXELS * min(sx, sy):
        raise DicomError(
            f"slice origins do not lie on one straight line: {sources[chk.off_line_index]} is "
            f"{chk.off_line_mm:.3f} mm off (allowed {LINE_TOL_PIXELS * min(sx, sy):.3f} mm); the files "
            f"are not one stack")
    ipp0 = np.asarray(ipps, dtype=np.float64).reshape(-1, 3)[chk.order[0]]
    if len(chk.positions) == 1:
        spacing = float(slice_thickness) if slice_thickness and slice_thickness > 0 else 1.0
    else:
        spacing = chk.step
    return StackGeometry(check=chk, origin=ipp0, row=row, col=col, normal=normal, pixel_spacing=(sx, sy),
                         spacing=spacing, drift=chk.drift)


def uniform_grid(chk: StackCheck) -> np.ndarray:
    """(K',) positions of the uniform grid that covers the first..last slice (like dcm2niix's
    ``_Eq``): K' = round(extent / median step) + 1 slices, step = extent / (K' - 1)."""
    pos = chk.positions
    extent = float(pos[-1] - pos[0])
    k_out = max(2, int(round(extent / chk.median_step)) + 1)
    return pos[0] + np.arange(k_out) * (extent / (k_out - 1))


def resample_positions(volume: np.ndarray, positions: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Resample slices linearly along k from ``positions`` onto ``target`` (both ascending).

    Args:
        volume: (K, J, I) slices in ascending position.
        positions: (K,) their positions along the normal (mm).
        target: (K',) output positions within [positions[0], positions[-1]].

    Returns:
        (K', J, I) float32.
    """
    hi = np.clip(np.searchsorted(positions, target, side="right"), 1, len(positions) - 1)
    lo = hi - 1
    w = np.clip((target - positions[lo]) / (positions[hi] - positions[lo]), 0.0, 1.0).astype(np.float32)
    out = np.empty((len(target),) + volume.shape[1:], dtype=np.float32)
    for k in range(len(target)):
        np.multiply(volume[lo[k]], 1 - w[k], out=out[k], casting="unsafe")
        out[k] += volume[hi[k]] * w[k]
    return out


def deshear(volume: np.ndarray, geom: StackGeometry, positions: np.ndarray,
            fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample tilted slices onto an orthogonal grid (bilinear in-plane shift per slice).

    The in-plane grid grows so that every acquired voxel stays inside (as dcm2niix does); voxels
    no slice covers get ``fill``. Voxel (i, j, k) of the output sits at
    new_origin + i*sx*row + j*sy*col + (p_k - p_0)*normal, while the tilted input slice k has its
    origin shifted in-plane by (p_k - p_0) * drift.

    Args:
        volume: (K, J, I) slices (sorted).
        geom: the stack's geometry (drift != 0).
        positions: (K,) positions of the slices along the normal.
        fill: value for voxels that fall outside every acquired slice.

    Returns:
        ((K, J', I') float32, (3,) LPS origin of the new grid).
    """
    from scipy.ndimage import affine_transform

    sx, sy = geom.pixel_spacing
    t = positions - positions[0]
    si = t * float(geom.drift @ geom.row) / sx  # in-plane shift of slice k along i (voxels)
    sj = t * float(geom.drift @ geom.col) / sy
    lo_i, hi_i = math.floor(min(0.0, si.min()) + 1e-6), math.ceil(max(0.0, si.max()) - 1e-6)
    lo_j, hi_j = math.floor(min(0.0, sj.min()) + 1e-6), math.ceil(max(0.0, sj.max()) - 1e-6)
    k_n, j_n, i_n = volume.shape
    out = np.empty((k_n, j_n + hi_j - lo_j, i_n + hi_i - lo_i), dtype=np.float32)
    grid_j, grid_i = np.arange(out.shape[1]), np.arange(out.shape[2])
    for k in range(k_n):
        # out[j, i] = in[j + lo_j - sj, i + lo_i - si]; a pixel covers +-0.5 voxel (as in ITK):
        # inside that, edge pixels extend (mode "nearest"); outside, ``fill``.
        offset = (lo_j - sj[k], lo_i - si[k])
        out[k] = affine_transform(volume[k].astype(np.float32, copy=False), [1.0, 1.0], offset=offset,
                                  output_shape=out.shape[1:], order=1, mode="nearest", prefilter=False)
        src_j, src_i = grid_j + offset[0], grid_i + offset[1]
        out[k, (src_j < -0.5) | (src_j >= j_n - 0.5), :] = fill
        out[k, :, (src_i < -0.5) | (src_i >= i_n - 0.5)] = fill
    origin = geom.origin + lo_i * sx * geom.row + lo_j * sy * geom.col
    return out, origin
