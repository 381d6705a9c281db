"""Mask-free image descriptors: an inventory of the focal objects of a volume (blob radiomics).

Without a lesion mask nothing tells mmai where the lesion is, yet how big the largest focal
lesion is and how many there are (a tumour's diameter, a count of enlarged lymph nodes) are what
a radiologist reads off the scan, and what a CNN trained on a few hundred labels does not learn
(docs/benchmarks.md, "Semi-real cohort (issue 16)"). :func:`focal_descriptors` measures them
directly, with no threshold in scanner units, so it applies to any windowed or normalised volume:

1. **Candidates**: scale-normalised Laplacian-of-Gaussian blob detection (Lindeberg, "Feature
   detection with automatic scale selection", IJCV 30:79-116, 1998; as
   ``skimage.feature.blob_log``), in millimetres on the volume's own (possibly anisotropic)
   spacing: radii from :data:`R_MIN_MM` up to a quarter of the smallest field of view, sigma =
   r / sqrt(3); maxima over space and scale whose response exceeds :data:`K_RESPONSE` robust
   standard deviations (1.4826 MAD) of that scale's response over the body.
2. **Objects**: each candidate (strongest first) is grown into its region: the connected voxels
   around its centre above ``bg + f (peak - bg)`` (peak: the light-smoothed value at the
   centre; bg: the median of a shell at 1.5-2.5 radii), for the first f of :data:`LEVELS`
   (0.5 .. 0.8) whose region is enclosed in the search box (a lesion touching a muscle or the
   glandular tissue separates from it at a higher level); never below the floor. A candidate is
   kept when its peak exceeds the floor (:data:`TISSUE_PERCENTILE` % of the body's voxels without
   its extended bright structures such as a muscle layer, :func:`_tissue_floor`) by
   :data:`K_FLOOR` and the local background by :data:`K_NOISE` noise standard deviations (MAD of
   the high-pass residual); the floor is first brought towards the local background by the
   fraction of a ball's contrast that survives the blur at the candidate's scale
   (:func:`_ball_peak`: a 5 mm node at 3 mm keeps about a third of its contrast at its peak, so
   an unattenuated floor at the glandular tissue's level dropped every small node), when some level's region (cut at 1.5 radii, so touching neighbours
   stay apart) does not reach the border of its box (a plate, a tube or a network is not focal),
   and when its centre is not inside an object already kept (a voxel belongs to the first object
   that claims it). Measured on 13 cohort variants (contrast, noise, voxel size, node size and
   gaps, tumour shape, body size; ``benchmarks/focal_variants.py``, docs/benchmarks.md).
3. **Inventory** (:data:`FOCAL_NAMES`): number of objects, counts by equivalent-sphere diameter
   (< 10 mm, 10-20 mm, >= 20 mm), the largest object's equivalent diameter and volume, the
   second largest's diameter, the total volume, and log(1 + count). The models take
   :data:`FOCAL_INPUTS` (the count and the largest diameter) by default.

The numbers enter the models as numeric features exactly like the lesion descriptors
(:mod:`mmai.data.descriptors`), so the GLM base term (a penalised Cox / logistic model on
clinical + image descriptors, what a radiomics statistician would fit) starts from them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: bump when a definition changes (recorded in state.json)
FOCAL_VERSION = 4  # 2: volumes over MAX_VOXELS block-averaged; 3: floor without muscle layers, level search;
# 4: the floor attenuated per candidate scale like a blurred ball's peak (small nodes)
FOCAL_NAMES: tuple[str, ...] = (
    "focal_count", "focal_log_count", "focal_count_lt10mm", "focal_count_10_20mm", "focal_count_ge20mm",
    "focal_largest_diameter_mm", "focal_largest_volume_mm3", "focal_second_diameter_mm", "focal_total_volume_mm3")
#: what the models take by default (mmai.data.descriptors): how many, and how big the largest. On
#: the semi-real cohort (467 training patients) the whole inventory in a ridge Cox model scored
#: 0.590 / 0.661 (image / with the table) against 0.600 / 0.683 for these two: with a few hundred
#: labels, the other seven add variance, not signal (docs/benchmarks.md, "Semi-real cohort")
FOCAL_INPUTS: tuple[str, ...] = ("focal_count", "focal_largest_diameter_mm")
R_MIN_MM = 2.0
N_SCALES = 10
K_RESPONSE = 3.0
TISSUE_PERCENTILE = 90.0
K_NOISE = 4.0
MAX_OBJECTS = 200
K_FLOOR = 3.0
MAX_VOXELS = 2_000_000
WORK_SPACING_MM = 3.0
#: a bright component spanning this fraction of the body along an axis (a muscle layer) is not
#: tissue around focal objects: left out of the floor's percentile
STRUCT_FRACTION = 0.8
#: region levels tried in turn (fractions of peak - bg): the first whose region is enclosed
LEVELS = (0.5, 0.6, 0.7, 0.8)
#: blur (SD, in voxels) between a ball in the scanned body and the light-smoothed volume the floor
#: test reads, as variances in voxel^2: the 0.5-voxel smoothing (1/4), the ball centre's offset from
#: the nearest voxel centre (uniform: 1/12) and a linear interpolation onto the volume's grid (a
#: triangle kernel one voxel wide: 1/6). The floor is attenuated by a ball's peak fraction under it
#: (:func:`_ball_peak`) at each candidate's scale (v4)
BLUR_VOXELS = math.sqrt(0.25 + 1.0 / 12.0 + 1.0 / 6.0)
_UNIT_NORMALS = np.random.default_rng(0).standard_normal((8192, 3))


def _ball_peak(r_mm: float, sp: np.ndarray) -> float:
    """The fraction of a uniform ball's contrast (radius ``r_mm``) left at its centre after a Gaussian
    blur of :data:`BLUR_VOXELS` voxels at spacing ``sp`` (3,) mm: the probability that the blur's
    displacement stays inside the ball (fixed quasi-random draws, so deterministic)."""
    sd = BLUR_VOXELS * np.asarray(sp, dtype=np.float64)
    return float(np.mean(((_UNIT_NORMALS * sd) ** 2).sum(axis=1) <= r_mm**2))


def _attenuated_floor(floor: float, bg: float, a: float) -> float:
    """The floor a candidate's peak must clear: ``floor`` brought towards its local background ``bg``
    by ``1 - a`` (``a``: :func:`_ball_peak` at its scale; a small ball peaks lower), ``floor`` itself
    where the background is at or above it. Non-decreasing in ``bg`` (``0 <= a <= 1``), so its value
    at the volume's minimum bounds it from below before the shell's median is known."""
    return bg + a * (floor - bg) if floor > bg else floor


def _skip_below(atten: Sequence[float], floor: float, lowest: float) -> list[float]:
    """Per scale, a peak at or under which a candidate cannot pass the floor test, known before its
    box is built: :func:`_attenuated_floor` at the volume's minimum ``lowest`` (the shell's median is
    >= it). Dropping those candidates early changes no decision and saves ~40 % of the inventory's
    time on a chest CT (most LoG maxima there are dim)."""
    return [_attenuated_floor(floor, lowest, a) for a in atten]


def _body(x: np.ndarray) -> np.ndarray:
    """Voxels clearly above the volume's floor (air, or the clipped bottom of a window): the body."""
    lo, hi = np.percentile(x, [1, 99])
    return x > lo + 0.1 * (hi - lo)


def _tissue_floor(smooth: np.ndarray, body: np.ndarray, first: float) -> float:
    """The floor of focal objects: :data:`TISSUE_PERCENTILE` % of the body without its extended bright
    structures (the components of ``smooth > first`` spanning :data:`STRUCT_FRACTION` of the body
    along an axis, e.g. a muscle layer); ``first`` (the percentile over the whole body) when there
    are none. Over the whole body the percentile fell on the muscle in some scans and on the
    glandular tissue in others, and lesions enhancing like muscle were lost (focal_variants.py)."""
    lab, n = ndimage.label(smooth > first)
    if n == 0:
        return first
    bsl = ndimage.find_objects(body.astype(np.int8))[0]
    bext = np.array([sl.stop - sl.start for sl in bsl])
    ext = np.array([[sl.stop - sl.start for sl in sls] for sls in ndimage.find_objects(lab)])
    big = np.flatnonzero((ext >= STRUCT_FRACTION * bext[None]).any(axis=1)) + 1
    if big.size == 0:
        return first
    keep = body & ~np.isin(lab, big)
    if keep.sum() < 27:
        return first
    return float(np.percentile(smooth[keep], TISSUE_PERCENTILE))


def _mad(v: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(v - np.median(v)))) if v.size else 0.0


def _log_stack(x: np.ndarray, sp: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(S, I, J, K): minus the scale-normalised Laplacian of Gaussian, in mm, one per radius.

    The central second difference along an axis (edge-replicated) is ``(next - 2 g + prev) / h^2``
    in float32, evaluated in that order in one reused buffer (no padded copies); the values are
    those of the padded formulation bit for bit."""
    out = np.empty((len(radii), *x.shape), dtype=np.float32)
    x32 = x.astype(np.float32)
    g = np.empty(x.shape, dtype=np.float32)
    lap = np.empty(x.shape, dtype=np.float32)
    t = np.empty(x.shape, dtype=np.float32)
    for s, r in enumerate(radii):
        sigma_mm = r / math.sqrt(3.0)
        ndimage.gaussian_filter(x32, sigma_mm / sp, output=g, mode="nearest")
        lap.fill(0.0)
        for axis in range(3):  # central second differences of the smoothed volume, in mm^-2
            _second_difference(g, axis, t)
            t /= np.float32(sp[axis] ** 2)
            lap += t
        np.multiply(-(sigma_mm**2), lap, out=out[s])
    return out


def _second_difference(g: np.ndarray, axis: int, t: np.ndarray) -> None:
    """``t`` = (next - 2 g) + prev along ``axis`` of ``g`` (float32, the edge value beyond each end)."""
    n = g.shape[axis]

    def at(a: np.ndarray, sl: slice) -> np.ndarray:
        return a[(slice(None),) * axis + (sl,)]

    np.multiply(g, 2, out=t)
    if n > 1:
        np.subtract(at(g, slice(1, None)), at(t, slice(None, -1)), out=at(t, slice(None, -1)))
    np.subtract(at(g, slice(n - 1, None)), at(t, slice(n - 1, None)), out=at(t, slice(n - 1, None)))
    if n > 1:
        np.add(at(t, slice(1, None)), at(g, slice(None, -1)), out=at(t, slice(1, None)))
    np.add(at(t, slice(0, 1)), at(g, slice(0, 1)), out=at(t, slice(0, 1)))


def _max3(a: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.maximum_filter(a, size=3, mode="nearest")`` (any number of dimensions), by
    separable maxima of shifted views: the same values (a maximum rounds nothing), several times
    faster on the (S, I, J, K) LoG stack."""
    src, dst, spare = a, np.empty_like(a), np.empty_like(a)
    for axis in range(a.ndim):
        if a.shape[axis] < 2:
            continue

        def at(v: np.ndarray, sl: slice, axis: int = axis) -> np.ndarray:
            return v[(slice(None),) * axis + (sl,)]

        np.maximum(at(src, slice(1, None)), at(src, slice(None, -1)), out=at(dst, slice(1, None)))
        at(dst, slice(0, 1))[...] = at(src, slice(0, 1))
        np.maximum(at(dst, slice(None, -1)), at(src, slice(1, None)), out=at(dst, slice(None, -1)))
        src, dst = dst, (spare if src is a else src)
    return src if src is not a else a.copy()


def _region(smooth: np.ndarray, box: tuple[slice, ...], centre: np.ndarray, dist: np.ndarray, r: float,
            level: float, full: tuple[int, ...]) -> np.ndarray | None:
    """The object around ``centre`` (voxel index inside ``box``): the connected voxels above
    ``level`` containing it, cut at 1.5 radii (touching neighbours stay apart); None when that
    component reaches the search box's border inside the volume (a plate, a tube or a network,
    e.g. a muscle band or glandular tissue, is not focal)."""
    lab, _ = ndimage.label(smooth[box] > level)
    own = lab[tuple(centre)]
    if own == 0:
        return None
    comp = lab == own
    for axis, sl in enumerate(box):
        if (sl.start > 0 and np.take(comp, 0, axis=axis).any()) or \
                (sl.stop < full[axis] and np.take(comp, -1, axis=axis).any()):
            return None
    return comp & (dist <= 1.5 * r)


def focal_objects(volume: np.ndarray, spacing: Sequence[float]) -> list[dict[str, float]]:
    """The focal objects of a volume (see the module docstring).

    Args:
        volume: (I, J, K) intensities (HU, a window in [0, 1], z-scores: any monotone scale).
        spacing: (3,) mm per voxel along I, J, K.

    Returns:
        one ``{"volume_mm3", "diameter_mm", "centre_i", "centre_j", "centre_k", "radius_mm"}`` per
        object, strongest candidate first.
    """
    x = np.asarray(volume, dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64)
    if x.ndim != 3 or sp.shape != (3,):
        raise ValueError(f"focal_objects needs a 3D volume and 3 spacings, got {x.shape} / {tuple(sp)}")
    body = _body(x)
    if body.sum() < 27:
        return []
    tissue = x[body]
    t_med = float(np.median(tissue))
    noise = _mad((x - ndimage.gaussian_filter(x, 1.0, mode="nearest"))[body]) + 1e-9
    smooth = ndimage.gaussian_filter(x, 0.5, mode="nearest")
    fov = float(min(np.asarray(x.shape) * sp))
    r_max = max(R_MIN_MM * 1.5, min(0.25 * fov, 80.0))
    radii = np.geomspace(max(R_MIN_MM, 0.75 * float(sp.min())), r_max, N_SCALES)
    stack = _log_stack(x, sp, radii)
    thr = np.array([K_RESPONSE * max(_mad(stack[s][body]), 1e-9) for s in range(len(radii))])
    peaks = (stack == _max3(stack)) & (stack > thr[:, None, None, None]) & body[None]
    cand = np.argwhere(peaks)  # (n, 4): scale, i, j, k
    order = np.argsort(-(stack[tuple(cand.T)] / thr[cand[:, 0]]))
    taken = np.zeros(x.shape, dtype=bool)
    objects: list[dict[str, float]] = []
    floor = _tissue_floor(smooth, body, float(np.percentile(tissue, TISSUE_PERCENTILE)))
    voxel_mm3 = float(np.prod(sp))
    atten = [_ball_peak(float(r), sp) for r in radii]
    skip_below = _skip_below(atten, floor, float(x.min()))
    for s, i, j, k in cand[order]:
        if len(objects) >= MAX_OBJECTS:
            break
        c = np.array([i, j, k])
        if taken[i, j, k]:
            continue
        r = float(radii[s])
        r_vox = r / sp
        peak = float(smooth[i, j, k])
        if peak <= skip_below[s]:
            continue
        half = np.ceil(2.5 * r_vox).astype(int) + 1
        lo, hi = np.maximum(c - half, 0), np.minimum(c + half + 1, x.shape)
        grids = np.meshgrid(*[(np.arange(a, b) - cc) * d for a, b, cc, d in zip(lo, hi, c, sp, strict=True)],
                            indexing="ij", sparse=True)
        dist = np.sqrt(sum(g**2 for g in grids))
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        shell = (dist >= 1.5 * r) & (dist <= 2.5 * r)
        bg = float(np.median(x[box][shell])) if shell.any() else t_med
        fl = _attenuated_floor(floor, bg, atten[s])
        if peak <= fl or peak - bg < K_NOISE * noise or peak - fl < K_FLOOR * noise:
            continue
        reg = None
        for lev in LEVELS:
            reg = _region(smooth, box, c - lo, dist, r, max(bg + lev * (peak - bg), fl), x.shape)
            if reg is not None:
                break
        if reg is None:
            continue
        reg &= ~taken[box]  # a voxel belongs to the first (strongest) object that claims it
        taken[box] |= reg
        vol = float(reg.sum()) * voxel_mm3
        objects.append({"volume_mm3": vol, "diameter_mm": (6.0 * vol / math.pi) ** (1.0 / 3.0),
                        "centre_i": float(i), "centre_j": float(j), "centre_k": float(k), "radius_mm": r})
    return objects


def inventory(objects: list[dict[str, float]]) -> np.ndarray:
    """(len(FOCAL_NAMES),) float64 summary of :func:`focal_objects`' list (zeros when empty)."""
    d = np.sort(np.array([o["diameter_mm"] for o in objects], dtype=np.float64))[::-1]
    v = np.array([o["volume_mm3"] for o in objects], dtype=np.float64)
    n = len(objects)
    return np.array([
        n, math.log1p(n), float((d < 10).sum()), float(((d >= 10) & (d < 20)).sum()), float((d >= 20).sum()),
        float(d[0]) if n else 0.0, float(v.max()) if n else 0.0, float(d[1]) if n > 1 else 0.0,
        float(v.sum())])


def coarsened(volume: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` block-averaged towards :data:`WORK_SPACING_MM` when it has more than
    :data:`MAX_VOXELS` voxels (whole factors per axis, none where the spacing is already coarser),
    with its new spacing. The inventory was measured at 2-4 mm; a 1.5 mm chest CT's 10 M voxels
    cost about 15 s of LoG filtering, its 3 mm version about 1/8 of that."""
    x = np.asarray(volume)
    sp = np.asarray(spacing, dtype=np.float64)
    if x.size <= MAX_VOXELS:
        return x, sp
    f = np.maximum(1, np.floor(WORK_SPACING_MM / sp + 1e-6)).astype(int)
    n = np.asarray(x.shape) // f
    if (f == 1).all() or (n < 3).any():
        return x, sp
    cut = x[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]].astype(np.float32)
    blocks = cut.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
    return blocks, sp * f


def focal_descriptors(volume: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The focal-object inventory of ``volume`` (I, J, K) at ``spacing`` (3,) mm, in the order of
    :data:`FOCAL_NAMES` (a volume over :data:`MAX_VOXELS` voxels is measured on :func:`coarsened`)."""
    small, sp = coarsened(volume, spacing)
    return inventory(focal_objects(small, sp.tolist()))
