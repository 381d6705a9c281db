"""Slice geometry of a DICOM stack: sort along the normal, spacing, gaps, gantry tilt, affine.

Pure numpy, no file access. Positions are LPS millimetres (DICOM). The returned affine maps
(i, j, k, 1) to RAS millimetres (NIfTI / MONAI), with i along the row cosine, j along the column
cosine and k ascending along ``normal = cross(row_cosine, col_cosine)`` (docs/dicom.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmai.errors import DicomError

#: LPS -> RAS: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Positions closer than this (mm, along the normal) are "the same slice position".
DUPLICATE_TOL_MM = 1e-3
#: In-plane drift of the slice origins above this (mm, over the stack) counts as gantry tilt.
TILT_TOL_MM = 1e-2


@dataclass(frozen=True)
class StackGeometry:
    """Geometry of one sorted stack of parallel slices.

    Attributes:
        order: (K,) indices of the input slices in ascending position along the normal.
        positions: (K,) sorted distances along the normal (mm).
        origin: (3,) LPS position of the first sorted slice.
        row, col, normal: (3,) LPS unit vectors (i, j and slice directions).
        pixel_spacing: (sx, sy) mm along i and j (PixelSpacing[1], PixelSpacing[0]).
        spacing: slice spacing along the normal (median of the gaps; SliceThickness for K = 1).
        drift: (3,) in-plane displacement of the slice origin per mm along the normal (0 without tilt).
        tilt_deg: gantry tilt angle (degrees) derived from ``drift``.
        gaps: list of (position_before, position_after, gap_mm) where spacing is uneven.
    """

    order: np.ndarray
    positions: np.ndarray
    origin: np.ndarray
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    pixel_spacing: tuple[float, float]
    spacing: float
    drift: np.ndarray
    tilt_deg: float
    gaps: list[tuple[float, float, float]]

    @property
    def tilted(self) -> bool:
        return bool(np.any(self.drift != 0))

    @property
    def uneven(self) -> bool:
        return bool(self.gaps)

    def affine(self, *, shear: bool = True) -> np.ndarray:
        """(4, 4) voxel -> RAS affine; with ``shear`` the k column follows the real slice drift."""
        step = self.normal * self.spacing
        if shear:
            step = step + self.drift * self.spacing
        lps = np.eye(4)
        lps[:3, 0] = self.row * self.pixel_spacing[0]
        lps[:3, 1] = self.col * self.pixel_spacing[1]
        lps[:3, 2] = step
        lps[:3, 3] = self.origin
        return LPS_TO_RAS @ lps


def orientation_label(iop: Sequence[float] | np.ndarray, *, max_angle_deg: float = 10.0) -> str:
    """'axial', 'coronal', 'sagittal' or 'oblique' from ImageOrientationPatient.

    The slice normal must lie within ``max_angle_deg`` of a patient axis to get that axis' name.
    """
    cos = np.asarray(iop, dtype=np.float64)
    normal = np.cross(cos[:3], cos[3:])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < math.cos(math.radians(max_angle_deg)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def stack_geometry(
    ipps: np.ndarray,
    iop: np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    slice_thickness: float | None,
    sources: Sequence[str],
) -> StackGeometry:
    """Sort slices along the normal and measure spacing, gaps and tilt.

    Args:
        ipps: (K, 3) ImagePositionPatient of each slice (LPS mm), in file order.
        iop: (6,) the stack's ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: DICOM PixelSpacing (row spacing, column spacing) in mm.
        slice_thickness: used as the spacing of a single-slice stack.
        sources: (K,) file names (or file#frame) for error messages.

    Raises:
        DicomError: two slices at one position (interleaved phases/echoes), or slice origins that
            do not lie on one straight line.
    """
    cos = np.asarray(iop, dtype=np.float64)
    row = cos[:3] / np.linalg.norm(cos[:3])
    col = cos[3:] / np.linalg.norm(cos[3:])
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    pos = dist[order]
    ipps_sorted = ipps[order]
    sx, sy = float(pixel_spacing[1]), float(pixel_spacing[0])
    n = len(order)
    if n == 1:
        spacing = float(slice_thickness) if slice_thickness and slice_thickness > 0 else 1.0
        return StackGeometry(order, pos, ipps_sorted[0], row, col, normal, (sx, sy), spacing,
                             np.zeros(3), 0.0, [])
    diffs = np.diff(pos)
    dup = np.flatnonzero(diffs < DUPLICATE_TOL_MM)
    if dup.size:
        pairs = [(sources[order[d]], sources[order[d + 1]]) for d in dup[:3]]
        raise DicomError(
            f"{dup.size} pair(s) of slices share one position along the normal, e.g. "
            f"{pairs[0][0]} and {pairs[0][1]} at {pos[dup[0]]:.3f} mm: the list mixes phases, echoes or "
            f"acquisitions; split it first (mmai.io.dicom_series.split_by_phase) and load each part"
        )
    spacing = float(np.median(diffs))
    tol = max(1e-3, 1e-2 * spacing)
    gaps = [(float(pos[g]), float(pos[g + 1]), float(diffs[g]))
            for g in np.flatnonzero(np.abs(diffs - spacing) > tol)]
    # In-plane offset of each slice origin relative to the first: linear in position for tilt.
    rel = ipps_sorted - ipps_sorted[0]
    along = rel @ normal
    inplane = rel - np.outer(along, normal)
    drift = np.zeros(3)
    if float(np.abs(inplane).max()) > TILT_TOL_MM:
        drift = np.linalg.lstsq(along[:, None], inplane, rcond=None)[0][0]
        resid = inplane - np.outer(along, drift)
        worst = int(np.argmax(np.linalg.norm(resid, axis=1)))
        if np.linalg.norm(resid[worst]) > 0.1 * min(sx, sy):
            raise DicomError(
                f"slice origins do not lie on one straight line: {sources[order[worst]]} is "
                f"{np.linalg.norm(resid[worst]):.3f} mm off (allowed {0.1 * min(sx, sy):.3f} mm); "
                f"the files are not one stack"
            )
    tilt_deg = math.degrees(math.atan(float(np.linalg.norm(drift))))
    return StackGeometry(order, pos, ipps_sorted[0], row, col, normal, (sx, sy), spacing, drift,
                         tilt_deg, gaps)


def describe_gaps(geom: StackGeometry, limit: int = 5) -> str:
    """Human text naming the uneven gaps, e.g. '12.000->16.000 mm (gap 4.000)'."""
    parts = [f"{a:.3f}->{b:.3f} mm (gap {g:.3f})" for a, b, g in geom.gaps[:limit]]
    more = f" and {len(geom.gaps) - limit} more" if len(geom.gaps) > limit else ""
    return ", ".join(parts) + more


def resample_even(volume: np.ndarray, geom: StackGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Resample along k to equal spacing (linear), keeping the first and last slice positions.

    Args:
        volume: (K, J, I) slices in sorted order.
        geom: the stack's geometry (positions may be uneven).

    Returns:
        ((K', J, I) float32 resampled slices, (K',) their positions along the normal).
    """
    pos = geom.positions
    extent = float(pos[-1] - pos[0])
    k_out = max(2, int(round(extent / geom.spacing)) + 1)
    target = pos[0] + np.arange(k_out) * (extent / (k_out - 1))
    hi = np.clip(np.searchsorted(pos, target, side="right"), 1, len(pos) - 1)
    lo = hi - 1
    w = ((target - pos[lo]) / (pos[hi] - pos[lo])).astype(np.float32)
    out = np.empty((k_out,) + volume.shape[1:], dtype=np.float32)
    for k in range(k_out):
        out[k] = volume[lo[k]] * (1 - w[k]) + volume[hi[k]] * w[k]
    return out, target


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
