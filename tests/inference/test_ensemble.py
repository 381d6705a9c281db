"""``mmai predict`` on a K-fold run averages its fold models (nnU-Net's default): the ensemble's
probabilities are the mean of the single-fold predictions, its model_id says it is an ensemble,
and ``--no-ensemble`` predicts with the final model alone."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mmai.cli import main
from mmai.engine.runspec import RunSpec
from tests.inference.test_raw_input_predict import N, _cohort, _pipeline


def _predict(run, manifest, out, *extra) -> pd.DataFrame:
    assert main(["predict", "--run", str(run), "--manifest", str(manifest), "--out", str(out), "--device", "cpu",
                 "-q", *extra]) == 0
    return pd.read_csv(out).set_index("case_id").sort_index()


def test_kfold_run_predicts_the_mean_of_its_fold_models(tmp_path):
    manifest = _cohort(tmp_path, "CT")
    pipe = _pipeline(tmp_path, "ct_head")
    assert main(["train", "--config", str(pipe), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                 "--folds", "2", "--device", "cpu", "-q"]) == 0
    spec = RunSpec.load(tmp_path / "run")
    assert spec.is_ensemble and len(spec.members) == 2
    ens = _predict(tmp_path / "run", manifest, tmp_path / "ens.csv", "--explain", str(tmp_path / "ex"))
    folds = [_predict(tmp_path / "run" / "folds" / f"fold{k}", manifest, tmp_path / f"f{k}.csv") for k in range(2)]
    # the ensemble is explained as one model: its id, one map per case, averaged attributions
    import json

    info = json.loads((tmp_path / "ex" / "c0_explain.json").read_text())
    assert info["model_id"] == spec.model_id and "c0_saliency.nii.gz" in info["files"]
    assert [a["feature"] for a in info["attributions"]] == ["age"]
    final = _predict(tmp_path / "run", manifest, tmp_path / "final.csv", "--no-ensemble")
    assert len(ens) == N
    mean = (folds[0]["prob_1"] + folds[1]["prob_1"]) / 2
    np.testing.assert_allclose(ens["prob_1"], mean, atol=1e-6)
    np.testing.assert_allclose(ens["prob_0"] + ens["prob_1"], 1.0, atol=1e-6)
    assert not np.allclose(folds[0]["prob_1"], folds[1]["prob_1"], atol=1e-4)  # two different models
    assert (ens["prediction"] == (ens["prob_1"] > ens["prob_0"]).astype(int)).all()
    assert set(ens["model_id"]) == {spec.model_id} and "-ens2-" in spec.model_id
    assert set(final["model_id"]) == {RunSpec.load(tmp_path / "run", ensemble=False).model_id}
    assert not set(final["model_id"]) & set(ens["model_id"])


def test_kfold_survival_run_averages_log_risk_and_survival_probabilities(tmp_path):
    import yaml

    rng = np.random.default_rng(0)
    n = 60
    age = rng.uniform(30, 80, n)
    t = rng.exponential(np.exp(-(age - 55) / 15)) * 10
    pd.DataFrame({"case_id": [f"s{i}" for i in range(n)], "age": age, "time": np.minimum(t, 12.0),
                  "event": (t < 12.0).astype(int)}).to_csv(tmp_path / "m.csv", index=False)
    cfg = {"task": {"kind": "survival", "horizons": [2.0, 5.0]}, "image": None,
           "clinical": {"numeric": [{"name": "age", "range": [0, 120]}]},
           "model": {"fusion": "clinical_only", "dim": 16, "heads": 2},
           "train": {"epochs": 3, "batch_size": 16, "folds": 2}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "p.yaml"), "--manifest", str(tmp_path / "m.csv"),
                 "--out", str(tmp_path / "run"), "--device", "cpu", "-q"]) == 0
    ens = _predict(tmp_path / "run", tmp_path / "m.csv", tmp_path / "ens.csv")
    folds = [_predict(tmp_path / "run" / "folds" / f"fold{k}", tmp_path / "m.csv", tmp_path / f"f{k}.csv")
             for k in range(2)]
    assert list(ens.columns[:3]) == ["risk", "surv_2", "surv_5"]
    for col in ("risk", "surv_2", "surv_5"):
        np.testing.assert_allclose(ens[col], (folds[0][col] + folds[1][col]) / 2, atol=1e-6)
    assert not np.allclose(folds[0]["surv_5"], folds[1]["surv_5"], atol=1e-4)
    assert (ens["surv_5"] <= ens["surv_2"] + 1e-9).all()  # still a survival curve


def test_an_unfinished_kfold_run_is_not_silently_a_smaller_ensemble(tmp_path):
    import shutil

    import pytest

    from mmai.errors import CheckpointError

    manifest = _cohort(tmp_path, "CT")
    pipe = _pipeline(tmp_path, "ct_head")
    assert main(["train", "--config", str(pipe), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
                 "--folds", "2", "--epochs", "1", "--device", "cpu", "-q"]) == 0
    (tmp_path / "run" / "folds" / "fold1" / "DONE").unlink()  # as if fold1 were still training
    with pytest.raises(CheckpointError, match="1 of 2 cross-validation fold models are finished"):
        RunSpec.load(tmp_path / "run")
    assert not RunSpec.load(tmp_path / "run", ensemble=False).is_ensemble
    shutil.rmtree(tmp_path / "run" / "folds" / "fold1")
    with pytest.raises(CheckpointError, match="1 of 2"):
        RunSpec.load(tmp_path / "run")
