"""Volumes for the offline viewer: block-downsampled, quantised, NIfTI + gzip + base64.

A viewer page carries its volumes inside the HTML, so they are made small first:

- every axis is reduced by a whole factor ``ceil(n / max_dim)`` (block mean for the scan, block
  max for the maps, so a small hot spot keeps its peak), the affine scaled and shifted to the
  block centres, so the volumes keep their place in world (RAS) space;
- the scan is stored as uint8 over its 0.5-99.5 percentile range, the maps (in [0, 1]) as uint8,
  each with the NIfTI ``scl_slope`` / ``scl_inter`` that map the bytes back to the original units
  (NiiVue applies them: the colour bar reads in HU for a CT);
- each volume is one gzip-compressed NIfTI-1 file, base64-encoded (NiiVue's
  ``NVImage.loadFromBase64`` reads it as it would read ``volume.nii.gz``).
"""

from __future__ import annotations

import base64
import gzip
import math
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from mmai.errors import MmaiError

_PCT = (0.5, 99.5)


@dataclass(frozen=True)
class ViewerVolumes:
    """One case's scan and maps on one (downsampled) grid, ready to embed.

    Attributes:
        image: the scan (X, Y, Z) float32, in its own units.
        maps: name -> map (X, Y, Z) float32 in [0, 1] (e.g. "saliency", "attention").
        affine: (4, 4) voxel -> world (RAS mm) of the downsampled grid.
        factors: the whole reduction factor of each axis (1 = kept).
        source_shape: the shape before downsampling.
        peak: the voxel (of the downsampled grid) where the first map is largest.
    """

    image: np.ndarray
    maps: dict[str, np.ndarray]
    affine: np.ndarray
    factors: tuple[int, int, int]
    source_shape: tuple[int, int, int]
    peak: tuple[int, int, int] = (0, 0, 0)


def _factors(shape: tuple[int, ...], max_dim: int) -> tuple[int, int, int]:
    f = tuple(max(1, math.ceil(n / max_dim)) for n in shape)
    return f[0], f[1], f[2]


def block_reduce(arr: np.ndarray, factors: tuple[int, int, int], how: str) -> np.ndarray:
    """(X, Y, Z) -> (ceil(X/fx), ceil(Y/fy), ceil(Z/fz)): the mean or max of each block.

    The last block of an axis that does not divide evenly holds fewer voxels (the mean or max of
    the voxels it has). One axis at a time, by reshaping (no padded copy of the volume; 0.1 s per
    axis of a 512x512x300 float32 volume). A block holding a NaN is NaN.
    """
    if arr.ndim != 3:
        raise MmaiError(f"viewer: volumes must be 3-D, got shape {arr.shape}")
    if how not in ("mean", "max"):
        raise MmaiError(f"viewer: block reduction must be 'mean' or 'max', got {how!r}")
    out = np.asarray(arr).astype(np.float32, copy=False)
    for axis, f in enumerate(factors):
        if f > 1:
            out = _reduce_axis(out, axis, f, how)
    return out.astype(np.float32, copy=False)


def _reduce_axis(a: np.ndarray, axis: int, f: int, how: str) -> np.ndarray:
    n = a.shape[axis]
    whole = (n // f) * f
    parts = []
    if whole:
        main = a[(slice(None),) * axis + (slice(0, whole),)]
        main = main.reshape(a.shape[:axis] + (whole // f, f) + a.shape[axis + 1:])
        parts.append(main.mean(axis=axis + 1) if how == "mean" else main.max(axis=axis + 1))
    if whole < n:
        rest = a[(slice(None),) * axis + (slice(whole, n),)]
        parts.append(rest.mean(axis=axis, keepdims=True) if how == "mean" else rest.max(axis=axis, keepdims=True))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def downsampled_affine(affine: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """The affine of the block grid: voxel i of the new grid is the centre of block i (for a
    shorter last block of an axis, the centre a whole block would have: at most half a block off)."""
    a = np.asarray(affine, dtype=np.float64).copy()
    f = np.asarray(factors, dtype=np.float64)
    a[:3, 3] = a[:3, 3] + a[:3, :3] @ ((f - 1.0) / 2.0)
    a[:3, :3] = a[:3, :3] * f[None, :]
    return a


def prepare(image: np.ndarray, maps: dict[str, np.ndarray], affine: np.ndarray, *, max_dim: int = 128
            ) -> ViewerVolumes:
    """Downsample a scan and its maps (all on the scan's grid) to at most ``max_dim`` voxels per axis.

    Args:
        image: the scan (X, Y, Z).
        maps: name -> (X, Y, Z) map on the same grid, values in [0, 1].
        affine: (4, 4) voxel -> world of that grid.
        max_dim: the largest number of voxels an axis keeps.

    Raises:
        MmaiError: a map whose shape differs from the scan's, or a volume that is not 3-D.
    """
    if max_dim < 8:
        raise MmaiError(f"viewer: max_dim must be at least 8, got {max_dim}")
    image = np.asarray(image)
    if image.ndim != 3:
        raise MmaiError(f"viewer: the scan must be 3-D, got shape {image.shape}")
    for name, m in maps.items():
        if np.shape(m) != image.shape:
            raise MmaiError(f"viewer: map {name!r} has shape {np.shape(m)}, the scan {image.shape}; "
                            "maps must lie on the scan's grid")
    f = _factors(image.shape, max_dim)
    img = np.nan_to_num(block_reduce(image, f, "mean"))  # a block holding a NaN shows 0
    small = {k: np.clip(np.nan_to_num(block_reduce(np.asarray(m), f, "max")), 0.0, 1.0) for k, m in maps.items()}
    first = next(iter(small.values()), None)
    peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(first)), first.shape)) if first is not None else \
        tuple(n // 2 for n in img.shape)
    return ViewerVolumes(image=img, maps=small, affine=downsampled_affine(affine, f), factors=f,
                         source_shape=(int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
                         peak=(peak[0], peak[1], peak[2]))


def _uint8_nifti(arr: np.ndarray, affine: np.ndarray, lo: float, hi: float) -> bytes:
    """arr quantised to uint8 over [lo, hi], with scl_slope/inter mapping bytes back to units; .nii.gz bytes."""
    span = hi - lo if hi > lo else 1.0
    q = np.clip(np.rint((arr - lo) / span * 255.0), 0, 255).astype(np.uint8)
    img = nib.Nifti1Image(q, np.asarray(affine, dtype=np.float64))
    img.header.set_slope_inter(span / 255.0, lo)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def encode(vols: ViewerVolumes) -> dict[str, Any]:
    """The volumes as base64 .nii.gz strings: {"image": str, "maps": {name: str}, "peak": [i, j, k]}.

    ``image_range`` is the scan's 0.5-99.5 percentile range (the quantisation window)."""
    finite = vols.image[np.isfinite(vols.image)]
    lo, hi = (np.percentile(finite, _PCT).tolist() if finite.size else [0.0, 1.0])
    if hi <= lo:
        hi = lo + 1.0
    image = base64.b64encode(_uint8_nifti(vols.image, vols.affine, float(lo), float(hi))).decode("ascii")
    maps = {k: base64.b64encode(_uint8_nifti(m, vols.affine, 0.0, 1.0)).decode("ascii")
            for k, m in vols.maps.items()}
    peak_mm = (vols.affine @ np.array([*vols.peak, 1.0]))[:3]
    return {"image": image, "maps": maps, "peak": list(vols.peak), "peak_mm": [float(v) for v in peak_mm],
            "image_range": [float(lo), float(hi)], "shape": list(vols.image.shape), "factors": list(vols.factors),
            "source_shape": list(vols.source_shape)}


def decode(b64: str) -> nib.Nifti1Image:
    """A base64 .nii.gz string (as :func:`encode` writes it) back to a NIfTI image (scaled on read)."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))
