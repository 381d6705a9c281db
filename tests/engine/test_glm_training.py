"""The GLM base term through ``mmai train`` / ``mmai predict``: fitted on the training rows, saved
with the run, validated as epoch 0 and shipped when training never beats it."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmai.engine.trainer import train_from_files
from mmai.inference.predictor import predict_from_files

CLINICAL = {"numeric": ["age", "crp"], "categorical": ["stage"], "binary": ["smoker"]}


def linear_table(n: int, seed: int) -> pd.DataFrame:
    """A clinical table whose outcome has a LINEAR logit (logistic regression is the right model),
    plus survival columns from a linear log-hazard; ~10 % missing cells."""
    rng = np.random.default_rng(seed)
    age, crp = rng.normal(60, 10, n), rng.lognormal(1, 0.7, n)
    stage, smoker = rng.choice(["I", "II", "III"], n), rng.integers(0, 2, n)
    z = 0.08 * (age - 60) + 0.8 * np.log(crp) - 0.8 + np.select([stage == "II", stage == "III"], [0.7, 1.4], 0.0) \
        + 0.9 * smoker - 1.0
    df = pd.DataFrame({"case_id": [f"c{i:04d}" for i in range(n)], "age": age, "crp": crp, "stage": stage,
                       "smoker": smoker.astype(float),
                       "label": (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)})
    t, c = rng.exponential(np.exp(-z)), rng.exponential(2.0, n)
    df["time"], df["event"] = np.minimum(t, c).round(4) + 1e-3, (t < c).astype(int)
    for col in ("age", "crp", "stage"):
        df.loc[rng.random(n) < 0.1, col] = np.nan
    return df


def write_config(path: Path, kind: str, **train) -> Path:
    task = {"kind": kind, **({"target": "label"} if kind == "binary" else {"time": "time", "event": "event"})}
    doc = {"task": task, "clinical": CLINICAL, "image": None, "model": {"fusion": "clinical_only"},
           "train": {"batch_size": 32, **train}}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("kind", ["binary", "survival"])
def test_glm_is_fitted_saved_and_shipped_when_training_cannot_beat_it(tmp_path, kind, one_thread):
    df = linear_table(240, seed=1)
    df.to_csv(tmp_path / "m.csv", index=False)
    cfg = write_config(tmp_path / "p.yaml", kind, epochs=2, lr=1e-12)  # training cannot move the model
    run = tmp_path / "run"
    summary = train_from_files(cfg, tmp_path / "m.csv", run, device="cpu", progress=False)
    assert summary["best_epoch"] == 0  # the initial model (the GLM) is kept: no later epoch beats it
    state, metrics = json.loads((run / "state.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert state["model_kwargs"]["base"] == "glm"
    glm = metrics["glm"]
    assert glm == {k: v for k, v in state["glm"].items()} | {"initial_validation": glm["initial_validation"]}
    assert glm["model"] == ("logistic" if kind == "binary" else "cox ph (breslow ties)")
    assert glm["n_features"] == 2 + 4 + 1 + 4 and glm["n_train"] == metrics["n_train"] and glm["cv_score"] is not None
    assert glm["initial_validation"]["epoch"] == 0 and "val_loss" in glm["initial_validation"]
    weights = load_file(str(run / "model.safetensors"))
    assert float(weights["glm.weight"].abs().sum()) > 0.1  # fitted coefficients travel with the model
    # what ships is exactly the GLM: predictions = the frozen linear predictor
    from mmai.inference.predictor import Predictor

    pred_path = tmp_path / "pred.csv"
    predict_from_files(run, pred_path, manifest_path=tmp_path / "m.csv", device="cpu", progress=False)
    pred = pd.read_csv(pred_path, dtype={"case_id": str}).set_index("case_id").loc[df["case_id"]]
    p = Predictor(run, device="cpu")
    values, mask = p.pre.transform(df)
    term = p.model.glm
    lin = term(torch.from_numpy(values), torch.from_numpy(mask))[:, 0].numpy()
    got = pred["prob_1"].to_numpy() if kind == "binary" else pred["risk"].to_numpy()
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-lin)) if kind == "binary" else lin, atol=1e-5)


def test_base_none_trains_without_the_glm(tmp_path, one_thread):
    df = linear_table(120, seed=2)
    df.to_csv(tmp_path / "m.csv", index=False)
    cfg = yaml.safe_load(write_config(tmp_path / "p.yaml", "binary", epochs=1).read_text())
    cfg["model"]["base"] = "none"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    summary = train_from_files(tmp_path / "p.yaml", tmp_path / "m.csv", tmp_path / "run", device="cpu",
                               progress=False)
    assert summary["best_epoch"] == 1
    assert "glm" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not [k for k in load_file(str(tmp_path / "run" / "model.safetensors")) if k.startswith("glm.")]


@pytest.mark.slow
def test_clinical_only_reaches_logistic_regression_on_a_linear_logit(tmp_path, one_thread):
    """Defaults only: the trained clinical-only model is within noise of LR on held-out patients."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from mmai.clinical.preprocess import ClinicalPreprocessor
    from mmai.clinical.schema import ClinicalSchema

    df = linear_table(900, seed=3)
    train, test = df.iloc[:500], df.iloc[500:]
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    cfg = write_config(tmp_path / "p.yaml", "binary")
    train_from_files(cfg, tmp_path / "train.csv", tmp_path / "run", device="cpu", progress=False)
    predict_from_files(tmp_path / "run", tmp_path / "pred.csv", manifest_path=tmp_path / "test.csv", device="cpu",
                       progress=False)
    pred = pd.read_csv(tmp_path / "pred.csv", dtype={"case_id": str}).set_index("case_id").loc[test["case_id"]]
    mmai_auc = roc_auc_score(test["label"], pred["prob_1"])
    pre = ClinicalPreprocessor(ClinicalSchema.from_dict(CLINICAL, "test"), scaling="standard").fit(train)
    lr = LogisticRegression(max_iter=5000).fit(pre.transform_onehot(train), train["label"])
    lr_auc = roc_auc_score(test["label"], lr.decision_function(pre.transform_onehot(test)))
    assert mmai_auc >= lr_auc - 0.01, (mmai_auc, lr_auc)
