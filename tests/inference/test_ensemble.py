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
    ens = _predict(tmp_path / "run", manifest, tmp_path / "ens.csv")
    folds = [_predict(tmp_path / "run" / "folds" / f"fold{k}", manifest, tmp_path / f"f{k}.csv") for k in range(2)]
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
