"""Lesion descriptors: first-order intensity statistics and shape of a lesion mask (radiomics).

:func:`lesion_descriptors` is the array operation: a volume in physical units (HU for CT), its
lesion mask on the same grid and the grid's spacing -> one float per name in
:data:`DESCRIPTOR_NAMES` (NaN where the mask is empty). :class:`LesionDescriptorsd` is the
dictionary wrapper that the preprocessing chain runs right after the lesion box is cut
(:class:`~mmai.transforms.roi.RoiBoxd`): the box at the pipeline's spacing, BEFORE intensity
windowing or normalisation, so the statistics are in the scanner's units.

Definitions follow the Image Biomarker Standardisation Initiative (IBSI; Zwanenburg et al.,
"The Image Biomarker Standardization Initiative", Radiology 295:328-338, 2020, reference manual
arXiv:1612.07003) and pyradiomics (van Griethuysen et al., Cancer Research 77:e104, 2017;
https://pyradiomics.readthedocs.io/en/latest/features.html):

First order (IBSI 3.3 "intensity-based statistical features", on the voxels X inside the mask):
``lesion_mean``, ``lesion_std`` (population, ddof 0: sqrt of IBSI "variance"), ``lesion_min``,
``lesion_p10``, ``lesion_p25``, ``lesion_median``, ``lesion_p75``, ``lesion_p90``, ``lesion_max``
(linear-interpolated percentiles, as numpy / pyradiomics), ``lesion_skewness`` (m3 / m2^1.5) and
``lesion_kurtosis`` (IBSI's excess kurtosis m4 / m2^2 - 3; pyradiomics reports it without the
-3). Skewness and kurtosis are 0 for a constant lesion (pyradiomics' convention).

Shape (IBSI 3.1 "morphological features"; in mm, from the mask on the pipeline's grid):
``lesion_volume_mm3`` (voxel counting: N voxels x voxel volume, IBSI "volume (voxel counting)",
pyradiomics ``VoxelVolume``); ``lesion_surface_mm2``: area of the mask's iso-surface at 0.5
(IBSI "surface area (mesh)"): marching cubes on the binary mask, so the mesh vertices are the
midpoints of the voxel edges that cross the lesion's border, implemented here in numpy as a
table over the 256 corner patterns of a cell (an ambiguous face cuts off each inside corner;
polygons triangulated around their centroid); ``lesion_sphericity``: (36 pi V^2)^(1/3) / A
with V the volume enclosed by that mesh (IBSI / pyradiomics use the mesh volume here), 1 for a
perfect sphere; ``lesion_max_diameter_mm``: largest distance between two mesh vertices (IBSI
"maximum 3D diameter", pyradiomics ``Maximum3DDiameter``), over the convex hull's vertices;
``lesion_major_axis_mm`` / ``lesion_minor_axis_mm`` / ``lesion_least_axis_mm``: 4 sqrt(lambda)
of the eigenvalues lambda_major >= lambda_minor >= lambda_least of the covariance (ddof 0) of the
physical coordinates of the mask's voxel centres (IBSI 3.1.9-3.1.11, pyradiomics ``*AxisLength``;
for a solid ellipsoid of semi-axis a this is 4a / sqrt(5)); ``lesion_elongation`` =
sqrt(lambda_minor / lambda_major) and ``lesion_flatness`` = sqrt(lambda_least / lambda_major)
(IBSI 3.1.12-3.1.13; 1 for a sphere, -> 0 for a needle / a disc).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from mmai.transforms.roi import MASK_KEY

log = logging.getLogger(__name__)

#: output key of :class:`LesionDescriptorsd` in the data dict: ``{name: float}`` (NaN = missing)
DESCRIPTORS_KEY = "lesion_descriptors"
#: bump when a definition changes (recorded with preprocessed volumes and in state.json)
DESCRIPTORS_VERSION = 1

FIRST_ORDER_NAMES: tuple[str, ...] = (
    "lesion_mean", "lesion_std", "lesion_min", "lesion_p10", "lesion_p25", "lesion_median", "lesion_p75",
    "lesion_p90", "lesion_max", "lesion_skewness", "lesion_kurtosis")
SHAPE_NAMES: tuple[str, ...] = (
    "lesion_volume_mm3", "lesion_surface_mm2", "lesion_sphericity", "lesion_max_diameter_mm",
    "lesion_major_axis_mm", "lesion_minor_axis_mm", "lesion_least_axis_mm", "lesion_elongation",
    "lesion_flatness")
#: every descriptor, in the order of :func:`lesion_descriptors`' output
DESCRIPTOR_NAMES: tuple[str, ...] = FIRST_ORDER_NAMES + SHAPE_NAMES


def first_order(values: np.ndarray) -> np.ndarray:
    """IBSI first-order statistics of the intensities inside a mask.

    Args:
        values: (N,) intensities of the lesion's voxels (N >= 1), in physical units.

    Returns:
        (11,) float64 in the order of :data:`FIRST_ORDER_NAMES`.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    mean = x.mean()
    d = x - mean
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    skew = m3 / m2**1.5 if m2 > 0 else 0.0
    kurt = m4 / m2**2 - 3.0 if m2 > 0 else 0.0
    p10, p25, p50, p75, p90 = np.percentile(x, [10, 25, 50, 75, 90])
    return np.array([mean, np.sqrt(m2), x.min(), p10, p25, p50, p75, p90, x.max(), skew, kurt])


# ----------------------------------------------------------------------------- mesh (marching cubes)

_CORNERS = np.array(list(itertools.product((0, 1), repeat=3)))  # (8, 3) cell corner offsets, index = 4i + 2j + k
# the 6 faces of a cell as corner cycles (consecutive corners share an edge)
_FACES = [(0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5)]


def _cell_surface(occ: Sequence[int], corners: np.ndarray) -> tuple[float, np.ndarray, float]:
    """The iso-surface piece of one cell with corner occupancy ``occ`` (8 x 0/1): marching cubes
    on a binary mask, i.e. polygons through the midpoints of the edges whose corners differ, joined
    face by face (on a face with two diagonal inside corners each inside corner is cut off on its
    own, so neighbouring cells agree) and triangulated as a fan around each polygon's centroid.

    Returns:
        (area, S, T): the area; S (3,) the sum of the outward area vectors; T the sum over the
        triangles of centroid . area vector (local coordinates), so that the enclosed volume of
        the whole surface is (1/3) sum over cells of (origin . S + T) (divergence theorem).
    """
    link: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for face in _FACES:
        edges = [tuple(sorted((face[t], face[(t + 1) % 4]))) for t in range(4)]
        crossing = [e for e in edges if occ[e[0]] != occ[e[1]]]
        if len(crossing) == 2:
            pairs = [tuple(crossing)]
        elif len(crossing) == 4:  # ambiguous face: cut off each inside corner
            pairs = [(edges[(t - 1) % 4], edges[t]) for t in range(4) if occ[face[t]]]
        else:
            pairs = []
        for a, b in pairs:
            link.setdefault(a, []).append(b)  # type: ignore[arg-type]
            link.setdefault(b, []).append(a)  # type: ignore[arg-type]
    area, s_vec, t_sum = 0.0, np.zeros(3), 0.0
    seen: set[tuple[int, int]] = set()
    for start in link:
        if start in seen:
            continue
        cycle, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [e for e in link[cur] if e != prev and (e not in seen or (e == start and len(cycle) > 2))]
            if not nxt or nxt[0] == start:
                break
            prev, cur = cur, nxt[0]
            cycle.append(cur)
            seen.add(cur)
        pts = np.array([(corners[a] + corners[b]) / 2 for a, b in cycle])
        out_dir = sum((corners[b] - corners[a]) if occ[a] else (corners[a] - corners[b]) for a, b in cycle)
        g = pts.mean(0)
        vecs = np.array([0.5 * np.cross(pts[t] - g, pts[(t + 1) % len(pts)] - g) for t in range(len(pts))])
        sign = 1.0 if vecs.sum(0) @ out_dir >= 0 else -1.0
        vecs *= sign
        cents = np.array([(g + pts[t] + pts[(t + 1) % len(pts)]) / 3 for t in range(len(pts))])
        area += float(np.linalg.norm(vecs, axis=1).sum())
        s_vec += vecs.sum(0)
        t_sum += float((cents * vecs).sum())
    return area, s_vec, t_sum


@functools.lru_cache(maxsize=16)
def _cell_tables(spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 8-corner occupancy code (256; corner c is bit 7 - c): area (256,), S (256, 3), T (256,)
    of :func:`_cell_surface` for a cell of ``spacing`` mm."""
    corners = _CORNERS * np.asarray(spacing, float)
    area, s_vec, t_sum = np.zeros(256), np.zeros((256, 3)), np.zeros(256)
    for code in range(1, 255):
        occ = [(code >> (7 - c)) & 1 for c in range(8)]
        area[code], s_vec[code], t_sum[code] = _cell_surface(occ, corners)
    return area, s_vec, t_sum


def mesh_area_volume(mask: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(surface area mm^2, enclosed volume mm^3) of the marching-cubes mesh of a binary mask at 0.5.

    Args:
        mask: (I, J, K) bool, the lesion (cropped or not; a one-voxel border is added).
        spacing: (3,) mm per voxel along I, J, K.
    """
    sp = tuple(float(s) for s in spacing)
    m = np.pad(np.asarray(mask, bool), 1).astype(np.uint8)
    n = m.shape
    code = np.zeros(tuple(s - 1 for s in n), dtype=np.uint8)
    for c, (di, dj, dk) in enumerate(_CORNERS):
        code |= m[di : di + n[0] - 1, dj : dj + n[1] - 1, dk : dk + n[2] - 1] << np.uint8(7 - c)
    area_t, s_t, t_t = _cell_tables(sp)  # type: ignore[arg-type]
    counts = np.bincount(code.ravel(), minlength=256)
    mixed = np.argwhere((code != 0) & (code != 255))
    codes = code[tuple(mixed.T)]
    volume = ((mixed * np.asarray(sp)) * s_t[codes]).sum() + t_t[codes].sum()
    return float(counts @ area_t), float(volume / 3.0)


def _mesh_vertices(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """(V, 3) mm: midpoints between each mask voxel and each of its 6-neighbours outside the mask
    (the vertices of marching cubes on a binary mask at level 0.5)."""
    m = np.pad(np.asarray(mask, bool), 1)
    verts = []
    for axis in range(3):
        a = np.swapaxes(m, 0, axis)
        edge = a[:-1] != a[1:]  # (n-1, ...) an edge crossing the surface between slab s and s + 1
        idx = np.argwhere(edge).astype(float)
        idx[:, 0] += 0.5
        idx[:, [0, axis]] = idx[:, [axis, 0]]
        verts.append(idx)
    v = np.concatenate(verts, axis=0) - 1.0  # undo the padding
    return v * spacing


def max_diameter(vertices: np.ndarray) -> float:
    """Largest pairwise distance (mm) of (V, 3) points, over their convex hull's vertices."""
    from scipy.spatial import ConvexHull, QhullError
    from scipy.spatial.distance import pdist

    pts = np.unique(vertices, axis=0)
    if len(pts) < 2:
        return 0.0
    with contextlib.suppress(QhullError, ValueError):  # flat (one-voxel-thick) lesions: no 3D hull, every vertex
        pts = pts[ConvexHull(pts).vertices]
    return float(pdist(pts).max())


def shape_features(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """IBSI morphological features of a non-empty binary mask.

    Args:
        mask: (I, J, K) bool with at least one voxel set.
        spacing: (3,) mm per voxel along I, J, K (anisotropic grids are measured in mm).

    Returns:
        (9,) float64 in the order of :data:`SHAPE_NAMES`.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = np.asarray(mask, bool)[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    volume = len(idx) * float(np.prod(sp))
    area, mesh_volume = mesh_area_volume(crop, tuple(sp))
    sphericity = (36.0 * np.pi * mesh_volume**2) ** (1.0 / 3.0) / area
    diameter = max_diameter(_mesh_vertices(crop, sp))
    xyz = idx * sp
    xyz = xyz - xyz.mean(0)
    lam = np.sort(np.clip(np.linalg.eigvalsh(xyz.T @ xyz / len(xyz)), 0.0, None))[::-1]  # major, minor, least
    axes = 4.0 * np.sqrt(lam)
    elong, flat = (np.sqrt(lam[1] / lam[0]), np.sqrt(lam[2] / lam[0])) if lam[0] > 0 else (np.nan, np.nan)
    return np.array([volume, area, sphericity, diameter, *axes, elong, flat])


def lesion_descriptors(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """First-order and shape descriptors of the lesion ``mask`` on ``image``.

    Args:
        image: (I, J, K) intensities in physical units (HU for CT), e.g. the lesion box at the
            pipeline's spacing before intensity windowing.
        mask: (I, J, K) lesion mask on the same grid (voxels > 0.5 are the lesion).
        spacing: (3,) mm per voxel along I, J, K.

    Returns:
        (len(DESCRIPTOR_NAMES),) float64, in that order; all NaN when the mask is empty.
    """
    img = np.asarray(image, dtype=np.float64)
    m = np.asarray(mask) > 0.5
    if img.shape != m.shape or img.ndim != 3:
        raise ValueError(f"image {img.shape} and mask {m.shape} must be the same 3D grid")
    if not m.any():
        return np.full(len(DESCRIPTOR_NAMES), np.nan)
    return np.concatenate([first_order(img[m]), shape_features(m, spacing)])


def touches_border(mask: np.ndarray) -> bool:
    """Whether a 3D mask has a voxel on the grid's border (a lesion cut by its box)."""
    m = np.asarray(mask) > 0.5
    return bool(m[[0, -1]].any() or m[:, [0, -1]].any() or m[:, :, [0, -1]].any())


class LesionDescriptorsd(MapTransform):
    """Dictionary wrapper of :func:`lesion_descriptors` (one image key).

    Reads the image ``(C, I, J, K)`` (channel 0: raw intensities) and ``roi_mask`` ``(1, I, J, K)``
    (the lesion box cut by :class:`~mmai.transforms.roi.RoiBoxd`) and writes ``lesion_descriptors``:
    ``{name: float}`` (NaN for all when the mask is absent or empty, with a warning naming the
    file). Nothing else changes. A lesion that touches the box's border is measured as cut and
    logged (enlarge ``image.roi.size_mm``).

    Args:
        keys: the image key.
        spacing: (3,) mm per voxel of the box grid (the pipeline's ``image.spacing``).
    """

    def __init__(self, keys: Any, *, spacing: Sequence[float]) -> None:
        super().__init__(keys)
        self.spacing = tuple(float(s) for s in spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            x = d[k]
            name = str(getattr(x, "meta", {}).get("filename_or_obj", k))
            m = d.get(MASK_KEY)
            img = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)[0]
            mask = None if m is None else np.asarray(m.detach().cpu() if hasattr(m, "detach") else m)[0]
            if mask is None or not (mask > 0.5).any():
                log.warning("%s: the lesion mask is %s on the pipeline's grid; its lesion descriptors are missing",
                            name, "absent" if mask is None else "empty")
                values = np.full(len(DESCRIPTOR_NAMES), np.nan)
            else:
                if touches_border(mask):
                    log.warning("%s: the lesion touches its %s mm box, so its descriptors measure the cut lesion; "
                                "enlarge image.roi.size_mm", name, "x".join(f"{s * n:g}" for s, n in
                                                                           zip(self.spacing, mask.shape, strict=True)))
                values = lesion_descriptors(img, mask, self.spacing)
            d[DESCRIPTORS_KEY] = dict(zip(DESCRIPTOR_NAMES, map(float, values), strict=True))
        return d
