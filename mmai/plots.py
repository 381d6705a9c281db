"""Evaluation and training plots as PNG files.

matplotlib is imported inside the functions and drives a ``Figure`` with the Agg canvas directly
(no pyplot, no global backend switch), so importing mmai never touches matplotlib's state. Every
function writes its PNG atomically (temp file in the same folder + ``os.replace``) and returns
the path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmai.engine import metrics as M
from mmai.errors import MmaiError
from mmai.utils import atomic_path

log = logging.getLogger(__name__)

Curves = Mapping[str, tuple[Any, Any]]


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 5.0), **kw: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Write fig to path as PNG via :func:`mmai.utils.atomic_path` (never a half-written PNG)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.debug("wrote %s", path)
    return path


def _check(curves: Curves, what: str) -> None:
    if not curves:
        raise MmaiError(f"{what}: no curves to plot (pass {{name: (y, p)}})")


def plot_roc(curves: Curves, path: str | os.PathLike, title: str | None = None,
             bayes_auroc: float | None = None) -> Path:
    """ROC curves of several models on one axes, AUROC in the legend.

    Args:
        curves: name -> (y (N,) 0/1, p (N,) score of class 1).
        path: PNG to write.
        title: axes title.
        bayes_auroc: the Bayes-optimal AUROC of a synthetic cohort, shown in the legend.
    """
    from sklearn.metrics import roc_curve

    _check(curves, "plot_roc")
    fig, ax = _figure()
    ax = ax[0, 0]
    for name, (y, p) in curves.items():
        auc = M.auroc(y, p)
        fpr, tpr, _ = roc_curve(np.asarray(y, dtype=float), np.asarray(p, dtype=float))
        ax.plot(fpr, tpr, lw=2, label=f"{name} (AUROC {auc:.3f}, n={np.size(y)})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (0.500)")
    if bayes_auroc is not None:
        ax.plot([], [], " ", label=f"Bayes-optimal AUROC {bayes_auroc:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title or "ROC curve", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_pr(curves: Curves, path: str | os.PathLike, title: str | None = None) -> Path:
    """Precision-recall curves, average precision (AUPRC) in the legend, prevalence as the baseline.

    Args:
        curves: name -> (y (N,) 0/1, p (N,) score of class 1).
        path: PNG to write.
        title: axes title.
    """
    from sklearn.metrics import precision_recall_curve

    _check(curves, "plot_pr")
    fig, ax = _figure()
    ax = ax[0, 0]
    prevalences = []
    for name, (y, p) in curves.items():
        ap = M.auprc(y, p)
        prec, rec, _ = precision_recall_curve(np.asarray(y, dtype=float), np.asarray(p, dtype=float))
        ax.step(rec, prec, where="post", lw=2, label=f"{name} (AUPRC {ap:.3f})")
        prevalences.append(float(np.mean(np.asarray(y, dtype=float))))
    if np.ptp(prevalences) < 1e-12:  # one chance level shared by every curve
        ax.axhline(prevalences[0], ls="--", color="grey", lw=1, label=f"prevalence ({prevalences[0]:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
           title=title or "Precision-recall curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_calibration(curves: Curves, path: str | os.PathLike, n_bins: int = 10,
                     title: str | None = None) -> Path:
    """Reliability diagram (observed fraction vs mean predicted probability per equal-width bin,
    the ECE bins) above a histogram of the predicted probabilities.

    Args:
        curves: name -> (y (N,) 0/1, p (N,) probability of class 1).
        path: PNG to write.
        n_bins: number of equal-width bins on [0, 1].
        title: figure title.
    """
    _check(curves, "plot_calibration")
    fig, axes = _figure(2, 1, size=(6.0, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax, hist = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, (y, p) in curves.items():
        cal = M.calibration_curve(y, p, n_bins=n_bins)
        err = M.ece(y, p, n_bins=n_bins)
        line = ax.plot(cal["mean_pred"], cal["frac_pos"], marker="o", lw=1.5,
                       label=f"{name} (ECE {err:.3f}, Brier {M.brier(y, p):.3f})")[0]
        counts = np.bincount(M._bin_index(np.asarray(p, dtype=float), n_bins), minlength=n_bins)
        hist.stairs(counts, edges, lw=1.5, color=line.get_color())  # the same bins as the ECE
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="Observed fraction of positives", title=title or "Calibration")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel=f"Predicted probability ({n_bins} equal-width bins)", ylabel="Cases")
    hist.grid(alpha=0.3)
    return _save(fig, path)


def plot_pred_vs_true(curves: Curves, path: str | os.PathLike, title: str | None = None) -> Path:
    """Regression: predicted vs true scatter with the identity line, MAE and R2 in the legend.

    Args:
        curves: name -> (y (N,) true values, pred (N,) predictions).
        path: PNG to write.
        title: axes title.
    """
    _check(curves, "plot_pred_vs_true")
    fig, ax = _figure()
    ax = ax[0, 0]
    lo, hi = np.inf, -np.inf
    for name, (y, pred) in curves.items():
        y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
        try:
            r2 = f"{M.r2(y, pred):.3f}"
        except M.UndefinedMetricError:
            r2 = "undefined"
        ax.scatter(y, pred, s=12, alpha=0.6, label=f"{name} (MAE {M.mae(y, pred):.3g}, R2 {r2})")
        lo, hi = min(lo, y.min(), pred.min()), max(hi, y.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1, label="identity")
    ax.set(xlabel="True value", ylabel="Predicted value", title=title or "Predicted vs true")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_km_by_risk(time: Any, event: Any, risk: Any, path: str | os.PathLike, n_groups: int = 3,
                    title: str | None = None) -> Path:
    """Kaplan-Meier curves of the cases split into ``n_groups`` quantile groups of predicted risk
    (tertiles by default); a useful model separates them, highest risk falling fastest.

    Args:
        time, event, risk: (N,) follow-up time, 1 = event / 0 = censored, predicted risk.
        path: PNG to write.
        n_groups: number of risk groups (equal-count quantiles).
        title: axes title.
    """
    t, e, r = M._prep_surv(time, event, risk)
    if not 1 <= int(n_groups) <= t.size:
        raise MmaiError(f"plot_km_by_risk: n_groups must be in [1, {t.size}], got {n_groups}")
    order = np.argsort(r, kind="mergesort")
    groups = np.array_split(order, int(n_groups))
    names = {3: ["low", "middle", "high"], 2: ["low", "high"]}.get(int(n_groups))
    fig, ax = _figure()
    ax = ax[0, 0]
    for g, idx in enumerate(groups):
        name = names[g] if names else f"group {g + 1}"
        if idx.size == 0:
            continue
        kt, ks = M.kaplan_meier(t[idx], e[idx])
        kt, ks = np.r_[kt, t[idx].max()], np.r_[ks, ks[-1]]  # extend to the last follow-up
        ax.step(kt, ks, where="post", lw=2,
                label=f"{name} risk (n={idx.size}, events={int(e[idx].sum())}, "
                      f"risk {r[idx].min():.2g}..{r[idx].max():.2g})")
        cens = idx[e[idx] == 0]
        at = ks[np.searchsorted(kt, t[cens], side="right") - 1]  # S(t) at each censoring time
        ax.plot(t[cens], at, "|", ms=6, color=ax.lines[-1].get_color())
    ax.set(ylim=(0, 1.02), xlim=(0, None), xlabel="Time", ylabel="Survival probability",
           title=title or f"Kaplan-Meier by predicted-risk group ({int(n_groups)} quantiles)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Per-epoch curves from log rows like {"epoch": 1, "train_loss": .., "val_loss": .., "val_auroc": ..}.

    Every numeric key that exists (other than ``epoch``) is plotted, one panel per kind of key:
    losses ("loss" in the name), learning rates ("lr", "learning_rate"; log scale), durations
    ("time", "sec" in the name) and the other metrics. Rows without ``epoch`` count 1, 2, ...

    Args:
        rows: per-epoch dicts (from log.jsonl).
        path: PNG to write.
        title: figure title.
    """
    if not rows:
        raise MmaiError("plot_training_curves: no rows (expected per-epoch dicts like {'epoch': 1, 'train_loss': ..})")
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k != "epoch" and k not in keys and isinstance(v, (int, float, np.number)) \
                    and not isinstance(v, bool):
                keys.append(k)
    if not keys:
        raise MmaiError(f"plot_training_curves: no numeric key in the rows (keys seen: {sorted(rows[0])})")
    panels: dict[str, list[str]] = {"Loss": [], "Learning rate": [], "Seconds": [], "Metric": []}
    for k in keys:
        low = k.lower()
        kind = ("Loss" if "loss" in low else
                "Learning rate" if low == "lr" or low.endswith("_lr") or "learning_rate" in low else
                "Seconds" if "time" in low or "sec" in low else "Metric")
        panels[kind].append(k)
    used = [(ylabel, ks) for ylabel, ks in panels.items() if ks]
    fig, axes = _figure(1, len(used), size=(5.0 * len(used), 4.2))
    for ax, (ylabel, ks) in zip(axes[0], used, strict=True):
        for k in ks:
            xs, ys = [], []
            for i, row in enumerate(rows):
                v = row.get(k)
                if isinstance(v, (int, float, np.number)) and np.isfinite(v):
                    xs.append(row.get("epoch", i + 1))
                    ys.append(float(v))
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.5, label=k)
        ax.set(xlabel="Epoch", ylabel=ylabel, yscale="log" if ylabel == "Learning rate" else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
