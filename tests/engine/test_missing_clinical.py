"""The demo cohort's clinical table with 30% of cells missing at random still trains a useful model."""

from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from mmai.config import config_from_dict
from mmai.engine.trainer import train
from mmai.inference.predictor import Predictor
from mmai.io.manifest import validate_manifest
from mmai.synth import SynthSpec, sample_cohort

ROOT = Path(__file__).resolve().parents[2]


def test_thirty_percent_missing_still_learns(tmp_path):
    raw = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    raw["image"] = None
    raw["train"].update(epochs=15, patience=15)
    cfg = config_from_dict(raw, "demo.yaml (clinical only)")
    cohort = sample_cohort(SynthSpec(n=800, seed=5, missing_rate=0.30)).drop(columns=["true_probability"])
    clinical = ["age", "sex", "smoking", "diabetes", "crp", "bmi"]
    assert 0.27 < cohort[clinical].isna().to_numpy().mean() < 0.33
    df = validate_manifest(cohort.astype({c: object for c in clinical}), cfg, base_dir=tmp_path, source="cohort")
    from dataclasses import replace

    cfg = cfg.replace(model=replace(cfg.model, fusion="clinical_only"))
    metrics = train(cfg, df, tmp_path / "run", device="cpu", progress=False)
    test = df[df["split"] == "test"].reset_index(drop=True)
    pred, errors = Predictor(tmp_path / "run").predict_frame(test)
    assert not errors
    auroc = roc_auc_score(test["label"].astype(int), pred["prob_1"])
    # clinical-only optimum on complete data is about 0.75; 30% missing costs some of it
    assert auroc > 0.62, auroc
    assert np.isclose(metrics["test"]["auroc"], auroc, atol=1e-6)
