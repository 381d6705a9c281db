"""Ridge-penalised Cox proportional hazards (Breslow ties) by Newton's method, in numpy.

Objective (the convention of lifelines' ``CoxPHFitter(penalizer=lam, l1_ratio=0)``)::

    f(beta) = -loglik(beta) / n + lam / 2 * ||beta||^2

with the Breslow partial log-likelihood
``loglik = sum_{i: event} [x_i beta - log sum_{j: t_j >= t_i} exp(x_j beta)]``. The penalty is
chosen by :func:`cross_validate_penalty` (the cross-validated partial likelihood of Verweij &
van Houwelingen, 1993). Used by the GLM base term of survival tasks (:mod:`mmai.models.glm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _tie_last(sorted_time: np.ndarray) -> np.ndarray:
    """For each position of a sorted time vector, the last position holding the same time: (N,)."""
    n = len(sorted_time)
    new_group = np.r_[sorted_time[1:] != sorted_time[:-1], True]  # True at the last of each tie group
    last = np.where(new_group, np.arange(n), n)
    return np.minimum.accumulate(last[::-1])[::-1]


def partial_loglik(x: np.ndarray, time: np.ndarray, event: np.ndarray, beta: np.ndarray,
                   derivatives: bool = False) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """Breslow partial log-likelihood and, with ``derivatives``, its gradient and Hessian.

    Args:
        x: (N, D) covariates. time: (N,) follow-up. event: (N,) 1 = event, 0 = censored.
        beta: (D,) coefficients.
    Returns:
        loglik, gradient (D,) or None, Hessian (D, D) or None.
    """
    eta = x @ beta
    eta = eta - eta.max()  # the likelihood is invariant to a shift of eta
    w = np.exp(eta)
    desc = np.argsort(-time, kind="stable")  # risk set of t_i: every j with t_j >= t_i
    last_desc = _tie_last(time[desc])
    s0 = np.empty_like(w)
    s0[desc] = np.cumsum(w[desc])[last_desc]
    ev = event > 0
    ll = float(np.sum(eta[ev] - np.log(s0[ev])))
    if not derivatives:
        return ll, None, None
    s1 = np.empty_like(x)
    s1[desc] = np.cumsum(w[desc, None] * x[desc], axis=0)[last_desc]
    xbar = s1[ev] / s0[ev, None]  # (E, D)
    grad = (x[ev] - xbar).sum(axis=0)
    asc = np.argsort(time, kind="stable")  # c_j = sum over events i with t_i <= t_j of 1 / S0(t_i)
    last_asc = _tie_last(time[asc])
    c = np.empty_like(w)
    c[asc] = np.cumsum(np.where(ev[asc], 1.0 / s0[asc], 0.0))[last_asc]
    hess = -((x * (c * w)[:, None]).T @ x - xbar.T @ xbar)
    return ll, grad, hess


def fit_ridge_cox(x: np.ndarray, time: np.ndarray, event: np.ndarray, penalizer: float, *,
                  beta0: np.ndarray | None = None, max_iter: int = 100, tol: float = 1e-9) -> np.ndarray:
    """Minimise ``-loglik / n + penalizer / 2 * ||beta||^2`` by Newton's method with step halving.

    Args:
        x: (N, D) covariates. time, event: (N,). penalizer: lam >= 0 (> 0 for separable data).
        beta0: (D,) starting point (zeros by default).
    Returns:
        beta (D,).
    """
    x, time, event = np.asarray(x, np.float64), np.asarray(time, np.float64), np.asarray(event, np.float64)
    n, d = x.shape
    beta = np.zeros(d) if beta0 is None else np.array(beta0, dtype=np.float64)

    def objective(b: np.ndarray) -> float:
        return -partial_loglik(x, time, event, b)[0] / n + 0.5 * penalizer * float(b @ b)

    f = objective(beta)
    for _ in range(max_iter):
        _, g, h = partial_loglik(x, time, event, beta, derivatives=True)
        grad = -g / n + penalizer * beta  # type: ignore[operator]
        hess = -h / n + penalizer * np.eye(d)  # type: ignore[operator]
        if np.max(np.abs(grad)) < tol:
            break
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        t = 1.0
        while t > 1e-10:
            candidate = beta - t * step
            fc = objective(candidate)
            if fc <= f + 1e-4 * t * float(grad @ -step):
                break
            t *= 0.5
        if t <= 1e-10:
            break
        beta, f_old, f = candidate, f, fc
        if abs(f_old - f) < tol * max(1.0, abs(f)):
            break
    return beta


def cross_validate_penalty(x: np.ndarray, time: np.ndarray, event: np.ndarray, penalties: Sequence[float], *,
                           folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """The penalty with the best cross-validated partial likelihood (folds stratified by event).

    ``cvl(lam) = sum_k [loglik_all(beta_-k) - loglik_-k(beta_-k)]`` (Verweij & van Houwelingen),
    beta_-k fitted without fold k. Returns (best penalty, its cvl per event).
    """
    from sklearn.model_selection import StratifiedKFold

    event = (np.asarray(event) > 0).astype(int)
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, event))
    scores = np.zeros(len(penalties))
    starts: list[np.ndarray | None] = [None] * len(splits)
    for p, lam in enumerate(sorted(penalties, reverse=True)):  # strong to weak: warm starts stay close
        for k, (tr, _) in enumerate(splits):
            beta = fit_ridge_cox(x[tr], time[tr], event[tr], lam, beta0=starts[k])
            starts[k] = beta
            scores[p] += (partial_loglik(x, time, event, beta)[0]
                          - partial_loglik(x[tr], time[tr], event[tr], beta)[0])
    order = sorted(penalties, reverse=True)
    best = int(np.argmax(scores))
    return float(order[best]), float(scores[best] / max(1, event.sum()))
