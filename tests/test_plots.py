"""mmai.plots: every plot writes a readable PNG atomically; importing mmai leaves matplotlib alone."""

from __future__ import annotations

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
