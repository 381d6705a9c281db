"""Intensity transforms: multi-window CT channels, per-volume percentile z-scoring (the MR
default) and training-fitted (cohort-level) percentile z-scoring.

Array operations first, then MONAI dictionary wrappers that only loop over keys.
:func:`volume_percentile_normalize` learns nothing: each volume is clipped to the percentiles of
its own foreground and z-scored with its own foreground mean/std (nnU-Net's rule for MR, whose
units differ per scanner). The learned statistics of :class:`PercentileNormalized` (clip bounds,
mean, std of the foreground) are fitted by :func:`fit_percentile_stats` on training cases only
and travel as a small JSON dict (``{"lo", "hi", "mean", "std", "n_cases"}``) with the
preprocessed volumes and the run; a volume whose foreground lies mostly outside the fitted range
(another scanner's units) is warned about (:data:`OUTSIDE_WARN_FRACTION`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from mmai.errors import PreprocessError

STAT_KEYS = ("lo", "hi", "mean", "std")
OUTSIDE_WARN_FRACTION = 0.25  # of a volume's foreground clipped by the cohort's fitted range
SPREAD_WARN_RATIO = 5.0  # a volume's 5-95th percentile spread vs the fitted [lo, hi]
MAX_PERCENTILE_SAMPLE = 2_000_000

log = logging.getLogger(__name__)


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


def range_mismatch(x: torch.Tensor, fg: torch.Tensor, stats: dict[str, float]) -> str:
    """Why the foreground of ``x`` (C, I, J, K) is far from the fitted ``[lo, hi]`` ('' when it is not).

    Far: more than :data:`OUTSIDE_WARN_FRACTION` of its voxels outside ``[lo, hi]``, or its 5th-95th
    percentile spread under 1/:data:`SPREAD_WARN_RATIO` (or over that many times) the fitted spread
    (a scanner with another gain, squashed into a corner of the fitted range).
    """
    vals = x[(fg > 0).expand_as(x)].detach().float().cpu().numpy()
    if vals.size == 0:
        return ""
    vals = vals[:: max(1, vals.size // MAX_PERCENTILE_SAMPLE)]
    outside = float(np.mean((vals < stats["lo"]) | (vals > stats["hi"])))
    if outside > OUTSIDE_WARN_FRACTION:
        return f"{outside:.0%} of the foreground lies outside"
    p5, p95 = np.percentile(vals, [5, 95])
    ratio = float(p95 - p5) / max(stats["hi"] - stats["lo"], 1e-8)
    if ratio < 1 / SPREAD_WARN_RATIO or ratio > SPREAD_WARN_RATIO:
        return f"the foreground spans {ratio:.2f} times"
    return ""


def volume_percentile_normalize(x: torch.Tensor, fg: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Clip to the ``percentiles`` of this volume's foreground, z-score with its foreground mean/std.

    Args:
        x: (C, I, J, K) raw intensities.
        fg: (1, I, J, K) foreground mask (bool or 0/1); an empty mask uses every voxel.
        percentiles: (low, high) clip percentiles, e.g. (0.5, 99.5).

    Returns:
        (C, I, J, K): z-scores inside the foreground (mean 0, std 1 of the clipped foreground), 0 outside.
    """
    mask = (fg > 0).expand_as(x)
    if not bool(mask.any()):
        mask = torch.ones_like(x, dtype=torch.bool)
    vals = x[mask].detach().float().cpu().numpy()
    sample = vals[:: max(1, vals.size // MAX_PERCENTILE_SAMPLE)].astype(np.float64)
    lo, hi = (float(v) for v in np.percentile(sample, list(percentiles)))
    clipped = np.clip(sample, lo, hi)
    mean, std = float(clipped.mean()), float(clipped.std())
    z = (x.clamp(lo, hi) - mean) / max(std, 1e-8)
    return z * mask.to(z.dtype)


class VolumePercentileNormalized(MapTransform):
    """Dictionary wrapper of :func:`volume_percentile_normalize` (``fg_key`` holds the foreground)."""

    def __init__(self, keys: Any, percentiles: Sequence[float] = (0.5, 99.5), fg_key: str = "fg") -> None:
        super().__init__(keys)
        self.percentiles, self.fg_key = tuple(float(p) for p in percentiles), fg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            d[k] = volume_percentile_normalize(d[k], d[self.fg_key], self.percentiles)
        return d


class PercentileNormalized(MapTransform):
    """Dictionary wrapper of :func:`percentile_normalize` (``fg_key`` holds the foreground); warns
    when a volume's foreground is far from the fitted range (:func:`range_mismatch`: another
    scanner's units; ``image.intensity.kind: volume_percentile`` normalises per volume)."""

    def __init__(self, keys: Any, stats: dict[str, float] | None, fg_key: str = "fg") -> None:
        super().__init__(keys)
        self.stats, self.fg_key = stats, fg_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.stats is None:
            raise PreprocessError("image.intensity.kind = percentile needs statistics fitted on the training "
                                  "cases: run `mmai preprocess` (fits them) or pass the run's intensity_stats")
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            why = range_mismatch(d[k], d[self.fg_key], self.stats)
            if why:
                name = str((getattr(d[k], "meta", {}) or {}).get("filename_or_obj", "image"))
                log.warning("%s: %s the intensity range fitted on the training cases [%.4g, %.4g] (another scanner "
                            "or protocol?); image.intensity.kind: volume_percentile normalises each volume by "
                            "its own statistics", name.rsplit("/", 1)[-1], why, self.stats["lo"], self.stats["hi"])
            d[k] = percentile_normalize(d[k], d[self.fg_key], self.stats)
        return d


def foreground_sample(x: torch.Tensor | np.ndarray, fg: torch.Tensor | np.ndarray, *, n: int = 20000,
                      seed: int = 0) -> np.ndarray:
    """Up to ``n`` foreground intensities of one case (a fixed-seed subsample), float64."""
    vals = np.asarray(x, dtype=np.float64)[np.asarray(fg) > 0]
    if vals.size > n:
        vals = np.random.default_rng(seed).choice(vals, n, replace=False)
    return vals


def fit_percentile_stats(samples: Sequence[np.ndarray], percentiles: Sequence[float],
                         failures: Sequence[str] = ()) -> dict[str, float]:
    """Pool the foreground samples of the training cases -> ``{lo, hi, mean, std, n_cases}``.

    Each case contributes the same number of voxels at most (see :func:`foreground_sample`), so a
    large scan does not dominate; ``mean``/``std`` are of the clipped values (nnU-Net's CT scheme).

    Args:
        samples: one foreground sample per training case that loaded.
        percentiles: the clip percentiles.
        failures: ``"case X: reason"`` of the training cases that could not be loaded (named in
            the error when no case is left).
    """
    samples = [s for s in samples if s.size]
    if not samples and failures:
        raise PreprocessError(f"cannot fit intensity statistics: none of the {len(failures)} training case(s) "
                              f"could be loaded; first: {failures[0]}")
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
