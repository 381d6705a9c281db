"""Intensity transforms: multi-window CT channels and training-fitted percentile z-scoring (MR).

Array operations first, then MONAI dictionary wrappers that only loop over keys. The learned
statistics of :class:`PercentileNormalized` (clip bounds, mean, std of the foreground) are
fitted by :func:`fit_percentile_stats` on training cases only and travel as a small JSON dict
(``{"lo", "hi", "mean", "std", "n_cases"}``) with the preprocessed volumes and the run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from mmai.errors import PreprocessError

STAT_KEYS = ("lo", "hi", "mean", "std")


def window_channels(x: torch.Tensor, windows: Sequence[Sequence[float]], b_min: float, b_max: float) -> torch.Tensor:
    """One channel per intensity window.

    Args:
        x: (1, I, J, K) raw intensities (e.g. HU).
        windows: W pairs ``(a_min, a_max)``.
        b_min, b_max: output range of every window.

    Returns:
        (W, I, J, K): channel w = ``x`` clipped to window w and scaled to [b_min, b_max].
    """
    if x.shape[0] != 1:
        raise PreprocessError(f"intensity windows need a single-channel volume, got {x.shape[0]} channels")
    chans = []
    for lo, hi in windows:
        c = (x[0].clamp(float(lo), float(hi)) - float(lo)) / (float(hi) - float(lo))
        chans.append(c * (b_max - b_min) + b_min)
    out = torch.stack(chans, 0)
    if hasattr(x, "affine"):  # keep the MetaTensor (geometry) of the input
        from monai.data import MetaTensor

        out = MetaTensor(out, meta=dict(x.meta))  # type: ignore[attr-defined]
    return out


class WindowChannelsd(MapTransform):
    """Dictionary wrapper of :func:`window_channels`."""

    def __init__(self, keys: Any, windows: Sequence[Sequence[float]], b_min: float = 0.0, b_max: float = 1.0) -> None:
        super().__init__(keys)
        self.windows = [tuple(map(float, w)) for w in windows]
        self.b_min, self.b_max = float(b_min), float(b_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            d[k] = window_channels(d[k], self.windows, self.b_min, self.b_max)
        return d


def percentile_normalize(x: torch.Tensor, fg: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """Clip to ``[lo, hi]``, z-score with ``mean``/``std`` inside the foreground, 0 outside.

    Args:
        x: (C, I, J, K) raw intensities.
        fg: (1, I, J, K) foreground mask (bool or 0/1).
        stats: fitted ``lo``, ``hi``, ``mean``, ``std`` (training cases only).
    """
    z = (x.clamp(stats["lo"], stats["hi"]) - stats["mean"]) / max(stats["std"], 1e-8)
    return z * (fg > 0).to(z.dtype)


class PercentileNormalized(MapTransform):
    """Dictionary wrapper of :func:`percentile_normalize` (``fg_key`` holds the foreground)."""

    def __init__(self, keys: Any, stats: dict[str, float] | None, fg_key: str = "fg") -> None:
        super().__init__(keys)
        self.stats, self.fg_key = stats, fg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.stats is None:
            raise PreprocessError("image.intensity.kind = percentile needs statistics fitted on the training "
                                  "cases: run `mmai preprocess` (fits them) or pass the run's intensity_stats")
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            d[k] = percentile_normalize(d[k], d[self.fg_key], self.stats)
        return d


def foreground_sample(x: torch.Tensor | np.ndarray, fg: torch.Tensor | np.ndarray, *, n: int = 20000,
                      seed: int = 0) -> np.ndarray:
    """Up to ``n`` foreground intensities of one case (a fixed-seed subsample), float64."""
    vals = np.asarray(x, dtype=np.float64)[np.asarray(fg) > 0]
    if vals.size > n:
        vals = np.random.default_rng(seed).choice(vals, n, replace=False)
    return vals


def fit_percentile_stats(samples: Sequence[np.ndarray], percentiles: Sequence[float]) -> dict[str, float]:
    """Pool the foreground samples of the training cases -> ``{lo, hi, mean, std, n_cases}``.

    Each case contributes the same number of voxels at most (see :func:`foreground_sample`), so a
    large scan does not dominate; ``mean``/``std`` are of the clipped values (nnU-Net's CT scheme).
    """
    samples = [s for s in samples if s.size]
    if not samples:
        raise PreprocessError("cannot fit intensity statistics: no training case has foreground voxels")
    pooled = np.concatenate(samples)
    lo, hi = np.percentile(pooled, list(percentiles))
    clipped = np.clip(pooled, lo, hi)
    return {"lo": float(lo), "hi": float(hi), "mean": float(clipped.mean()), "std": float(clipped.std() or 1.0),
            "n_cases": len(samples)}


def stats_digest(stats: dict[str, float] | None) -> str | None:
    """Short hash of the four statistics (None without statistics)."""
    if stats is None:
        return None
    blob = json.dumps({k: round(float(stats[k]), 6) for k in STAT_KEYS}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:8]
