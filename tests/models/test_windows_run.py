"""A windowed, bidirectional cross-attention model through the CLI: train -> predict -> explain.

Checks the wiring outside the model: the config keys reach the model (state.json model_kwargs),
the predictor rebuilds the same model and passes the affine, and explain writes maps with the
input's geometry from the windows.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from mmai.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_windowed_model_trains_predicts_and_explains(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "cohort"), "--n", "24", "--seed", "2", "--format", "nifti",
                 "-q"]) == 0
    cfg = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    cfg["image"].update(spacing=[10.0, 10.0, 10.0], size=None, size_multiple=8)  # whole volume, any size
    cfg["image"].pop("augment", None)  # translate needs a fixed grid
    cfg["model"].update(widths=[4, 8, 8, 16], dim=16, heads=2, bidirectional=True,
                        windows={"roi_size": [16, 16, 16], "overlap": 0.25, "batch": 4, "train_windows": 3,
                                 "checkpoint": True})
    cfg["train"].update(epochs=1, batch_size=8, ema=0.0)
    pipe = tmp_path / "win.yaml"
    pipe.write_text(yaml.safe_dump(cfg))
    manifest = tmp_path / "cohort" / "manifest.csv"
    assert main(["train", "--config", str(pipe), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                 "-q"]) == 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["model_kwargs"]["windows"]["roi_size"] == [16, 16, 16]
    assert state["model_kwargs"]["bidirectional"] is True
    out = tmp_path / "explain"
    assert main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(manifest), "--out",
                 str(tmp_path / "p.csv"), "--explain", str(out), "--shard", "0/8", "-q"]) == 0
    pred = pd.read_csv(tmp_path / "p.csv")
    assert len(pred) == 3 and pred["prob_1"].between(0, 1).all()  # shard 0 of 8
    m = pd.read_csv(manifest)
    case = str(pd.read_csv(out / "clinical_attributions.csv")["case_id"].iloc[0])
    src = nib.load(manifest.parent / m.loc[m["case_id"].astype(str) == case, "image"].iloc[0])
    for kind in ("saliency", "attention"):
        img = nib.load(out / f"{case}_{kind}.nii.gz")
        assert img.shape == src.shape[:3]
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
