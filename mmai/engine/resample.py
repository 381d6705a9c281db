"""Bootstrap resampling as count matrices: W[b, i] = how often case i is drawn in resample b.

Cases are drawn with replacement within strata (class or event status), or whole groups
(patients) are drawn and each case counts as often as its group was drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _resample_counts(rng: np.random.Generator, strata: list[np.ndarray], n: int, b: int) -> np.ndarray:
    """(b, n) float counts: how often each case is drawn, resampling within each stratum."""
    W = np.zeros(b * n)
    offs = (np.arange(b) * n)[:, None]
    for idx in strata:
        draw = idx[rng.integers(0, idx.size, size=(b, idx.size))]  # (b, n_s) case indices
        W += np.bincount((draw + offs).ravel(), minlength=b * n)
    return W.reshape(b, n)


def strata_of(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each distinct label (in sorted label order)."""
    inv = np.unique(labels, return_inverse=True)[1].ravel()
    return [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]


def group_sampler(groups: Any, stratify: Any, n: int) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Resampler of whole groups (patients): a case's count is its group's draw count. Groups are
    drawn within strata when every group lies in one stratum, otherwise without strata."""
    g = np.asarray(groups)  # (n,), checked by the caller
    try:
        ginv = np.unique(g, return_inverse=True)[1].ravel()
    except TypeError:  # mixed id types: compare as text
        ginv = np.unique(g.astype(str), return_inverse=True)[1].ravel()
    n_groups = int(ginv.max()) + 1
    group_strata = [np.arange(n_groups)]
    if stratify is not None:
        s_inv = np.unique(np.asarray(stratify), return_inverse=True)[1].ravel()
        first = s_inv[np.unique(ginv, return_index=True)[1]]  # (n_groups,) stratum of each group's first case
        if np.array_equal(first[ginv], s_inv):
            group_strata = strata_of(first)

    def draw(rng: np.random.Generator, b: int) -> np.ndarray:
        return _resample_counts(rng, group_strata, n_groups, b)[:, ginv]  # (b, n)

    return draw


def case_sampler(strata: list[np.ndarray], n: int) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Resampler of single cases within ``strata``."""
    return lambda rng, b: _resample_counts(rng, strata, n, b)
