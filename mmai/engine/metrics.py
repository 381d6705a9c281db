"""Evaluation metrics with percentile-bootstrap confidence intervals.

Every metric is computed by one *weighted* kernel that takes a matrix of case weights ``W`` of
shape (B, N) and returns B values. The point estimate uses ``W = ones((1, N))``; a bootstrap
resample is the same kernel with ``W[b, i]`` = how many times case i was drawn. So 1000
resamples of AUROC are a handful of numpy operations, not 1000 calls to scikit-learn, and the
bootstrap value of a resample equals the metric computed on the resampled rows exactly.

Conventions (see docs/evaluate.md):
- binary labels are 0/1, ``p`` is the probability (or score) of class 1;
- multiclass ``y`` holds class indices 0..K-1 and ``p`` is (N, K);
- survival ``risk``: higher = earlier event (Harrell's C, ties as in lifelines);
- ECE / calibration bins: ``n_bins`` equal-width bins on [0, 1], bin k = (k/n, (k+1)/n], the
  first also holding 0 (scikit-learn's ``calibration_curve(strategy="uniform")``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from mmai.engine.resample import case_sampler, group_sampler, strata_of
from mmai.errors import MmaiError

log = logging.getLogger(__name__)

KINDS = ("binary", "multiclass", "regression", "survival")
_CELLS = 4_000_000  # elements per temporary (B, N) or (m, N) block


class MetricError(MmaiError):
    """Inputs to a metric are invalid: empty, NaN, mismatched lengths, a label outside the classes."""


class UndefinedMetricError(MetricError):
    """The metric is undefined on these inputs (e.g. AUROC when y holds one class only)."""


class BootstrapCI(tuple):
    """``(point, lo, hi)``; also ``.n_boot`` (resamples drawn) and ``.n_skipped`` (undefined ones)."""

    n_boot: int
    n_skipped: int

    def __new__(cls, point: float, lo: float, hi: float, n_boot: int, n_skipped: int) -> BootstrapCI:
        obj = super().__new__(cls, (float(point), float(lo), float(hi)))
        obj.n_boot, obj.n_skipped = int(n_boot), int(n_skipped)
        return obj


# --- validation

def _vec(x: Any, name: str, n: int | None = None) -> np.ndarray:
    """A finite 1-D float array of length n (if given), else MetricError naming the problem."""
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as exc:
        raise MetricError(f"{name} must be numeric: {exc}") from None
    if a.ndim != 1:
        raise MetricError(f"{name} must be 1-D (N,), got shape {a.shape}")
    if a.size == 0:
        raise MetricError(f"{name} is empty: no cases to evaluate")
    if n is not None and a.size != n:
        raise MetricError(f"{name} has {a.size} values but the first array has {n}")
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise MetricError(f"{name} has {bad.size} NaN/inf value(s), first at index {bad[0]} ({a[bad[0]]})")
    return a


def _binary(y: Any, name: str = "y") -> np.ndarray:
    a = _vec(y, name)
    bad = np.flatnonzero((a != 0) & (a != 1))
    if bad.size:
        raise MetricError(f"{name} must hold 0/1 labels; got {a[bad[0]]:g} at index {bad[0]} "
                          "(map labels with compute_metrics(..., classes=[neg, pos]))")
    return a


def _probs(p: Any, n: int, name: str = "p", check_range: bool = False) -> np.ndarray:
    a = _vec(p, name, n)
    bad = np.flatnonzero((a < 0) | (a > 1)) if check_range else np.empty(0, np.int64)
    if len(bad):
        raise MetricError(f"{name} must be probabilities in [0, 1]; got {a[bad[0]]:g} at index {bad[0]}")
    return a


def _matrix(p: Any, n: int, name: str = "p") -> np.ndarray:
    a = np.asarray(p, dtype=float)
    if a.ndim != 2 or a.shape[0] != n or a.shape[1] < 2:
        raise MetricError(f"{name} must be (N, K) with N={n} and K >= 2, got shape {a.shape}")
    if not np.isfinite(a).all():
        r = int(np.flatnonzero(~np.isfinite(a).all(1))[0])
        raise MetricError(f"{name} has NaN/inf values, first in row {r}")
    return a


def _class_index(y: Any, k: int, name: str = "y") -> np.ndarray:
    a = _vec(y, name)
    bad = np.flatnonzero((a != np.round(a)) | (a < 0) | (a >= k))
    if bad.size:
        raise MetricError(f"{name} must hold class indices 0..{k - 1}; got {a[bad[0]]:g} at index {bad[0]}")
    return a.astype(np.int64)


def _labels(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    """Binary (y01, p) or multiclass (y_idx, P); the flag is True for multiclass."""
    if np.ndim(p) == 2:
        pp = _matrix(p, np.shape(y)[0] if np.ndim(y) == 1 else -1)
        return _class_index(y, pp.shape[1]), pp, True
    yy = _binary(y)
    return yy, _probs(p, yy.size), False


# ----------------------------------------------------------------------------- weighted kernels
# Each kernel: W (B, N) non-negative case weights -> (B,) values, NaN where undefined.


def _groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order sorting s ascending, and the start index of each run of equal values."""
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    return order, np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])


def _w_auroc_binary(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    order, starts = _groups(p)
    Ws, ys = W[:, order], y[order]
    pos = np.add.reduceat(Ws * ys, starts, axis=1)  # (B, G) positive weight per tied-score group
    neg = np.add.reduceat(Ws * (1 - ys), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    return np.divide(num, den, out=np.full(len(W), np.nan), where=den > 0)


def _w_auroc(W: np.ndarray, y: np.ndarray, p: np.ndarray, multi: bool) -> np.ndarray:
    if not multi:
        return _w_auroc_binary(W, y, p)
    per = [_w_auroc_binary(W, (y == k).astype(float), p[:, k]) for k in range(p.shape[1])]
    return np.mean(per, axis=0)  # NaN if any class is absent (or is every case) in the resample


def _w_auprc(W: np.ndarray, y: np.ndarray, p: np.ndarray) -> np.ndarray:
    order, starts = _groups(-p)  # descending score
    Ws, ys = W[:, order], y[order]
    pos = np.add.reduceat(Ws * ys, starts, axis=1)
    tot = np.add.reduceat(Ws, starts, axis=1)
    tp, called = np.cumsum(pos, axis=1), np.cumsum(tot, axis=1)
    prec = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    npos = pos.sum(1)
    return np.divide((pos * prec).sum(1), npos, out=np.full(len(W), np.nan), where=npos > 0)


def _mean_w(W: np.ndarray, e: np.ndarray) -> np.ndarray:
    return (W @ e) / W.sum(1)


def _w_brier(W: np.ndarray, y: np.ndarray, p: np.ndarray, multi: bool) -> np.ndarray:
    if multi:
        onehot = np.eye(p.shape[1])[y]
        return _mean_w(W, ((p - onehot) ** 2).sum(1))
    return _mean_w(W, (p - y) ** 2)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin k holds (k/n, (k+1)/n]; bin 0 also holds 0 (as sklearn's calibration_curve)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p, side="left")


def _w_ece(W: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    onehot = np.eye(n_bins)[_bin_index(p, n_bins)]  # (N, n_bins)
    gap = W @ (onehot * (y - p)[:, None])  # (B, n_bins): sum over bin of (y - p)
    return np.abs(gap).sum(1) / W.sum(1)


def _w_bacc(W: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    recalls = []
    for k in np.unique(y):
        sup = W @ (y == k).astype(float)
        hit = W @ ((y == k) & (pred == k)).astype(float)
        recalls.append(np.divide(hit, sup, out=np.full(len(W), np.nan), where=sup > 0))
    return np.nanmean(np.vstack(recalls), axis=0)  # mean recall over classes present


def _w_mae(W: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return _mean_w(W, np.abs(pred - y))


def _w_rmse(W: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return np.sqrt(_mean_w(W, (pred - y) ** 2))


def _w_r2(W: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    y, pred = y - y.mean(), pred - y.mean()  # R2 is shift-invariant; centring avoids cancellation
    n = W.sum(1)
    mean = (W @ y) / n
    ss_tot = W @ (y**2) - n * mean**2
    ss_tot = np.where(ss_tot > 1e-12 * np.maximum(W @ (y**2), 1e-300), ss_tot, 0.0)
    return 1 - np.divide(W @ ((y - pred) ** 2), ss_tot, out=np.full(len(W), np.nan), where=ss_tot > 0)


def _w_cindex(W: np.ndarray, time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """Weighted Harrell's C. Pair (i, j) is comparable when i had the event and t_i < t_j, or
    t_i == t_j and j is censored (lifelines' rule); concordant when risk_i > risk_j, 1/2 if tied."""
    ev = event.astype(bool)
    idx = np.flatnonzero(ev)
    num, den = np.zeros(len(W)), np.zeros(len(W))
    m = max(1, _CELLS // time.size)
    for s in range(0, idx.size, m):
        i = idx[s:s + m]
        ti, ri = time[i][:, None], risk[i][:, None]
        comp = (ti < time) | ((ti == time) & ~ev)  # (m, N)
        conc = comp * ((ri > risk) + 0.5 * (ri == risk))
        Wi = W[:, i]
        den += ((Wi @ comp) * W).sum(1)
        num += ((Wi @ conc) * W).sum(1)
    return np.divide(num, den, out=np.full(len(W), np.nan), where=den > 0)


# --- public metrics

def _one(kernel: Callable[..., np.ndarray], n: int, *args: Any) -> float:
    return float(kernel(np.ones((1, n)), *args)[0])


def _attach(prep: Callable[..., tuple], kernel: Callable[..., np.ndarray]) -> Callable:
    """Give a public metric its batched form: fn._prep(*arrays) -> args; fn._weighted(W, *args)."""
    def deco(fn: Callable) -> Callable:
        fn._prep, fn._weighted = prep, kernel  # type: ignore[attr-defined]
        return fn
    return deco


@_attach(_labels, _w_auroc)
def auroc(y: Any, p: Any) -> float:
    """Area under the ROC curve (ties in p count 1/2), = sklearn's roc_auc_score.

    Args:
        y: (N,) 0/1 labels, or (N,) class indices when p is (N, K).
        p: (N,) score of class 1, or (N, K) scores: one-vs-rest AUROC averaged over classes (macro).
    """
    yy, pp, multi = _labels(y, p)
    if multi:
        absent = sorted(set(range(pp.shape[1])) - set(np.unique(yy).tolist()))
        if absent:
            raise UndefinedMetricError(f"AUROC is undefined: class index(es) {absent} never occur in y "
                                       f"(one-vs-rest needs every class, n={yy.size})")
    elif yy.min() == yy.max():
        raise UndefinedMetricError(f"AUROC is undefined: y has only class {int(yy[0])} (n={yy.size})")
    return _one(_w_auroc, yy.size, yy, pp, multi)


def _prep_binary(y: Any, p: Any) -> tuple:
    yy = _binary(y)
    return yy, _probs(p, yy.size)


@_attach(_prep_binary, _w_auprc)
def auprc(y: Any, p: Any) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation),
    = sklearn's average_precision_score. y: (N,) 0/1; p: (N,) score of class 1."""
    yy, pp = _prep_binary(y, p)
    if yy.sum() == 0:
        raise UndefinedMetricError(f"AUPRC is undefined: y has no positive case (n={yy.size})")
    return _one(_w_auprc, yy.size, yy, pp)


def _prep_brier(y: Any, p: Any) -> tuple:
    yy, pp, multi = _labels(y, p)
    if not multi:
        _probs(pp, yy.size, check_range=True)
    return yy, pp, multi


@_attach(_prep_brier, _w_brier)
def brier(y: Any, p: Any) -> float:
    """Brier score: mean (p - y)^2 for binary (N,) p; mean sum_k (p_k - [y == k])^2 for (N, K) p."""
    return _one(_w_brier, np.asarray(y).shape[0], *_prep_brier(y, p))


def _prep_ece(y: Any, p: Any, n_bins: int = 10) -> tuple:
    if int(n_bins) < 1:
        raise MetricError(f"n_bins must be >= 1, got {n_bins}")
    yy = _binary(y)
    return yy, _probs(p, yy.size, check_range=True), int(n_bins)


@_attach(_prep_ece, _w_ece)
def ece(y: Any, p: Any, n_bins: int = 10) -> float:
    """Expected calibration error, binary: sum over equal-width bins of (n_b / N) |mean y - mean p|.

    Bins are (k/n_bins, (k+1)/n_bins], bin 0 also holding p = 0. y: (N,) 0/1; p: (N,) P(y = 1).
    """
    yy, pp, nb = _prep_ece(y, p, n_bins)
    return _one(_w_ece, yy.size, yy, pp, nb)


def _prep_pairs(y: Any, pred: Any) -> tuple:
    yy = _vec(y, "y")
    return yy, _vec(pred, "pred", yy.size)


@_attach(_prep_pairs, _w_bacc)
def balanced_accuracy(y: Any, pred: Any) -> float:
    """Mean per-class recall over the classes present in y (= sklearn's balanced_accuracy_score).
    y, pred: (N,) numeric class labels (0/1 or class indices)."""
    yy, pp = _prep_pairs(y, pred)
    return _one(_w_bacc, yy.size, yy, pp)


@_attach(_prep_pairs, _w_mae)
def mae(y: Any, pred: Any) -> float:
    """Mean absolute error. y, pred: (N,)."""
    return _one(_w_mae, np.asarray(y).shape[0], *_prep_pairs(y, pred))


@_attach(_prep_pairs, _w_rmse)
def rmse(y: Any, pred: Any) -> float:
    """Root mean squared error. y, pred: (N,)."""
    return _one(_w_rmse, np.asarray(y).shape[0], *_prep_pairs(y, pred))


@_attach(_prep_pairs, _w_r2)
def r2(y: Any, pred: Any) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot; undefined (error) when y is constant."""
    yy, pp = _prep_pairs(y, pred)
    v = _one(_w_r2, yy.size, yy, pp)
    if np.isnan(v):
        raise UndefinedMetricError(f"R2 is undefined: y is constant ({yy[0]:g}) over {yy.size} case(s)")
    return v


def _prep_surv(time: Any, event: Any, risk: Any) -> tuple:
    t = _vec(time, "time")
    return t, _binary(_vec(event, "event", t.size), "event"), _vec(risk, "risk", t.size)


@_attach(_prep_surv, _w_cindex)
def c_index(time: Any, event: Any, risk: Any) -> float:
    """Harrell's concordance index; higher risk = earlier event.

    Equals ``lifelines.utils.concordance_index(time, -risk, event)``: a pair is comparable when the
    earlier time is an event (equal times: only event vs censored, the event counting as earlier);
    tied risks count 1/2. time, event (0/1), risk: (N,).
    """
    t, e, r = _prep_surv(time, event, risk)
    v = _one(_w_cindex, t.size, t, e, r)
    if np.isnan(v):
        raise UndefinedMetricError(f"C-index is undefined: no comparable pairs ({int(e.sum())} events, n={t.size})")
    return v


def calibration_curve(y: Any, p: Any, n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability-diagram data over equal-width bins (the ECE bins); empty bins are left out.

    Returns:
        {"bin_lo", "bin_hi", "mean_pred", "frac_pos", "count"}: lists, one entry per non-empty bin.
    """
    yy, pp, nb = _prep_ece(y, p, n_bins)
    b = _bin_index(pp, nb)
    count = np.bincount(b, minlength=nb)
    keep = np.flatnonzero(count)
    edges = np.linspace(0.0, 1.0, nb + 1)
    s_p, s_y = np.bincount(b, pp, nb), np.bincount(b, yy, nb)
    return {"bin_lo": edges[keep].tolist(), "bin_hi": edges[keep + 1].tolist(),
            "mean_pred": (s_p[keep] / count[keep]).tolist(), "frac_pos": (s_y[keep] / count[keep]).tolist(),
            "count": count[keep].astype(int).tolist()}


def kaplan_meier(time: Any, event: Any) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier product-limit estimate.

    Returns:
        (t, s): (G + 1,) arrays, t = [0, distinct event times...], s = S(t) (a right-continuous step).
    """
    t = _vec(time, "time")
    e = _binary(_vec(event, "event", t.size), "event")
    ut, d = np.unique(t[e == 1], return_counts=True)
    at_risk = t.size - np.searchsorted(np.sort(t), ut, side="left")
    return np.r_[0.0, ut], np.r_[1.0, np.cumprod(1.0 - d / at_risk)]


# --- bootstrap

def _check_groups(groups: Any, n: int) -> None:
    g = np.asarray(groups)
    if g.shape != (n,):
        raise MetricError(f"groups must be (N,) = ({n},), got shape {g.shape}")
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in g.tolist()):
        raise MetricError("groups has missing values; give every case a patient id")


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: Any, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, stratify: Any = None, groups: Any = None) -> BootstrapCI:
    """Percentile bootstrap confidence interval over cases, or over groups of cases.

    Each resample draws N cases with replacement (within each level of ``stratify`` when given,
    so class or event counts stay fixed). With ``groups`` (e.g. the patient id of each case) it
    draws groups instead, each drawn group bringing all its cases, so several cases of one
    patient count as one independent unit (a cluster bootstrap); groups are drawn within strata
    when every group lies in a single stratum. Resamples where the metric is undefined (the metric
    raises UndefinedMetricError or returns NaN, e.g. one class only) are skipped and counted in
    ``.n_skipped``; the interval is the (alpha/2, 1 - alpha/2) quantiles of the rest. Metrics of
    this module run batched (a weighted kernel over a (B, N) count matrix); any other callable
    is called once per resample on the resampled rows.

    Args:
        metric_fn: metric(*arrays) -> float, e.g. ``auroc``.
        *arrays: equal-length arrays, first axis = cases (N, ...).
        n_boot: number of resamples (>= 1).
        seed: seed of numpy's default_rng; same seed, same resamples.
        alpha: 1 - confidence level.
        stratify: optional (N,) stratum per case.
        groups: optional (N,) group (patient) per case: resample groups, not cases.

    Returns:
        BootstrapCI ``(point, lo, hi)``; lo = hi = NaN when every resample was undefined.
    """
    if not arrays:
        raise MetricError("bootstrap_ci needs at least one array")
    n = int(np.shape(arrays[0])[0]) if np.ndim(arrays[0]) else 0
    if n == 0:
        raise MetricError("bootstrap_ci: no cases (the first array is empty)")
    for i, a in enumerate(arrays):
        if np.ndim(a) == 0 or np.shape(a)[0] != n:
            raise MetricError(f"bootstrap_ci: array {i} has {np.shape(a)[:1]} cases, array 0 has {n}")
    if int(n_boot) < 1:
        raise MetricError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise MetricError(f"alpha must be in (0, 1), got {alpha}")
    if stratify is None:
        strata = [np.arange(n)]
    else:
        s = np.asarray(stratify)
        if s.shape != (n,):
            raise MetricError(f"stratify must be (N,) = ({n},), got shape {s.shape}")
        strata = strata_of(s)
    if groups is not None:
        _check_groups(groups, n)
    draw = group_sampler(groups, stratify, n) if groups is not None else case_sampler(strata, n)
    point = float(metric_fn(*arrays))
    weighted = getattr(metric_fn, "_weighted", None)
    prep = getattr(metric_fn, "_prep", None)
    prepped: tuple = prep(*arrays) if weighted is not None and prep is not None else ()
    arrs = [np.asarray(a) for a in arrays]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS // n)
    values = []
    for start in range(0, int(n_boot), chunk):
        W = draw(rng, min(chunk, int(n_boot) - start))
        if weighted is not None:
            values.append(weighted(W, *prepped))
            continue
        for w in W:
            rows = np.repeat(np.arange(n), w.astype(np.int64))
            try:
                values.append(np.array([float(metric_fn(*[a[rows] for a in arrs]))]))
            except UndefinedMetricError:
                values.append(np.array([np.nan]))
    v = np.concatenate(values)
    ok = np.isfinite(v)
    skipped = int((~ok).sum())
    if skipped:
        log.info("bootstrap of %s: %d of %d resamples undefined (skipped)",
                 getattr(metric_fn, "__name__", "metric"), skipped, v.size)
    if not ok.any():
        log.warning("bootstrap of %s: every resample was undefined; no interval",
                    getattr(metric_fn, "__name__", "metric"))
        return BootstrapCI(point, np.nan, np.nan, v.size, skipped)
    lo, hi = np.quantile(v[ok], [alpha / 2, 1 - alpha / 2])
    return BootstrapCI(point, lo, hi, v.size, skipped)

