"""Survival probabilities: the Breslow baseline against lifelines, and surv_<t> through
train -> predict -> evaluate (task.horizons)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from mmai.cli import main
from mmai.engine.survival import breslow_baseline, survival_probability, td_auroc
from mmai.errors import CheckpointError

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _cohort(n: int = 300, seed: int = 0, ties: bool = True):
    rng = np.random.default_rng(seed)
    risk = rng.normal(0, 1, n)
    t_event = rng.exponential(10 * np.exp(-risk))
    t_cens = rng.exponential(15, n)
    time = np.minimum(t_event, t_cens)
    if ties:
        time = np.round(time, 1) + 0.1  # tied times, as in day-level follow-up
    return time, (t_event <= t_cens).astype(float), risk


@pytest.mark.parametrize("ties", [False, True])
def test_breslow_survival_matches_lifelines(ties):
    lifelines = pytest.importorskip("lifelines")
    time, event, risk = _cohort(ties=ties)
    df = pd.DataFrame({"risk": risk, "time": time, "event": event})
    cph = lifelines.CoxPHFitter().fit(df, "time", "event")
    lin = cph.params_["risk"] * risk  # the model's log-risk = lifelines' linear predictor
    horizons = [1.0, 3.0, 7.5, 15.0]
    mine = survival_probability(breslow_baseline(time, event, lin), lin, horizons)
    # lifelines' Breslow baseline survival (a step function at its event times), raised to each
    # case's partial hazard: S(t | x) = S0(t) ** exp((x - mean) beta)
    s0 = cph.baseline_survival_.iloc[:, 0]
    step = s0.to_numpy()[np.searchsorted(s0.index.to_numpy(), horizons, side="right") - 1]
    theirs = step[None, :] ** cph.predict_partial_hazard(df[["risk"]]).to_numpy()[:, None]
    assert np.abs(mine - theirs).max() < 0.02
    assert np.abs(mine - theirs).max() < 1e-9  # in fact the same estimator
    # lifelines' own prediction interpolates the step linearly between event times: still within 0.02
    interp = cph.predict_survival_function(df[["risk"]], times=horizons).T.to_numpy()
    assert np.abs(mine - interp).max() < 0.02


def test_breslow_without_covariates_is_nelson_aalen():
    lifelines = pytest.importorskip("lifelines")
    time, event, _ = _cohort(ties=True)
    base = breslow_baseline(time, event, np.zeros_like(time))
    naf = lifelines.NelsonAalenFitter(nelson_aalen_smoothing=False).fit(time, event)
    t = np.array([0.5, 2.0, 6.0, 12.0])
    want = naf.cumulative_hazard_at_times(t).to_numpy()
    np.testing.assert_allclose(-np.log(survival_probability(base, [0.0], t)[0]), want, atol=1e-9)


def test_horizon_beyond_follow_up_is_refused():
    time, event, risk = _cohort()
    base = breslow_baseline(time, event, risk)
    with pytest.raises(CheckpointError, match="beyond the longest training follow-up"):
        survival_probability(base, risk, [time.max() + 1])


def test_td_auroc_is_undefined_without_cases():
    with pytest.raises(Exception, match="needs cases with an event by t"):
        td_auroc([5.0, 6.0], [1, 1], [0.1, 0.2], t=1.0)


@pytest.mark.slow
def test_survival_run_writes_baseline_and_surv_columns(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "80", "--task", "survival", "--format", "nifti",
                 "--seed", "2", "-q"]) == 0
    cfg = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    man = pd.read_csv(tmp_path / "c" / "manifest.csv")
    h = [float(np.quantile(man["time"], 0.25)), float(np.quantile(man["time"], 0.5))]
    cfg["task"] = {"kind": "survival", "time": "time", "event": "event", "horizons": h}
    cfg["image"] = None
    cfg["model"].update(fusion="clinical_only", dim=16, heads=2)
    cfg["train"].update(epochs=3, batch_size=16, patience=5, lr="1e-3")  # YAML reads 1e-3 as text
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "s.yaml"), "--manifest", str(tmp_path / "c" / "manifest.csv"),
                 "--out", str(tmp_path / "run"), "-q"]) == 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    base = state["survival"]["baseline"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert base["n"] == metrics["n_train"] and state["survival"]["rows"] == "training"
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(tmp_path / "c" / "manifest.csv"),
                 "--out", str(out), "-q"]) == 0
    pred = pd.read_csv(out)
    cols = [f"surv_{t:g}" for t in h]
    assert list(pred.columns) == ["case_id", "risk", *cols, "clinical_present", "input_flags", "model_id"]
    np.testing.assert_allclose(pred[cols].to_numpy(), survival_probability(base, pred["risk"], h), atol=1e-6)
    assert (pred[cols[0]] >= pred[cols[1]]).all() and pred[cols].to_numpy().min() > 0
    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(out), "--manifest", str(tmp_path / "c" / "manifest.csv"),
                 "--out", str(tmp_path / "rep"), "--n-boot", "20", "-q"]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    hz = rep["models"][state["model_id"]]["metrics"]["horizons"]
    assert set(hz) == set(cols) and "calibration_t" in rep["plots"]
