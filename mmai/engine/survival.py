"""Survival probabilities from a Cox model: Breslow baseline hazard, ``surv_<t>`` values, and the
horizon metrics of ``mmai evaluate`` (time-dependent AUROC, calibration at t).

A survival model outputs a log-risk ``r`` per case. After training, the Breslow estimator on the
training rows gives the baseline cumulative hazard

    H0(t) = sum over event times t_i <= t of  d_i / sum_{j: t_j >= t_i} exp(r_j)

(d_i events at t_i; ties share one risk set), saved in state.json, and a case's survival
probability is ``S(t | r) = exp(-H0(t) exp(r))``: what ``surv_<t>`` columns hold for the
horizons of ``task.horizons``. This is the estimate lifelines' CoxPHFitter makes with the
log-risk as its only covariate and coefficient 1 (tested). H0 is known up to the longest
training follow-up; a horizon beyond it is refused.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mmai.engine.metrics import MetricError, UndefinedMetricError, bootstrap_ci, kaplan_meier
from mmai.errors import CheckpointError

log = logging.getLogger(__name__)

STATE_KEY = "survival"


def horizon_column(t: float) -> str:
    """``surv_<t>``: the predictions column of horizon ``t`` (``12.0`` -> ``surv_12``)."""
    return f"surv_{float(t):g}"


def breslow_baseline(time: Any, event: Any, risk: Any) -> dict[str, Any]:
    """Breslow baseline cumulative hazard of log-risks ``risk`` on (time, event), JSON-able.

    Args:
        time, event, risk: (N,) follow-up times, 1 = event / 0 = censored, model log-risks.

    Returns:
        {"times": distinct event times (ascending), "cumhazard": H0 at each (for risk - centre),
        "centre": the risk subtracted for numerical range, "max_time": longest follow-up,
        "n": N, "n_events": events}.
    """
    t = np.asarray(time, dtype=float).ravel()
    e = np.asarray(event, dtype=float).ravel()
    r = np.asarray(risk, dtype=float).ravel()
    if not (t.size == e.size == r.size) or t.size == 0:
        raise MetricError(f"breslow_baseline: time, event, risk need one equal, non-zero length; got "
                              f"{t.size}, {e.size}, {r.size}")
    if not (np.isfinite(t).all() and np.isfinite(r).all()):
        raise MetricError("breslow_baseline: time and risk must be finite")
    centre = float(r.mean())
    w = np.exp(r - centre)
    order = np.argsort(t, kind="mergesort")
    t, e, w = t[order], e[order], w[order]
    at_risk = np.cumsum(w[::-1])[::-1]  # sum of w over t_j >= t_i (sorted), before handling ties
    times, first = np.unique(t, return_index=True)
    deaths = np.add.reduceat(e, first)
    hazard = deaths / at_risk[first]  # the risk set of a tied time starts at its first case
    keep = deaths > 0
    return {"times": times[keep].tolist(), "cumhazard": np.cumsum(hazard[keep]).tolist(), "centre": centre,
            "max_time": float(t.max()), "n": int(t.size), "n_events": int(e.sum())}


def survival_probability(baseline: dict[str, Any], risk: Any, horizons: Any) -> np.ndarray:
    """``S(t | r) = exp(-H0(t) exp(r))`` for each risk (N,) and horizon (H,) -> (N, H).

    Raises:
        CheckpointError: a horizon lies beyond the longest training follow-up.
    """
    h = np.asarray(list(horizons), dtype=float)
    too_far = h[h > float(baseline["max_time"])]
    if too_far.size:
        raise CheckpointError(f"task.horizons {too_far.tolist()} lie beyond the longest training follow-up "
                              f"({baseline['max_time']:g}); the baseline hazard is unknown there")
    times = np.asarray(baseline["times"], dtype=float)
    cum = np.r_[0.0, np.asarray(baseline["cumhazard"], dtype=float)]
    h0 = cum[np.searchsorted(times, h, side="right")]  # step function, right-continuous
    r = np.asarray(risk, dtype=float).reshape(-1, 1) - float(baseline["centre"])
    return np.exp(-h0[None, :] * np.exp(r))


def baseline_state(out: Any, targets: dict[str, Any]) -> dict[str, Any]:
    """Trainer hook: the Breslow baseline of the training rows' outputs, as the run's
    ``state.json`` entry ``{STATE_KEY: {"baseline": ..., ...}}`` (written with the rest of the state).

    Args:
        out: (N, 1) raw model outputs (log-risk) on the training rows, without augmentation.
        targets: {"time": (N,), "event": (N,)} of the same rows.
    """
    risk = np.asarray(out, dtype=float)[:, 0]
    base = breslow_baseline(np.asarray(targets["time"]), np.asarray(targets["event"]), risk)
    log.info("Breslow baseline hazard on %d training rows (%d events)", base["n"], base["n_events"])
    return {STATE_KEY: {"baseline": base, "estimator": "breslow", "rows": "training"}}


# ----------------------------------------------------------------------------- horizon metrics


def _censoring_km(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return kaplan_meier(time, 1.0 - event)


def _step(kt: np.ndarray, ks: np.ndarray, t: np.ndarray, left: bool = False) -> np.ndarray:
    """A KM step function at ``t`` (right-continuous; ``left``: the value just before t)."""
    idx = np.searchsorted(kt, t, side="left" if left else "right") - 1
    return np.where(idx >= 0, ks[np.clip(idx, 0, None)], 1.0)


def td_auroc(time: Any, event: Any, score: Any, t: float) -> float:
    """Cumulative/dynamic AUROC at ``t`` with inverse-probability-of-censoring weights (Uno et al.).

    Cases: event by ``t`` (weighted by 1 / G(T_i-), G the censoring KM); controls: still at risk
    after ``t``. Higher ``score`` = earlier event (log-risk, or 1 - S(t)). Without censoring it is
    the plain AUROC of "event by t".
    """
    tt, ee, s = (np.asarray(a, dtype=float).ravel() for a in (time, event, score))
    cases = (tt <= t) & (ee == 1)
    controls = tt > t
    if not cases.any() or not controls.any():
        raise UndefinedMetricError(f"time-dependent AUROC at t={t:g} needs cases with an event by t and "
                                   f"cases at risk after t (got {int(cases.sum())} and {int(controls.sum())})")
    kt, ks = _censoring_km(tt, ee)
    g = _step(kt, ks, tt[cases], left=True)
    w = 1.0 / np.clip(g, 1e-12, None)
    sc, sn = s[cases][:, None], s[controls][None, :]
    wins = (sc > sn).sum(1) + 0.5 * (sc == sn).sum(1)
    return float((w * wins).sum() / (w.sum() * controls.sum()))


def calibration_at(time: Any, event: Any, surv: Any, t: float, n_groups: int = 5) -> dict[str, Any]:
    """Predicted vs observed (Kaplan-Meier) probability of an event by ``t`` in quantile groups.

    Returns:
        {"predicted": [...], "observed": [...], "n": [...], "error": count-weighted mean
        |observed - predicted|, "predicted_mean", "observed_all"} (observed = 1 - KM(t)).
    """
    tt, ee, ss = (np.asarray(a, dtype=float).ravel() for a in (time, event, surv))
    p = 1.0 - ss
    order = np.argsort(p, kind="mergesort")
    groups = [g for g in np.array_split(order, min(int(n_groups), p.size)) if g.size]
    pred, obs, n = [], [], []
    for g in groups:
        kt, ks = kaplan_meier(tt[g], ee[g])
        pred.append(float(p[g].mean()))
        obs.append(float(1.0 - _step(kt, ks, np.array([t]))[0]))
        n.append(int(g.size))
    kt, ks = kaplan_meier(tt, ee)
    err = float(np.average(np.abs(np.array(obs) - np.array(pred)), weights=n))
    return {"predicted": pred, "observed": obs, "n": n, "error": err, "predicted_mean": float(p.mean()),
            "observed_all": float(1.0 - _step(kt, ks, np.array([t]))[0])}


def horizon_metrics(time: Any, event: Any, surv: dict[float, Any], *, n_boot: int = 1000, seed: int = 0,
                    groups: Any = None) -> dict[str, Any]:
    """Per horizon: time-dependent AUROC (with a bootstrap CI within events / censored; over
    ``groups``, e.g. patients, when given) and calibration of the ``surv_<t>`` probabilities.
    Undefined metrics are None with a reason."""
    tt, ee = np.asarray(time, dtype=float), np.asarray(event, dtype=float)
    out: dict[str, Any] = {}
    for t, s in sorted(surv.items()):
        s = np.asarray(s, dtype=float)
        entry: dict[str, Any] = {"t": float(t), "n_events_by_t": int(((tt <= t) & (ee == 1)).sum()),
                                 "n_at_risk_after_t": int((tt > t).sum())}
        try:
            if n_boot > 0:
                ci = bootstrap_ci(lambda a, b, c, t=t: td_auroc(a, b, c, t), tt, ee, 1.0 - s, n_boot=n_boot,
                                  seed=seed, stratify=ee, groups=groups)
                entry["auroc"], entry["auroc_ci"] = float(ci[0]), [float(ci[1]), float(ci[2])]
                if not all(np.isfinite(entry["auroc_ci"])):
                    entry["auroc_ci"] = None
            else:
                entry["auroc"], entry["auroc_ci"] = td_auroc(tt, ee, 1.0 - s, t), None
        except UndefinedMetricError as exc:
            entry["auroc"], entry["auroc_ci"], entry["undefined"] = None, None, str(exc)
        entry["calibration"] = calibration_at(tt, ee, s, t)
        out[horizon_column(t)] = entry
    return out
