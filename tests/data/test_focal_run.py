"""The focal-object inventory as model inputs: which runs take it, state.json, image_only's GLM
base term on it, and predict recomputing it from the images (raw NIfTI of `mmai synth --kind semireal`)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from mmai.config import config_from_dict
from mmai.data.descriptors import descriptor_names
from mmai.transforms.focal import FOCAL_INPUTS

PIPELINE = {
    "task": {"kind": "survival", "time": "time", "event": "event"},
    "clinical": {"numeric": [{"name": "age", "range": [0, 120]}],
                 "categorical": [{"name": "tgrade", "levels": ["I", "II", "III"]}]},
    "image": {"column": "image", "modality": "CT", "spacing": [4.0, 4.0, 4.0], "size": [48, 48, 36],
              "intensity": {"kind": "window", "a_min": -160, "a_max": 240, "b_min": 0.0, "b_max": 1.0}},
    "model": {"encoder": "resnet", "widths": [4, 4, 8, 8], "dim": 16, "heads": 2, "fusion": "image_only"},
    "train": {"epochs": 1, "batch_size": 4, "seed": 0, "val_fraction": 0.25},
}


def _cfg(**model):
    raw = json.loads(json.dumps(PIPELINE))
    raw["model"].update(model)
    return config_from_dict(raw, source="focal.yaml")


def test_switch():
    cfg = _cfg()
    assert descriptor_names(cfg) == FOCAL_INPUTS
    assert descriptor_names(_cfg(fusion="cross_attention")) == FOCAL_INPUTS
    assert descriptor_names(_cfg(fusion="clinical_only")) == ()
    off = cfg.replace(image=dataclasses.replace(cfg.image, descriptors=False))
    assert descriptor_names(off) == ()
    coarse = cfg.replace(image=dataclasses.replace(cfg.image, spacing=(6.0, 6.0, 6.0), size=(32, 32, 24)))
    assert descriptor_names(coarse) == ()  # a grid too coarse for 5-15 mm objects


@pytest.fixture(scope="module")
def semireal_run(tmp_path_factory):
    from mmai.engine.run import train
    from mmai.io.manifest import validate_manifest
    from mmai.synth_semireal import write_semireal_cohort

    root = tmp_path_factory.mktemp("focal")
    write_semireal_cohort(root / "cohort", n=16, progress=False)
    m = pd.read_csv(root / "cohort" / "manifest.csv")
    cfg = _cfg()
    df = validate_manifest(m.assign(split=None), cfg, base_dir=root / "cohort", source="manifest")
    metrics = train(cfg, df, root / "run", device="cpu", progress=False)
    return root, df, metrics


@pytest.mark.slow
def test_image_only_is_a_glm_on_the_inventory_plus_the_cnn(semireal_run):
    from mmai.inference.predictor import Predictor

    root, df, metrics = semireal_run
    state = json.loads((root / "run" / "state.json").read_text())
    assert state["descriptors"]["kind"] == "focal" and state["descriptors"]["names"] == list(FOCAL_INPUTS)
    assert state["model_kwargs"]["image_features"] is True
    assert [f["name"] for f in state["clinical"]["features"]] == list(FOCAL_INPUTS)  # no clinical column
    assert metrics["glm"]["n_features"] >= len(FOCAL_INPUTS)
    pred, errors = Predictor(root / "run").predict_frame(df)
    assert not errors and np.isfinite(pred["risk"]).all()
    # predict measures the images itself: a table carrying wrong focal_* values changes nothing
    pred2, _ = Predictor(root / "run").predict_frame(df.assign(focal_count=99.0, focal_largest_diameter_mm=-1.0))
    assert np.allclose(pred["risk"], pred2["risk"])
    # and the inventory matters: a blank image (no objects) changes the GLM's risk
    predictor = Predictor(root / "run")
    assert predictor.model.glm is not None and float(predictor.model.glm.weight.abs().sum()) > 0
