"""``compute_metrics``: every metric of a task kind with bootstrap CIs, as one JSON-able dict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mmai.engine.metrics import (
    KINDS,
    MetricError,
    UndefinedMetricError,
    _binary,
    _class_index,
    _matrix,
    _prep_surv,
    _probs,
    _vec,
    auprc,
    auroc,
    balanced_accuracy,
    bootstrap_ci,
    brier,
    c_index,
    calibration_curve,
    ece,
    mae,
    r2,
    rmse,
)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _key(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _encode(y: Any, classes: Sequence[Any] | None, k: int, name: str = "y") -> np.ndarray:
    """Labels -> class indices 0..k-1 (via ``classes``, compared as strings, when given)."""
    if classes is None:
        return _binary(y, name) if k == 2 else _class_index(y, k, name).astype(float)
    keys = [_key(c) for c in classes]
    if len(set(keys)) != len(keys) or len(keys) != k:
        raise MetricError(f"classes must be {k} distinct names, got {list(classes)}")
    lut = {c: i for i, c in enumerate(keys)}
    yy = list(np.asarray(y, dtype=object).ravel())
    if not yy:
        raise MetricError(f"{name} is empty: no cases to evaluate")
    out = np.empty(len(yy))
    for i, v in enumerate(yy):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            raise MetricError(f"{name} is missing at index {i}")
        j = lut.get(_key(v))
        if j is None:
            raise MetricError(f"{name} label {v!r} at index {i} is not one of the classes {keys}")
        out[i] = j
    return out


def _fill(out: dict, name: str, fn: Callable, arrays: tuple, n_boot: int, seed: int, alpha: float,
          stratify: Any, groups: Any = None) -> None:
    try:
        if n_boot > 0:
            ci = bootstrap_ci(fn, *arrays, n_boot=n_boot, seed=seed, alpha=alpha, stratify=stratify, groups=groups)
            out[name], out[f"{name}_ci"] = _num(ci[0]), [_num(ci[1]), _num(ci[2])]
            if ci.n_skipped:
                out["n_boot_skipped"][name] = ci.n_skipped
        else:
            out[name], out[f"{name}_ci"] = _num(fn(*arrays)), None
    except UndefinedMetricError as exc:
        out[name], out[f"{name}_ci"] = None, None
        out["undefined"][name] = str(exc)


def compute_metrics(kind: str, *, y: Any = None, prob: Any = None, pred: Any = None, time: Any = None,
                    event: Any = None, risk: Any = None, classes: Sequence[Any] | None = None,
                    n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, groups: Any = None) -> dict[str, Any]:
    """All metrics of one task kind, each with a percentile-bootstrap CI (JSON-able dict).

    Args:
        kind: binary | multiclass | regression | survival.
        y: (N,) labels (binary/multiclass: 0/1 or indices, or names in ``classes``) or targets.
        prob: binary (N,) P(positive) or (N, 2); multiclass (N, K), rows summing to 1.
        pred: classification: (N,) predicted labels (default: p >= 0.5 / argmax); regression: (N,).
        time, event, risk: survival (N,) each; higher risk = earlier event.
        classes: class names in prob-column order (binary: [negative, positive]).
        n_boot: bootstrap resamples (0 = point estimates only, CIs None).
        seed, alpha: bootstrap seed and 1 - confidence level.
        groups: optional (N,) patient id per case; the bootstrap then resamples patients (all
            cases of a drawn patient together), not cases.

    Returns:
        {"kind", "n", metric: float | None, metric + "_ci": [lo, hi] | None, ..., "undefined":
        {metric: reason}, "n_boot_skipped": {metric: count}, "n_boot", "seed", "alpha"}. Binary:
        auroc, auprc, brier, ece (point only), balanced_accuracy, n_pos, calibration; multiclass: auroc (macro
        one-vs-rest), auroc_per_class, brier, balanced_accuracy, n_per_class; regression: mae,
        rmse, r2; survival: c_index, n_events. Classification CIs resample within each class,
        survival CIs within events / censored cases.
    """
    if kind not in KINDS:
        raise MetricError(f"unknown task kind {kind!r}; expected one of {list(KINDS)}")
    if int(n_boot) < 0:
        raise MetricError(f"n_boot must be >= 0, got {n_boot}")
    given = {"y": y, "prob": prob, "pred": pred, "time": time, "event": event, "risk": risk}
    needs = {"binary": ("y", "prob"), "multiclass": ("y", "prob"), "regression": ("y", "pred"),
             "survival": ("time", "event", "risk")}[kind]
    missing = [k for k in needs if given[k] is None]
    if missing:
        raise MetricError(f"compute_metrics(kind={kind!r}) needs {', '.join(missing)}")
    out: dict[str, Any] = {"kind": kind, "undefined": {}, "n_boot_skipped": {}}
    kw: dict[str, Any] = {"n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha)}
    fill_kw: dict[str, Any] = {**kw, "groups": groups}
    if kind == "binary":
        _binary_metrics(out, y, prob, pred, classes, fill_kw)
    elif kind == "multiclass":
        _multiclass_metrics(out, y, prob, pred, classes, fill_kw)
    elif kind == "regression":
        yy = _vec(y, "y")
        pp = _vec(pred, "pred", yy.size)
        out["n"] = int(yy.size)
        for name, fn in (("mae", mae), ("rmse", rmse), ("r2", r2)):
            _fill(out, name, fn, (yy, pp), stratify=None, **fill_kw)
    else:
        t, e, r = _prep_surv(time, event, risk)
        out.update(n=int(t.size), n_events=int(e.sum()))
        _fill(out, "c_index", c_index, (t, e, r), stratify=e, **fill_kw)
    out.update(kw)
    if groups is not None:
        out["bootstrap_unit"] = "group"
    return out


def _binary_metrics(out: dict[str, Any], y: Any, prob: Any, pred: Any, classes: Sequence[Any] | None,
                    fill_kw: dict[str, Any]) -> None:
    """AUROC, AUPRC, Brier (with CIs), ECE, balanced accuracy and the calibration curve into ``out``."""
    P = np.asarray(prob, dtype=float)
    if P.ndim == 2 and P.shape[1] == 2:
        P = P[:, 1]
    yy = _encode(y, classes, 2)
    p = _probs(P, yy.size, "prob", check_range=True)
    yp = (p >= 0.5).astype(float) if pred is None else _encode(pred, classes, 2, "pred")
    out.update(n=int(yy.size), n_pos=int(yy.sum()), threshold=0.5 if pred is None else None)
    if classes is not None:
        out["classes"], out["positive_class"] = [_key(c) for c in classes], _key(classes[1])
    for name, fn in (("auroc", auroc), ("auprc", auprc), ("brier", brier)):
        _fill(out, name, fn, (yy, p), stratify=yy, **fill_kw)
    out["ece"] = ece(yy, p)  # no CI: ECE is biased upward, its bootstrap often lies above it
    _fill(out, "balanced_accuracy", balanced_accuracy, (yy, yp), stratify=yy, **fill_kw)
    out["calibration"] = calibration_curve(yy, p)


def _multiclass_metrics(out: dict[str, Any], y: Any, prob: Any, pred: Any, classes: Sequence[Any] | None,
                        fill_kw: dict[str, Any]) -> None:
    """Macro AUROC (+ per class), Brier and balanced accuracy into ``out``."""
    P = np.asarray(prob, dtype=float)
    yy0 = np.asarray(y)
    P = _matrix(P, yy0.shape[0] if yy0.ndim == 1 else -1, "prob")
    k = P.shape[1]
    yy = _encode(y, classes, k) if classes is not None else _class_index(y, k).astype(float)
    bad = np.flatnonzero(np.abs(P.sum(1) - 1) > 1e-3)
    if bad.size:
        raise MetricError(f"prob rows must sum to 1 (softmax); row {bad[0]} sums to {P[bad[0]].sum():.4g}")
    yp = P.argmax(1).astype(float) if pred is None else _encode(pred, classes, k, "pred")
    names = [_key(c) for c in classes] if classes is not None else [str(i) for i in range(k)]
    yi = yy.astype(np.int64)
    out.update(n=int(yy.size), classes=names, n_per_class={c: int((yi == i).sum()) for i, c in enumerate(names)})
    _fill(out, "auroc", auroc, (yi, P), stratify=yi, **fill_kw)
    per = {}
    for i, c in enumerate(names):
        try:
            per[c] = _num(auroc((yi == i).astype(float), P[:, i]))
        except UndefinedMetricError:
            per[c] = None
    out["auroc_per_class"] = per
    _fill(out, "brier", brier, (yi, P), stratify=yi, **fill_kw)
    _fill(out, "balanced_accuracy", balanced_accuracy, (yy, yp), stratify=yi, **fill_kw)
