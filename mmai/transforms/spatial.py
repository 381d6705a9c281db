"""Spatial transforms: anti-aliased downsampling, the body (foreground) mask, and fitting the
volume to the model's grid without silently losing anatomy.

- :class:`AntiAliasd`: Gaussian smoothing before ``Spacingd`` with sigma = half the zoom factor
  (in input voxels) along each downsampled axis, so a small bright structure keeps its integral
  (plain bilinear sampling at 9 mm can miss a 6 mm nodule or hit its peak).
- :class:`ForegroundMaskd`: ``fg`` = raw intensity above a threshold (body), computed after
  resampling and before intensity normalisation; used by the body crop, the FOV guard and the
  percentile statistics.
- :class:`FitToGridd`: centre pad/crop to ``size`` (or pad to a multiple of ``size_multiple``),
  measuring the fraction of foreground voxels that falls outside the box: above the tolerance it
  is an error (``fov.mode: error``) or a logged crop (``fov.mode: crop``), recorded as
  ``fov_lost_fraction`` in the data dict.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.layers.simplelayers import gaussian_1d
from monai.transforms import DivisiblePad, MapTransform, ResizeWithPadOrCrop

from mmai.errors import PreprocessError

log = logging.getLogger(__name__)


def voxel_spacing(affine: Any) -> np.ndarray:
    """(3,) voxel sizes in mm of a (4, 4) affine."""
    a = np.asarray(affine.cpu() if hasattr(affine, "cpu") else affine, dtype=np.float64)
    return np.linalg.norm(a[:3, :3], axis=0)


def antialias_sigma(current: Sequence[float], target: Sequence[float]) -> list[float]:
    """Gaussian sigma (input voxels) per axis: half the zoom factor where it downsamples, else 0."""
    return [0.5 * t / c if t > c * 1.0001 else 0.0 for c, t in zip(current, target, strict=True)]


SLAB_VOXELS = 1 << 22  # 4 Mi voxels (16 MB float32) per slab: the only working memory of the smoothing


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """(2r + 1,) float64 normalised Gaussian, truncated at 4 sigma (MONAI ``gaussian_1d``, erf-integrated)."""
    return gaussian_1d(torch.tensor(float(sigma), dtype=torch.float64), truncated=4.0, normalize=True)


def smooth_axis_(x: torch.Tensor, kernel: Sequence[float] | torch.Tensor, axis: int, slab_voxels: int = SLAB_VOXELS) -> torch.Tensor:
    """In place: correlate a (C, I, J, K) float tensor with a 1-D kernel along ``axis`` (1, 2 or 3), borders
    replicated (scipy ``mode="nearest"``).

    Works in slabs cut along another axis: each slab is copied once with its replicated border and the
    output is accumulated into ``x`` tap by tap, so the extra memory is one slab (``slab_voxels``), not
    the copies of the whole volume that a padded ``conv3d`` makes. CPU or CUDA alike.
    """
    w = [float(v) for v in kernel]
    r, n = (len(w) - 1) // 2, x.shape[axis]
    if len(w) % 2 != 1:
        raise ValueError(f"smooth_axis_: the kernel needs an odd length, got {len(w)}")
    cut = 1 if axis != 1 else 2  # the outermost spatial axis that is not the smoothed one
    step = max(1, slab_voxels // max(1, x.numel() // x.shape[cut]))
    for start in range(0, x.shape[cut], step):
        v = x.narrow(cut, start, min(step, x.shape[cut] - start))  # a view into x
        edge = [r if a == axis else -1 for a in range(v.dim())]
        padded = torch.cat([v.narrow(axis, 0, 1).expand(*edge), v, v.narrow(axis, n - 1, 1).expand(*edge)], dim=axis)
        v.copy_(padded.narrow(axis, 0, n)).mul_(w[0])
        for k in range(1, len(w)):
            v.add_(padded.narrow(axis, k, n), alpha=w[k])
    return x


def antialias(x: torch.Tensor, current: Sequence[float], target: Sequence[float]) -> torch.Tensor:
    """Smooth a (C, I, J, K) volume before resampling from ``current`` to ``target`` spacing (mm).

    Separable Gaussian (MONAI's ``gaussian_1d`` kernels, sigma = :func:`antialias_sigma`) with
    replicated borders, so the edge of the scan is not blended with zeros; the sum of the volume
    (a structure's integral) is kept. One float32 copy of the input is smoothed in place, one axis
    at a time, in slabs (:func:`smooth_axis_`): on a 512 x 512 x 400 CT this takes one extra
    volume of memory and a few seconds, where MONAI's ``separable_filtering`` (the previous
    implementation; same result to float32 rounding) took 7.5 GB and 33 s (docs/benchmarks.md).
    Returns a MetaTensor with the input's metadata when given one; the input is not modified.
    """
    sigma = antialias_sigma(current, target)
    if not any(sigma):
        return x
    out = torch.as_tensor(x).to(torch.float32, copy=True)
    for axis, s in enumerate(sigma, start=1):
        if s > 0:
            smooth_axis_(out, gaussian_kernel(s), axis)
    if hasattr(x, "meta"):
        from monai.data import MetaTensor

        return MetaTensor(out, meta=dict(x.meta))
    return out


class AntiAliasd(MapTransform):
    """Dictionary wrapper of :func:`antialias` (the current spacing is read from the MetaTensor affine)."""

    def __init__(self, keys: Any, pixdim: Sequence[float]) -> None:
        super().__init__(keys)
        self.pixdim = [float(p) for p in pixdim]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            d[k] = antialias(d[k], voxel_spacing(d[k].affine).tolist(), self.pixdim)
        return d


def auto_threshold(kind: str, windows: Sequence[Sequence[float]], x: torch.Tensor) -> float:
    """The raw intensity above which a voxel counts as body when ``image.foreground`` is null.

    Windowed CT: a quarter of the way up the (widest) window (-500 HU for [-1000, 1000]); other
    kinds (MR): 5 % of the volume's 99th percentile.
    """
    if kind in ("window", "windows"):
        lo, hi = min(w[0] for w in windows), max(w[1] for w in windows)
        return float(lo + 0.25 * (hi - lo))
    flat = x.detach().reshape(-1).float()
    if flat.numel() > 2_000_000:
        flat = flat[:: flat.numel() // 1_000_000]
    return 0.05 * float(torch.quantile(flat, 0.99))


class ForegroundMaskd(MapTransform):
    """Adds ``fg_key``: (1, I, J, K) uint8 MetaTensor, 1 where any channel of ``key`` exceeds the threshold.

    Args:
        keys: the image key (one).
        threshold: raw intensity threshold, or None for :func:`auto_threshold`.
        kind, windows: the intensity config (for the automatic threshold).
    """

    def __init__(self, keys: Any, threshold: float | None, kind: str, windows: Sequence[Sequence[float]],
                 fg_key: str = "fg") -> None:
        super().__init__(keys)
        self.threshold, self.kind, self.windows, self.fg_key = threshold, kind, list(windows), fg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            x = d[k]
            t = self.threshold if self.threshold is not None else auto_threshold(self.kind, self.windows, x)
            above = x > t
            # one channel: the comparison's bytes are the mask (bool and uint8 are both one byte, 0/1)
            fg = above.view(torch.uint8) if x.shape[0] == 1 else above.any(dim=0, keepdim=True).to(torch.uint8)
            d[self.fg_key] = fg
        return d


def lost_fraction(fg: torch.Tensor, size: Sequence[int]) -> float:
    """Fraction of foreground voxels outside a centre crop of ``size`` (as ResizeWithPadOrCrop cuts)."""
    total = float(fg.sum())
    if total == 0:
        return 0.0
    sl = []
    for n, s in zip(fg.shape[1:], size, strict=True):
        if s >= n:
            sl.append(slice(0, n))
        else:
            start = (n - s) // 2  # MONAI CenterSpatialCrop: floor of the surplus before
            sl.append(slice(start, start + s))
    kept = float(fg[(slice(None), *sl)].sum())
    return 1.0 - kept / total


class FitToGridd(MapTransform):
    """Centre pad/crop ``keys`` to ``size`` (or pad to a multiple of ``size_multiple`` when size is None),
    guarding the foreground (see module docstring).

    Args:
        keys: image key first, then any other key with the same grid (e.g. ``fg``).
        size: output spatial size, or None.
        size_multiple: with ``size=None``, pad each axis to a multiple of this.
        mode: ``error`` or ``crop``; tolerance: lost fraction allowed without error.
        background: pad value of the image key (other keys pad with 0).
        fg_key: the foreground mask key.
    """

    def __init__(self, keys: Any, *, size: Sequence[int] | None, size_multiple: int, mode: str, tolerance: float,
                 background: float, fg_key: str = "fg") -> None:
        super().__init__(keys)
        self.size = tuple(size) if size is not None else None
        self.size_multiple, self.mode, self.tolerance = size_multiple, mode, tolerance
        self.background, self.fg_key = background, fg_key

    def check(self, d: Mapping[Hashable, Any]) -> float:
        """The FOV guard: the fraction of ``d[fg_key]`` the box cuts (0 without a fixed size); raises
        :class:`PreprocessError` above the tolerance with ``mode: error``, logs a crop otherwise."""
        lost = 0.0
        if self.size is not None and self.fg_key in d:
            lost = lost_fraction(d[self.fg_key], self.size)
            if lost > self.tolerance and self.mode == "error":
                name = _source_name(d)
                raise PreprocessError(
                    f"{name}: the {list(self.size)} voxel box would cut {lost:.1%} of the body (foreground) voxels "
                    f"(tolerance {self.tolerance:.1%}); allowed: image.size: null (whole volume), a larger "
                    "image.size, or image.fov: {mode: crop} to crop and record the loss")
            if lost > 0:
                log.log(logging.WARNING if lost > self.tolerance else logging.INFO,
                        "%s: cropped to %s voxels, %.2f%% of the foreground lost", _source_name(d), list(self.size),
                        100 * lost)
        return float(lost)

    def fit(self, value: float, lazy: bool = False) -> Any:
        """The MONAI transform that centre pads/crops to the grid, padding with ``value``."""
        if self.size is not None:
            return ResizeWithPadOrCrop(self.size, mode="constant", value=value, lazy=lazy)
        return DivisiblePad(self.size_multiple, mode="constant", value=value, lazy=lazy)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        lost = self.check(d)
        for k in self.key_iterator(d):
            d[k] = self.fit(self.background if k != self.fg_key else 0)(d[k])
        d["fov_lost_fraction"] = float(lost)
        return d


def _source_name(d: Mapping[Hashable, Any]) -> str:
    x = next((v for v in d.values() if hasattr(v, "meta")), None)
    name = x.meta.get("filename_or_obj", "") if x is not None else ""
    return str(name) or "image"
