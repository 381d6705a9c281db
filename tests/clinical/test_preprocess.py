"""Leak-free clinical preprocessing: sklearn-equal statistics, no leakage, JSON state, masks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import SimpleImputer
from sklearn.preprocessing import RobustScaler, StandardScaler

from mmai.clinical.preprocess import ClinicalPreprocessor, FeatureSpec
from mmai.clinical.schema import ClinicalSchema
from mmai.errors import CheckpointError, ClinicalError, ConfigError

SECTION = {
    "numeric": ["age", {"name": "crp", "log": True, "range": [0, 500]}],
    "categorical": ["site", {"name": "smoking", "levels": ["never", "former", "current"]}],
    "binary": ["diabetes"],
    "ordinal": {"grade": ["I", "II", "III"]},
}


def cohort(n: int = 80, seed: int = 0, missing: float = 0.2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "case_id": [f"c{i}" for i in range(n)],
        "age": rng.normal(60, 12, n).round(1),
        "crp": np.exp(rng.normal(1, 1.2, n)).round(2),
        "site": rng.choice(["A", "B", "C"], n),
        "smoking": rng.choice(["never", "former", "current"], n),
        "diabetes": rng.choice(["yes", "no"], n),
        "grade": rng.choice(["I", "II", "III"], n),
    }).astype(object)
    for col in df.columns[1:]:
        df.loc[rng.random(n) < missing, col] = None
    return df


def schema() -> ClinicalSchema:
    return ClinicalSchema.from_dict(SECTION, "pipe.yaml")


def raw_numeric(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col]).to_numpy(dtype=float)


@pytest.mark.parametrize("scaling, impute", [("robust", "median"), ("standard", "mean"),
                                              ("robust", "mean"), ("standard", "median")])
def test_statistics_equal_sklearn_on_the_training_rows(scaling, impute):
    df = cohort()
    train = df.iloc[:60]
    pre = ClinicalPreprocessor(schema(), scaling=scaling, impute=impute).fit(train)
    stats = {s["name"]: s for s in pre.statistics}
    ranks = train["grade"].map({"I": 0.0, "II": 1.0, "III": 2.0}).to_numpy(dtype=float)
    for name, x in [("age", raw_numeric(train, "age")), ("crp", np.log1p(raw_numeric(train, "crp"))),
                    ("grade", ranks)]:
        imp = SimpleImputer(strategy=impute).fit(x[:, None])
        sc = (RobustScaler() if scaling == "robust" else StandardScaler()).fit(x[:, None])
        center = sc.center_[0] if scaling == "robust" else sc.mean_[0]
        assert stats[name]["fill"] == pytest.approx(imp.statistics_[0], rel=1e-12)
        assert stats[name]["center"] == pytest.approx(center, rel=1e-12)
        assert stats[name]["scale"] == pytest.approx(sc.scale_[0], rel=1e-12)
        # and the transform of the training rows equals sklearn's impute -> scale
        values, mask = pre.transform(train)
        f = pre.feature_names.index(name)
        expected = (imp.transform(x[:, None])[:, 0] - center) / sc.scale_[0]
        np.testing.assert_allclose(values[:, f], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(mask[:, f], ~np.isnan(x))
    dm = train["diabetes"].map({"yes": 1.0, "no": 0.0}).to_numpy(dtype=float)
    assert stats["diabetes"]["fill"] == pytest.approx(np.nanmean(dm))
    assert stats["site"]["vocabulary"] == ["A", "B", "C"]
    assert stats["smoking"]["vocabulary"] == ["never", "former", "current"]  # declared order kept


def test_no_leakage_test_fold_rows_change_no_statistic_and_no_other_prediction():
    df = cohort(n=100)
    train_idx, test_idx = np.arange(0, 70), np.arange(70, 100)
    pre = ClinicalPreprocessor(schema()).fit(df.iloc[train_idx])
    state = json.dumps(pre.to_state(), sort_keys=True)
    values, mask = pre.transform(df.iloc[test_idx])

    # rewrite every test-fold row with extreme / new values: the fold's fit is unchanged ...
    changed = df.copy()
    changed.loc[test_idx, "age"] = 500.0
    changed.loc[test_idx, "crp"] = 499.0
    changed.loc[test_idx, "site"] = "Z"
    changed.loc[test_idx, "diabetes"] = "yes"
    refit = ClinicalPreprocessor(schema()).fit(changed.iloc[train_idx])
    assert json.dumps(refit.to_state(), sort_keys=True) == state

    # ... and changing one test row changes no other row's transform
    one = df.iloc[test_idx].copy()
    one.iloc[3, 1:] = [1.0, 0.0, "Q", "current", "no", "III"]
    v2, m2 = pre.transform(one)
    others = np.arange(len(test_idx)) != 3
    np.testing.assert_array_equal(v2[others], values[others])
    np.testing.assert_array_equal(m2[others], mask[others])
    assert not np.array_equal(v2[3], values[3])

    # a row transformed alone equals the same row inside the batch
    for i in (0, 7, 29):
        v1, m1 = pre.transform(df.iloc[test_idx].iloc[[i]])
        np.testing.assert_array_equal(v1[0], values[i])
        np.testing.assert_array_equal(m1[0], mask[i])


def test_categorical_indices_unknown_bucket_and_missing():
    pre = ClinicalPreprocessor(schema()).fit(cohort())
    f_site = pre.feature_names.index("site")
    f_smk = pre.feature_names.index("smoking")
    df = cohort(n=4, missing=0.0)
    df["site"] = ["A", "C", "never-seen", None]
    df["smoking"] = ["current", "never", "other", ""]
    values, mask = pre.transform(df)
    assert list(values[:, f_site]) == [1.0, 3.0, 0.0, 0.0]
    assert list(mask[:, f_site]) == [1.0, 1.0, 1.0, 0.0]        # unknown is observed; missing is not
    assert list(values[:, f_smk]) == [3.0, 1.0, 0.0, 0.0]
    assert list(mask[:, f_smk]) == [1.0, 1.0, 1.0, 0.0]
    specs = pre.feature_specs
    assert specs[f_site] == FeatureSpec("site", "categorical", 4)
    assert specs[pre.feature_names.index("age")] == FeatureSpec("age", "numeric", 0)


def test_min_frequency_sends_rare_levels_to_unknown():
    df = cohort(n=50, missing=0.0)
    df["site"] = ["A"] * 30 + ["B"] * 18 + ["rare"] * 2
    pre = ClinicalPreprocessor(schema(), min_frequency=3).fit(df)
    assert {s["name"]: s for s in pre.statistics}["site"]["vocabulary"] == ["A", "B"]
    values, _ = pre.transform(df.iloc[[0, 30, 49]])
    assert list(values[:, pre.feature_names.index("site")]) == [1.0, 2.0, 0.0]


def test_missing_value_differs_from_imputed_value_only_through_the_mask():
    pre = ClinicalPreprocessor(schema()).fit(cohort())
    stats = {s["name"]: s for s in pre.statistics}
    row = cohort(n=1, seed=5, missing=0.0)
    missing = row.copy()
    missing["age"] = ""                      # empty cell: missing, never zero
    imputed = row.copy()
    imputed["age"] = stats["age"]["fill"]    # the imputed number written in
    v_miss, m_miss = pre.transform(missing)
    v_imp, m_imp = pre.transform(imputed)
    f = pre.feature_names.index("age")
    np.testing.assert_allclose(v_miss, v_imp, atol=1e-6)
    assert m_miss[0, f] == 0.0 and m_imp[0, f] == 1.0
    assert np.array_equal(np.delete(m_miss, f, 1), np.delete(m_imp, f, 1))


def test_state_is_plain_json_and_reloads_without_refitting(tmp_path):
    train = cohort(seed=1)
    pre = ClinicalPreprocessor(schema(), scaling="standard", impute="mean").fit(train)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(pre.to_state()))
    loaded = ClinicalPreprocessor.from_state(json.loads(path.read_text()))
    new = cohort(n=30, seed=2)
    for a, b in zip(pre.transform(new), loaded.transform(new), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pre.transform_onehot(new), loaded.transform_onehot(new))
    assert loaded.feature_specs == pre.feature_specs and loaded.to_state() == pre.to_state()


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s.pop("features"), "lacks ['features']"),
    (lambda s: s.update(version=99), "version 99"),
    (lambda s: s["features"].pop(), "do not match the schema"),
    (lambda s: s["features"][0].pop("scale"), "'age' state lacks ['scale']"),
    (lambda s: s.update(scaling="minmax"), "'minmax' is not allowed"),
    (lambda s: s["schema"].update(numerc=["x"]), "unknown key 'clinical.numerc'"),
])
def test_bad_state_is_a_checkpoint_error(mutate, needle):
    state = ClinicalPreprocessor(schema()).fit(cohort()).to_state()
    mutate(state)
    with pytest.raises(CheckpointError, match="state.json") as err:
        ClinicalPreprocessor.from_state(state)
    assert needle in str(err.value)


def test_bad_input_messages():
    with pytest.raises(ConfigError, match=r"scaling 'minmax' is not allowed; choose one of \['robust', 'standard'\]"):
        ClinicalPreprocessor(schema(), scaling="minmax")
    with pytest.raises(ConfigError, match=r"impute 'mode' is not allowed"):
        ClinicalPreprocessor(schema(), impute="mode")
    with pytest.raises(CheckpointError, match="not fitted"):
        ClinicalPreprocessor(schema()).transform(cohort())
    pre = ClinicalPreprocessor(schema()).fit(cohort())
    bad = cohort(n=3)
    bad["crp"] = [1.0, 900.0, "high"]
    with pytest.raises(ClinicalError) as err:
        pre.transform(bad, source="predict.csv")
    msg = str(err.value)
    assert "predict.csv" in msg and "case_id 'c1', column 'crp': 900.0 is outside" in msg
    assert "case_id 'c2', column 'crp': 'high' is not a number" in msg
    with pytest.raises(ClinicalError, match=r"\['grade'\] declared .* not in the table"):
        pre.transform(cohort().drop(columns=["grade"]))


def test_column_empty_in_training_is_handled():
    train = cohort()
    train["age"] = None
    pre = ClinicalPreprocessor(schema()).fit(train)
    values, mask = pre.transform(cohort(n=5, seed=3, missing=0.0))
    f = pre.feature_names.index("age")
    assert np.isfinite(values).all() and mask[:, f].all()


def test_onehot_matrix():
    pre = ClinicalPreprocessor(schema()).fit(cohort())
    x = pre.transform_onehot(cohort(n=10, seed=4))
    names = pre.onehot_names
    assert x.shape == (10, len(names)) and x.dtype == np.float32 and np.isfinite(x).all()
    assert "site=<unknown>" in names and "age__missing" in names
    site = [i for i, n in enumerate(names) if n.startswith("site=")]
    assert set(x[:, site].sum(1)) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- end to end (mmai train / predict)


def _e2e_files(tmp_path, df: pd.DataFrame, name: str):
    import yaml

    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": {"kind": "binary", "target": "label"},
        "clinical": {"numeric": ["age", {"name": "crp", "log": True, "range": [0, 500]}],
                     "categorical": ["site"], "binary": ["diabetes"]},
        "image": None,
        "model": {"fusion": "clinical_only", "dim": 16, "heads": 2},
        "train": {"epochs": 2, "batch_size": 64, "patience": 5},
    }))
    manifest = tmp_path / f"{name}.csv"
    df.to_csv(manifest, index=False)
    return cfg, manifest


def _e2e_cohort(n: int = 90) -> pd.DataFrame:
    df = cohort(n=n, seed=11)[["case_id", "age", "crp", "site", "diabetes"]].copy()
    df["label"] = (np.arange(n) % 2).astype(int)
    df["split"] = np.where(np.arange(n) >= n - 20, "test", "train")
    return df


def test_end_to_end_no_leakage_and_row_independent_predictions(tmp_path):
    """mmai train: changing test-split rows changes no fitted clinical statistic (state.json).
    mmai predict: a row's prediction is the same alone or in a batch; a missing cell and the
    imputed number written in give different predictions (the mask is seen)."""
    trainer = pytest.importorskip("mmai.engine.trainer")
    predictor = pytest.importorskip("mmai.inference.predictor")
    df = _e2e_cohort()
    cfg, manifest = _e2e_files(tmp_path, df, "a")
    trainer.train_from_files(cfg, manifest, tmp_path / "run_a", fusion="clinical_only", device="cpu", progress=False)
    changed = df.copy()
    test_rows = changed["split"] == "test"
    changed.loc[test_rows, "age"] = 500.0
    changed.loc[test_rows, "crp"] = 499.0
    changed.loc[test_rows, "site"] = "never-seen"
    _, manifest_b = _e2e_files(tmp_path, changed, "b")
    trainer.train_from_files(cfg, manifest_b, tmp_path / "run_b", fusion="clinical_only", device="cpu", progress=False)
    state_a = json.loads((tmp_path / "run_a" / "state.json").read_text())["clinical"]
    state_b = json.loads((tmp_path / "run_b" / "state.json").read_text())["clinical"]
    assert state_a == state_b
    pre = ClinicalPreprocessor.from_state(state_a)
    fill = {s["name"]: s for s in pre.statistics}["age"]["fill"]

    rows = df.iloc[:4].drop(columns=["label", "split"]).copy()
    rows["case_id"] = ["missing", "imputed", "other", "other2"]
    rows.loc[0, "age"] = None
    rows.loc[1, "age"] = fill
    rows.loc[1, ["crp", "site", "diabetes"]] = rows.loc[0, ["crp", "site", "diabetes"]].to_numpy()
    batch_csv, out = tmp_path / "predict.csv", tmp_path / "pred_all.csv"
    rows.to_csv(batch_csv, index=False)
    predictor.predict_from_files(tmp_path / "run_a", out, manifest_path=batch_csv, device="cpu", progress=False)
    together = pd.read_csv(out).set_index("case_id")
    for i, cid in enumerate(rows["case_id"]):
        alone_csv, alone_out = tmp_path / f"one{i}.csv", tmp_path / f"pred{i}.csv"
        rows.iloc[[i]].to_csv(alone_csv, index=False)
        predictor.predict_from_files(tmp_path / "run_a", alone_out, manifest_path=alone_csv, device="cpu",
                                     progress=False)
        alone = pd.read_csv(alone_out).set_index("case_id")
        np.testing.assert_allclose(alone.loc[cid, "prob_1"], together.loc[cid, "prob_1"], rtol=1e-6, atol=1e-7)
    assert together.loc["missing", "prob_1"] != together.loc["imputed", "prob_1"]
