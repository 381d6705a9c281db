"""Evaluation and training plots as PNG files.

matplotlib is imported inside the functions and drives a ``Figure`` with the Agg canvas directly
(no pyplot, no global backend switch), so importing mmai never touches matplotlib's state. Every
function writes its PNG atomically (temp file in the same folder + ``os.replace``) and returns
the path; each ``plot_*`` has a ``*_figure`` twin returning the ``Figure`` (what the tests inspect).

What the figures show (docs/evaluate.md, "Figures"): ROC / PR curves with percentile bootstrap
bands (cases resampled within each class, ``n_boot`` / ``seed`` from the caller), calibration on
equal-count bins with 95% Wilson intervals and the ECE with its bootstrap CI, Kaplan-Meier curves
with the numbers at risk and the time unit, training curves without bookkeeping columns and with
the best epoch marked. The numbers behind them are in :mod:`mmai.figures.stats`.
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
from mmai.figures import stats as S
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


def _band_label(n_boot: int) -> str:
    return f"95% bootstrap band ({n_boot} resamples, percentile)" if n_boot > 0 else ""


def plot_roc(curves: Curves, path: str | os.PathLike, title: str | None = None,
             bayes_auroc: float | None = None, n_boot: int = 200, seed: int = 0) -> Path:
    """ROC curves of several models on one axes, AUROC in the legend, each with a bootstrap band.

    Args:
        curves: name -> (y (N,) 0/1, p (N,) score of class 1).
        path: PNG to write.
        title: axes title.
        bayes_auroc: the Bayes-optimal AUROC of a synthetic cohort, shown in the legend.
        n_boot: bootstrap resamples of the band (cases resampled within each class; 0: no band).
        seed: bootstrap seed.
    """
    return _save(roc_figure(curves, title=title, bayes_auroc=bayes_auroc, n_boot=n_boot, seed=seed), path)


def roc_figure(curves: Curves, *, title: str | None = None, bayes_auroc: float | None = None, n_boot: int = 200,
               seed: int = 0) -> Any:
    """The figure of :func:`plot_roc` (a matplotlib ``Figure``)."""
    from sklearn.metrics import roc_curve

    _check(curves, "plot_roc")
    fig, ax = _figure()
    ax = ax[0, 0]
    for name, (y, p) in curves.items():
        auc = M.auroc(y, p)
        fpr, tpr, _ = roc_curve(np.asarray(y, dtype=float), np.asarray(p, dtype=float))
        line = ax.plot(fpr, tpr, lw=2, label=f"{name} (AUROC {auc:.3f}, n={np.size(y)})")[0]
        if n_boot > 0:
            grid, _, lo, hi = S.roc_band(y, p, n_boot=n_boot, seed=seed)
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2, lw=0, label=f"_band {name}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (0.500)")
    if n_boot > 0:
        ax.fill_between([], [], [], color="grey", alpha=0.2, lw=0, label=_band_label(n_boot))
    if bayes_auroc is not None:
        ax.plot([], [], " ", label=f"Bayes-optimal AUROC {bayes_auroc:.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title=title or "ROC curve", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_pr(curves: Curves, path: str | os.PathLike, title: str | None = None, n_boot: int = 200,
            seed: int = 0) -> Path:
    """Precision-recall curves, average precision (AUPRC) in the legend, prevalence as the baseline,
    each with a bootstrap band.

    Args:
        curves: name -> (y (N,) 0/1, p (N,) score of class 1).
        path: PNG to write.
        title: axes title.
        n_boot: bootstrap resamples of the band (0: no band).
        seed: bootstrap seed.
    """
    return _save(pr_figure(curves, title=title, n_boot=n_boot, seed=seed), path)


def pr_figure(curves: Curves, *, title: str | None = None, n_boot: int = 200, seed: int = 0) -> Any:
    """The figure of :func:`plot_pr` (a matplotlib ``Figure``)."""
    from sklearn.metrics import precision_recall_curve

    _check(curves, "plot_pr")
    fig, ax = _figure()
    ax = ax[0, 0]
    prevalences = []
    for name, (y, p) in curves.items():
        ap = M.auprc(y, p)
        prec, rec, _ = precision_recall_curve(np.asarray(y, dtype=float), np.asarray(p, dtype=float))
        line = ax.step(rec, prec, where="post", lw=2, label=f"{name} (AUPRC {ap:.3f})")[0]
        if n_boot > 0:
            grid, _, lo, hi = S.pr_band(y, p, n_boot=n_boot, seed=seed)
            ax.fill_between(grid, lo, hi, step="post", color=line.get_color(), alpha=0.2, lw=0,
                            label=f"_band {name}")
        prevalences.append(float(np.mean(np.asarray(y, dtype=float))))
    if np.ptp(prevalences) < 1e-12:  # one chance level shared by every curve
        ax.axhline(prevalences[0], ls="--", color="grey", lw=1, label=f"prevalence ({prevalences[0]:.3f})")
    if n_boot > 0:
        ax.fill_between([], [], [], color="grey", alpha=0.2, lw=0, label=_band_label(n_boot))
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision (PPV)",
           title=title or "Precision-recall curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def plot_calibration(curves: Curves, path: str | os.PathLike, n_bins: int = 10,
                     title: str | None = None, n_boot: int = 200, seed: int = 0) -> Path:
    """Reliability diagram on equal-count bins with 95% Wilson intervals per bin, ECE with a
    bootstrap CI in the legend, above a histogram of the predicted probabilities.

    Args:
        curves: name -> (y (N,) 0/1, p (N,) probability of class 1).
        path: PNG to write.
        n_bins: number of equal-count (quantile) bins of the reliability diagram.
        title: figure title.
        n_boot: bootstrap resamples of the ECE's CI (0: no CI).
        seed: bootstrap seed.
    """
    return _save(calibration_figure(curves, n_bins=n_bins, title=title, n_boot=n_boot, seed=seed), path)


def calibration_figure(curves: Curves, *, n_bins: int = 10, title: str | None = None, n_boot: int = 200,
                       seed: int = 0) -> Any:
    """The figure of :func:`plot_calibration`. The ECE is report.json's (10 equal-width bins)."""
    _check(curves, "plot_calibration")
    fig, axes = _figure(2, 1, size=(6.0, 6.8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax, hist = axes[0, 0], axes[1, 0]
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, (y, p) in curves.items():
        bins = S.equal_count_bins(y, p, n_bins=n_bins)
        err = M.ece(y, p)
        ci = ""
        if n_boot > 0:
            _, lo, hi = M.bootstrap_ci(M.ece, np.asarray(y, dtype=float), np.asarray(p, dtype=float), n_boot=n_boot,
                                       seed=seed)
            ci = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else ""
        yerr = np.clip(np.stack([bins["frac_pos"] - bins["lo"], bins["hi"] - bins["frac_pos"]]), 0, None)
        line = ax.errorbar(bins["mean_pred"], bins["frac_pos"], yerr=yerr, marker="o", ms=4, lw=1.5, capsize=3,
                           label=f"{name} (ECE {err:.3f}{ci}, Brier {M.brier(y, p):.3f})")[0]
        hist.hist(np.asarray(p, dtype=float), bins=np.linspace(0, 1, 21), histtype="step", lw=1.5,
                  color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="Observed fraction of positives (95% Wilson CI)",
           title=title or "Calibration")
    ax.plot([], [], " ", label=f"points: {n_bins} equal-count bins; ECE: 10 equal-width bins"
                               + (f", 95% bootstrap CI ({n_boot} resamples)" if n_boot > 0 else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    hist.set(xlabel="Predicted probability", ylabel="Cases (20 equal-width bins)")
    hist.grid(alpha=0.3)
    return fig


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
                    title: str | None = None, time_unit: str | None = None) -> Path:
    """Kaplan-Meier curves of the cases split into ``n_groups`` quantile groups of predicted risk
    (tertiles by default) with the numbers at risk under the axes; a useful model separates them,
    highest risk falling fastest.

    Args:
        time, event, risk: (N,) follow-up time, 1 = event / 0 = censored, predicted risk.
        path: PNG to write.
        n_groups: number of risk groups (equal-count quantiles).
        title: axes title.
        time_unit: unit of ``time`` for the axis label ("days", "months"); None: "time".
    """
    return _save(km_figure(time, event, risk, n_groups=n_groups, title=title, time_unit=time_unit), path)


def km_figure(time: Any, event: Any, risk: Any, *, n_groups: int = 3, title: str | None = None,
              time_unit: str | None = None) -> Any:
    """The figure of :func:`plot_km_by_risk`. The at-risk table is the axes labelled ``"at_risk"``:
    one text per group and tick time (the number of the group's cases with time >= the tick)."""
    from matplotlib.ticker import MaxNLocator

    t, e, r = M._prep_surv(time, event, risk)
    if not 1 <= int(n_groups) <= t.size:
        raise MmaiError(f"plot_km_by_risk: n_groups must be in [1, {t.size}], got {n_groups}")
    order = np.argsort(r, kind="mergesort")
    groups = [idx for idx in np.array_split(order, int(n_groups)) if idx.size]
    names = {3: ["low", "middle", "high"], 2: ["low", "high"]}.get(len(groups))
    fig, axes = _figure(2, 1, size=(6.5, 5.6), sharex=True,
                        gridspec_kw={"height_ratios": [4, 0.35 + 0.28 * len(groups)]})
    ax, tab = axes[0, 0], axes[1, 0]
    tab.set_label("at_risk")
    ticks = [float(v) for v in MaxNLocator(nbins=6).tick_values(0.0, float(t.max())) if 0 <= v <= t.max()]
    at_risk = S.numbers_at_risk(t, groups, ticks)
    labels = []
    for g, idx in enumerate(groups):
        name = f"{names[g]} risk" if names else f"group {g + 1}"
        kt, ks = M.kaplan_meier(t[idx], e[idx])
        kt, ks = np.r_[0.0, kt, t[idx].max()], np.r_[1.0, ks, ks[-1]]  # from S(0) = 1 to the last follow-up
        line = ax.step(kt, ks, where="post", lw=2,
                       label=f"{name} (n={idx.size}, events={int(e[idx].sum())}, "
                             f"risk {r[idx].min():.2g}..{r[idx].max():.2g})")[0]
        cens = idx[e[idx] == 0]
        at = ks[np.searchsorted(kt, t[cens], side="right") - 1]  # S(t) at each censoring time
        ax.plot(t[cens], at, "|", ms=6, color=line.get_color())
        row = len(groups) - 1 - g  # first group on top
        for x, n in zip(ticks, at_risk[g], strict=True):
            tab.text(x, row, str(int(n)), ha="center", va="center", fontsize=8, color=line.get_color())
        labels.append((row, name, line.get_color()))
    unit = time_unit or "time"
    ax.set(ylim=(0, 1.02), ylabel="Survival probability",
           title=title or f"Kaplan-Meier by predicted-risk group ({int(n_groups)} quantiles)")
    ax.plot([], [], "|", color="grey", label="censored")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    tab.set(ylim=(-0.6, len(groups) - 0.4), xlim=(-0.04 * float(t.max()), float(t.max()) * 1.02),
            xlabel=f"Time ({unit})" if time_unit else "Time", xticks=ticks)
    tab.set_yticks([row for row, _, _ in labels], [name for _, name, _ in labels], fontsize=8)
    for lab, (_, _, colour) in zip(tab.get_yticklabels(), labels, strict=True):
        lab.set_color(colour)
    tab.set_title("Number at risk", fontsize=8, loc="left")
    tab.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        tab.spines[side].set_visible(False)
    return fig


_HIDDEN = ("world_size", "seconds", "time", "sec")  # bookkeeping, not learning: not plotted


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                         title: str | None = None, best_epoch: int | None = None) -> Path:
    """Per-epoch curves from log rows like {"epoch": 1, "train_loss": .., "val_loss": .., "val_auroc": ..}.

    Every numeric key that exists (other than ``epoch`` and bookkeeping: ``world_size``, durations)
    is plotted, one panel per kind of key: losses ("loss" in the name), learning rates ("lr",
    "learning_rate"; log scale) and the other metrics. Rows without ``epoch`` count 1, 2, ...
    The best epoch (the weights the run kept) is a dashed vertical line on every panel, labelled.

    Args:
        rows: per-epoch dicts (from log.jsonl).
        path: PNG to write.
        title: figure title.
        best_epoch: the epoch whose weights were kept (state.json's ``best_epoch``); None: not marked.
    """
    return _save(training_figure(rows, title=title, best_epoch=best_epoch), path)


def _hidden(key: str) -> bool:
    low = key.lower()
    return low == "world_size" or any(low == h or low.endswith("_" + h) or low.startswith(h + "_")
                                      for h in _HIDDEN) or "seconds" in low


def training_figure(rows: Sequence[Mapping[str, Any]], *, title: str | None = None,
                    best_epoch: int | None = None) -> Any:
    """The figure of :func:`plot_training_curves`; each panel axes is labelled with its kind."""
    from matplotlib.ticker import MaxNLocator

    if not rows:
        raise MmaiError("plot_training_curves: no rows (expected per-epoch dicts like {'epoch': 1, 'train_loss': ..})")
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k != "epoch" and k not in keys and isinstance(v, (int, float, np.number)) \
                    and not isinstance(v, bool) and not _hidden(k):
                keys.append(k)
    if not keys:
        raise MmaiError(f"plot_training_curves: no numeric key in the rows (keys seen: {sorted(rows[0])})")
    panels: dict[str, list[str]] = {"Loss": [], "Learning rate": [], "Metric": []}
    for k in keys:
        low = k.lower()
        kind = ("Loss" if "loss" in low else
                "Learning rate" if low == "lr" or low.endswith("_lr") or "learning_rate" in low else "Metric")
        panels[kind].append(k)
    used = [(ylabel, ks) for ylabel, ks in panels.items() if ks]
    fig, axes = _figure(1, len(used), size=(5.0 * len(used), 4.2))
    for ax, (ylabel, ks) in zip(axes[0], used, strict=True):
        ax.set_label(ylabel)
        for k in ks:
            xs, ys = [], []
            for i, row in enumerate(rows):
                v = row.get(k)
                if isinstance(v, (int, float, np.number)) and np.isfinite(v):
                    xs.append(row.get("epoch", i + 1))
                    ys.append(float(v))
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.5, label=k)
        if best_epoch is not None:
            ax.axvline(best_epoch, ls="--", color="black", lw=1, label=f"best epoch {best_epoch} (weights kept)")
        ax.set(xlabel="Epoch", ylabel=ylabel, yscale="log" if ylabel == "Learning rate" else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
