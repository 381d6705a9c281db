"""mmai.plots: every plot writes a readable PNG atomically; importing mmai leaves matplotlib alone."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from mmai import plots
from mmai.errors import MmaiError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 150)
    pa = np.clip(0.4 * y + 0.6 * rng.random(150), 0, 1)
    pb = rng.random(150)
    risk = rng.normal(size=150)
    t = rng.exponential(np.exp(-risk))
    e = (rng.random(150) < 0.7).astype(int)
    return {"a": (y, pa), "b": (y, pb)}, (t, e, risk)


def _drawn(path) -> int:
    """Coloured pixels of a decoded PNG: the plotted curves/markers (axes, text and background are
    grey), so an empty or blank figure has none."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert rgb.shape[0] >= 150 and rgb.shape[1] >= 150, rgb.shape
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def _only_png(folder, name, min_drawn: int = 200):
    assert [p.name for p in folder.iterdir()] == [name]  # no temp files left behind
    assert (folder / name).read_bytes()[:8] == PNG
    assert _drawn(folder / name) >= min_drawn  # something was plotted, not an empty figure


def test_roc_pr_calibration(tmp_path, data):
    curves, _ = data
    for fn, name, kw in ((plots.plot_roc, "roc.png", {"bayes_auroc": 0.9}), (plots.plot_pr, "pr.png", {}),
                         (plots.plot_calibration, "cal.png", {"n_bins": 8})):
        d = tmp_path / name.split(".")[0]
        assert fn(curves, d / name, **kw) == d / name
        _only_png(d, name)


def test_km_and_pred_vs_true(tmp_path, data):
    _, (t, e, risk) = data
    assert plots.plot_km_by_risk(t, e, risk, tmp_path / "km" / "km.png").exists()
    _only_png(tmp_path / "km", "km.png")
    assert plots.plot_pred_vs_true({"m": (risk, risk + 0.1)}, tmp_path / "reg" / "r.png").exists()
    _only_png(tmp_path / "reg", "r.png")


def test_training_curves_plot_each_numeric_key(tmp_path):
    rows = [{"epoch": 1, "train_loss": 0.9, "val_auroc": 0.6, "lr": 1e-3, "phase": "warmup"},
            {"epoch": 2, "train_loss": 0.7, "val_loss": 0.8, "val_auroc": None, "lr": 1e-3},
            {"epoch": 3, "train_loss": 0.6, "val_loss": 0.7, "val_auroc": 0.7, "seconds": 12.0}]
    out = plots.plot_training_curves(rows, tmp_path / "t" / "train.png", title="run")
    _only_png(out.parent, "train.png")
    one = plots.plot_training_curves([{k: r.get(k) for k in ("epoch", "train_loss")} for r in rows],
                                     tmp_path / "one.png")
    assert _drawn(out) > _drawn(one)  # more numeric keys, more curves drawn
    with pytest.raises(MmaiError, match="no rows"):
        plots.plot_training_curves([], tmp_path / "x.png")
    with pytest.raises(MmaiError, match="no numeric key"):
        plots.plot_training_curves([{"epoch": 1, "note": "x"}], tmp_path / "x.png")


def test_failed_plot_keeps_the_old_file(tmp_path, data):
    curves, _ = data
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    y, p = curves["a"]
    with pytest.raises(MmaiError, match="NaN"):
        plots.plot_roc({"bad": (y, np.r_[np.nan, p[1:]])}, target)
    assert target.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["roc.png"]
    plots.plot_roc(curves, target)
    assert target.read_bytes()[:8] == PNG


def test_importing_mmai_does_not_import_matplotlib():
    code = ("import sys, mmai, mmai.plots, mmai.evaluate, mmai.engine.metrics; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- properties of the figures


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_calibration_bins_hold_equal_counts_with_wilson_intervals(data):
    from mmai.figures.stats import equal_count_bins

    curves, _ = data
    y, p = curves["a"]
    y, p = y[:147], p[:147]
    bins = equal_count_bins(y, p, n_bins=10)
    assert bins["count"].sum() == 147 and np.ptp(bins["count"]) <= 1  # equal-count bins
    assert np.all(np.diff(bins["mean_pred"]) > 0)  # bins follow the predicted probability
    assert np.all((bins["lo"] <= bins["frac_pos"]) & (bins["frac_pos"] <= bins["hi"]))
    assert np.all(bins["hi"] - bins["lo"] > 0.1)  # ~15 cases per bin: wide intervals, not points
    fig = plots.calibration_figure({"a": (y, p)}, n_bins=10, n_boot=50)
    ax = fig.axes[0]
    assert len(ax.containers) == 1 and ax.containers[0].has_yerr  # per-bin error bars
    xs = ax.containers[0].lines[0].get_xdata()
    np.testing.assert_allclose(xs, bins["mean_pred"])
    (label,) = [t for t in _legend_texts(ax) if t.startswith("a (")]
    ece, lo, hi = (float(v) for v in re.search(r"ECE ([\d.]+) \[([\d.]+), ([\d.]+)\]", label).groups())
    assert lo < hi and lo <= ece + 0.05 and "bootstrap CI (50 resamples)" in " ".join(_legend_texts(ax))


@pytest.mark.parametrize("band", ["roc", "pr"])
def test_bootstrap_band_contains_the_curve(data, band):
    from mmai.figures import stats

    curves, _ = data
    y, p = curves["a"]
    fn = stats.roc_band if band == "roc" else stats.pr_band
    grid, point, lo, hi = fn(y, p, n_boot=200, seed=3)
    inside = (lo - 1e-12 <= point) & (point <= hi + 1e-12)
    assert inside.mean() >= 0.95, f"{band}: the curve leaves its band at {np.sum(~inside)} of {grid.size} points"
    assert np.mean(hi - lo) > 0.02  # a band, not the curve itself
    again = fn(y, p, n_boot=200, seed=3)
    np.testing.assert_array_equal(again[2], lo)  # seeded
    figure = plots.roc_figure if band == "roc" else plots.pr_figure
    fig = figure(curves, n_boot=30)
    bands = [c for c in fig.axes[0].collections if c.get_label().startswith("_band")]
    assert len(bands) == len(curves)  # one band per curve
    assert "95% bootstrap band (30 resamples, percentile)" in _legend_texts(fig.axes[0])
    assert not [c for c in figure(curves, n_boot=0).axes[0].collections if c.get_label().startswith("_band")]


def test_km_numbers_at_risk_equal_the_true_counts(data):
    _, (t, e, risk) = data
    fig = plots.km_figure(t, e, risk, n_groups=3, time_unit="months")
    (tab,) = [a for a in fig.axes if a.get_label() == "at_risk"]
    ticks = [float(x) for x in tab.get_xticks()]
    assert len(ticks) >= 3 and ticks[0] == 0.0 and max(ticks) <= t.max()
    groups = np.array_split(np.argsort(risk, kind="mergesort"), 3)
    rows = {row: idx for row, idx in zip((2, 1, 0), groups, strict=True)}  # low risk on top
    seen = 0
    for txt in tab.texts:
        x, row = txt.get_position()
        idx = rows[int(row)]
        assert int(txt.get_text()) == int(np.sum(t[idx] >= x)), (x, row)
        seen += 1
    assert seen == 3 * len(ticks)
    assert tab.get_xlabel() == "Time (months)"
    assert plots.km_figure(t, e, risk).axes[1].get_xlabel() == "Time"


def test_training_curves_drop_bookkeeping_and_mark_the_best_epoch():
    rows = [{"epoch": i, "train_loss": 1 / i, "val_loss": 1 / i + 0.02 * i, "val_auroc": 0.6 + 0.01 * i,
             "lr": 1e-3, "seconds": 3.0, "world_size": 2} for i in range(1, 9)]
    fig = plots.training_figure(rows, best_epoch=5)
    assert sorted(a.get_label() for a in fig.axes) == ["Learning rate", "Loss", "Metric"]
    labels = [ln.get_label() for a in fig.axes for ln in a.lines]
    assert not [lab for lab in labels if lab in ("seconds", "world_size")]
    for ax in fig.axes:
        (best,) = [ln for ln in ax.lines if ln.get_label().startswith("best epoch 5")]
        assert list(best.get_xdata()) == [5, 5]  # a vertical line at the kept epoch
    assert not [ln for a in plots.training_figure(rows).axes for ln in a.lines if "best" in ln.get_label()]
