"""The numbers behind the evaluation figures (pure numpy; :mod:`mmai.plots` draws them).

- :func:`equal_count_bins`: reliability-diagram bins holding equal numbers of cases (counts differ
  by at most one), each with its observed fraction and a Wilson score interval;
- :func:`roc_band` / :func:`pr_band`: percentile bootstrap bands of an ROC / precision-recall
  curve on a fixed grid (cases resampled within each class, seeded);
- :func:`numbers_at_risk`: the Kaplan-Meier table's counts (cases with follow-up >= t).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmai.errors import MmaiError

#: two-sided 95% normal quantile
Z95 = 1.959963984540054


def wilson_interval(k: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion k / n (elementwise); n = 0 gives (0, 1)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    safe = np.maximum(n, 1.0)
    phat = k / safe
    denom = 1 + z**2 / safe
    centre = (phat + z**2 / (2 * safe)) / denom
    half = z * np.sqrt(phat * (1 - phat) / safe + z**2 / (4 * safe**2)) / denom
    lo, hi = np.clip(np.minimum(centre - half, phat), 0, 1), np.clip(np.maximum(centre + half, phat), 0, 1)
    return np.where(n > 0, lo, 0.0), np.where(n > 0, hi, 1.0)


def equal_count_bins(y: Any, p: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Cases sorted by predicted probability and split into ``n_bins`` bins of equal count.

    Args:
        y: (N,) 0/1 outcomes.
        p: (N,) predicted P(y = 1).
        n_bins: bins wanted (fewer when N < n_bins).

    Returns:
        {"count", "mean_pred", "frac_pos", "lo", "hi", "p_min", "p_max"}, each (n_bins,):
        cases per bin (differing by at most 1), mean prediction, observed fraction of positives,
        its 95% Wilson interval, and the bin's prediction range.
    """
    yy, pp = np.asarray(y, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if yy.size != pp.size or yy.size == 0:
        raise MmaiError(f"equal_count_bins: y and p must be equally long and non-empty, got {yy.size} and {pp.size}")
    if int(n_bins) < 1:
        raise MmaiError(f"equal_count_bins: n_bins must be >= 1, got {n_bins}")
    order = np.argsort(pp, kind="mergesort")
    parts = [idx for idx in np.array_split(order, min(int(n_bins), yy.size)) if idx.size]
    count = np.array([idx.size for idx in parts])
    pos = np.array([yy[idx].sum() for idx in parts])
    lo, hi = wilson_interval(pos, count)
    return {"count": count, "mean_pred": np.array([pp[idx].mean() for idx in parts]), "frac_pos": pos / count,
            "lo": lo, "hi": hi, "p_min": np.array([pp[idx].min() for idx in parts]),
            "p_max": np.array([pp[idx].max() for idx in parts])}


def _resamples(y: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Case indices of ``n_boot`` resamples drawn within each class present (class counts stay fixed)."""
    rng = np.random.default_rng(seed)
    by_class = [idx for c in (0, 1) if (idx := np.flatnonzero(y == c)).size]
    return [np.concatenate([rng.choice(idx, idx.size, replace=True) for idx in by_class]) for _ in range(n_boot)]


def _roc_on_grid(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> np.ndarray:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    return np.interp(grid, fpr, tpr)  # the straight segments the ROC line draws


def _pr_on_grid(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Precision at each recall of ``grid`` read off the step curve (``where="post"`` on recall)."""
    from sklearn.metrics import precision_recall_curve

    prec, rec, _ = precision_recall_curve(y, p)
    rec, prec = rec[::-1], prec[::-1]  # recall increasing
    idx = np.clip(np.searchsorted(rec, grid, side="right") - 1, 0, rec.size - 1)
    return prec[idx]


def _band(fn: Any, y: Any, p: Any, n_boot: int, seed: int, grid: np.ndarray, alpha: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yy, pp = np.asarray(y, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if yy.size == 0 or yy.size != pp.size:
        raise MmaiError(f"bootstrap band: y and p must be equally long and non-empty, got {yy.size} and {pp.size}")
    point = fn(yy, pp, grid)
    if n_boot < 1:
        return grid, point, point.copy(), point.copy()
    curves = np.stack([fn(yy[i], pp[i], grid) for i in _resamples(yy, int(n_boot), seed)])  # (B, G)
    lo, hi = np.quantile(curves, [alpha / 2, 1 - alpha / 2], axis=0)
    return grid, point, lo, hi


def roc_band(y: Any, p: Any, n_boot: int = 200, seed: int = 0, alpha: float = 0.05, n_grid: int = 101
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap band of the ROC curve: (fpr grid (G,), tpr (G,), lo (G,), hi (G,)).

    Cases are resampled within each class (``seed``: numpy default_rng); each resample's ROC is
    read at the grid's false positive rates, and the band is the (alpha/2, 1 - alpha/2) quantiles.
    """
    return _band(_roc_on_grid, y, p, n_boot, seed, np.linspace(0, 1, n_grid), alpha)


def pr_band(y: Any, p: Any, n_boot: int = 200, seed: int = 0, alpha: float = 0.05, n_grid: int = 101
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap band of the precision-recall step curve: (recall grid, precision, lo, hi)."""
    return _band(_pr_on_grid, y, p, n_boot, seed, np.linspace(0, 1, n_grid), alpha)


def numbers_at_risk(time: Any, groups: list[np.ndarray], at: Any) -> np.ndarray:
    """(n_groups, T) number of cases of each group still followed at each time of ``at`` (time >= t)."""
    t = np.asarray(time, dtype=float)
    at = np.asarray(at, dtype=float)
    return np.array([[int(np.sum(t[idx] >= a)) for a in at] for idx in groups], dtype=int)
