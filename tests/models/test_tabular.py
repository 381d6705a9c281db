"""Clinical encoders: token shapes, the missing-value property, and learning with 30% missing cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmai.clinical.preprocess import ClinicalPreprocessor, FeatureSpec
from mmai.clinical.schema import ClinicalSchema
from mmai.errors import ConfigError
from mmai.models.tabular import ClinicalMLP, ClinicalTransformer, FeatureTokenizer, build_clinical_encoder

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("site", "categorical", 4),
         FeatureSpec("bmi", "numeric"), FeatureSpec("stage", "categorical", 3)]


def batch(b: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.stack([torch.randn(b, generator=g), torch.randint(0, 4, (b,), generator=g).float(),
                          torch.randn(b, generator=g), torch.randint(0, 3, (b,), generator=g).float()], 1)
    mask = (torch.rand(b, 4, generator=g) > 0.3).float()
    return values, mask


def test_tokenizer_shapes_and_formula():
    torch.manual_seed(0)
    tok = FeatureTokenizer(SPECS, dim=8)
    assert tok.num_tokens == 4 and tok.dim == 8
    values, _ = batch()
    ones = torch.ones_like(values)
    out = tok(values, ones)
    assert out.shape == (6, 4, 8)
    # numeric token = value * w_f + b_f (feature order kept)
    torch.testing.assert_close(out[:, 2], values[:, 2:3] * tok.num_weight[1] + tok.num_bias[1])
    # categorical token = embedding lookup (+ per-feature bias)
    idx = values[:, 1].long()
    torch.testing.assert_close(out[:, 1], tok.cat_embed.weight[idx] + tok.cat_bias[0])


def test_tokenizer_missing_token_and_only_through_the_mask():
    torch.manual_seed(0)
    tok = FeatureTokenizer(SPECS, dim=8)
    values, mask = batch()
    mask[0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    out = tok(values, mask)
    torch.testing.assert_close(out[0, 0], tok.missing[0])
    torch.testing.assert_close(out[0, 1], tok.missing[1])
    # any number (even NaN / out-of-range index) under mask == 0 gives identical tokens
    scrambled = values.clone()
    scrambled[mask == 0] = torch.tensor(float("nan"))
    torch.testing.assert_close(tok(scrambled, mask), out)
    scrambled[mask == 0] = 1e6
    torch.testing.assert_close(tok(scrambled, mask), out)
    # and gradients stay finite with NaN under the mask
    scrambled[mask == 0] = float("nan")
    tok(scrambled, mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.grad is not None)


def test_out_of_range_category_goes_to_unknown_bucket():
    tok = FeatureTokenizer(SPECS, dim=4)
    values = torch.tensor([[0.0, 9.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]])
    out = tok(values, torch.ones_like(values))
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("make", [lambda: ClinicalMLP(SPECS, 16, hidden=32, depth=2, dropout=0.0),
                                  lambda: ClinicalTransformer(SPECS, 16, heads=4, layers=1, dropout=0.0)])
def test_encoders_depend_on_a_missing_value_only_through_the_mask(make):
    torch.manual_seed(0)
    model = make().eval()
    assert model.dim == 16
    values, mask = batch(b=5)
    out = model(values, mask)
    assert out.shape == (5, 16)
    other = values.clone()
    other[mask == 0] = torch.randn(int((mask == 0).sum()))
    torch.testing.assert_close(model(other, mask), out)
    flipped = mask.clone()
    flipped[0, 0] = 1 - flipped[0, 0]
    assert not torch.allclose(model(values, flipped)[0], out[0])


def test_constructor_errors():
    with pytest.raises(ConfigError, match="at least one clinical feature"):
        FeatureTokenizer([], 8)
    with pytest.raises(ConfigError, match=r"kind 'text'; allowed: \['numeric', 'categorical'\]"):
        FeatureTokenizer([FeatureSpec("x", "text")], 8)
    with pytest.raises(ConfigError, match="cardinality >= 1"):
        FeatureTokenizer([FeatureSpec("x", "categorical", 0)], 8)
    with pytest.raises(ConfigError, match="divisible"):
        ClinicalTransformer(SPECS, 10, heads=4)
    with pytest.raises(ConfigError, match="dropout"):
        ClinicalMLP(SPECS, 8, dropout=1.5)
    with pytest.raises(ConfigError, match="layers >= 1"):
        ClinicalTransformer(SPECS, 8, heads=2, layers=0)
    with pytest.raises(ConfigError, match=r"clinical_encoder = 'gbm' is not allowed; choose one of \['tokens', 'mlp'\]"):
        build_clinical_encoder("gbm", SPECS, 8)


def test_clinical_only_model_is_the_clinical_transformer():
    """One implementation: the clinical-only model's encoder is build_clinical_encoder's (a
    ClinicalTransformer for ``tokens``, a ClinicalMLP for ``mlp``), and its output is that
    encoder's output through its head."""
    from mmai.models.registry import create_model

    for kind, cls in (("tokens", ClinicalTransformer), ("mlp", ClinicalMLP)):
        assert isinstance(build_clinical_encoder(kind, SPECS, 8, heads=2), cls)
        model = create_model("clinical_only", n_outputs=1, feature_specs=SPECS, dim=8, heads=2,
                             clinical_encoder=kind).eval()
        assert isinstance(model.clinical, cls)
        values, mask = batch()
        torch.testing.assert_close(model(None, torch.ones(6), values, mask), model.head(model.clinical(values, mask)))


def test_end_to_end_missing_vs_imputed_row_differs_only_through_the_mask():
    """Table row with a value missing vs the same row with the imputed number: same values,
    different mask; the model output equals the missing-token output, not the imputed one."""
    schema = ClinicalSchema.from_dict({"numeric": ["age", "bmi"], "categorical": ["site"]}, "p.yaml")
    rng = np.random.default_rng(0)
    train = pd.DataFrame({"case_id": [f"c{i}" for i in range(40)], "age": rng.normal(60, 10, 40),
                          "bmi": rng.normal(27, 4, 40), "site": rng.choice(["A", "B"], 40)})
    pre = ClinicalPreprocessor(schema).fit(train)
    fill = {s["name"]: s for s in pre.statistics}["age"]["fill"]
    rows = pd.DataFrame({"case_id": ["m", "i"], "age": [None, fill], "bmi": [30.0, 30.0], "site": ["B", "B"]})
    values, mask = pre.transform(rows)
    np.testing.assert_allclose(values[0], values[1], atol=1e-6)
    assert mask[0].tolist() == [0.0, 1.0, 1.0] and mask[1].tolist() == [1.0, 1.0, 1.0]
    torch.manual_seed(0)
    model = ClinicalMLP(pre.feature_specs, 8, dropout=0.0).eval()
    v, m = torch.from_numpy(values), torch.from_numpy(mask)
    out = model(v, m)
    assert not torch.allclose(out[0], out[1])                        # the mask is seen ...
    v_other = v.clone()
    v_other[0, 0] = 123.0
    torch.testing.assert_close(model(v_other, m)[0], out[0])         # ... the missing number is not
    torch.testing.assert_close(model(v[1:], m[:1])[0], out[0])       # mask alone decides the difference


def test_learns_with_30_percent_of_cells_missing_at_random():
    """Binary outcome from 3 numerics + 1 categorical; 30% of cells blanked (MCAR).
    ClinicalMLP + a linear head, trained on 1500 rows, must reach held-out AUROC > 0.75 (chance
    0.5; 0.85 with no cell missing) and come within 0.03 of logistic regression on the same
    imputed + indicator features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 2000
    x = rng.normal(size=(n, 3))
    site = rng.choice(["A", "B", "C"], n)
    logit = 1.5 * x[:, 0] - 1.2 * x[:, 1] + 0.8 * x[:, 2] + np.where(site == "C", 1.5, 0.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    df = pd.DataFrame({"case_id": np.arange(n).astype(str), "a": x[:, 0], "b": x[:, 1], "c": x[:, 2],
                       "site": site}).astype(object)
    cells = df[["a", "b", "c", "site"]]
    df[["a", "b", "c", "site"]] = cells.mask(rng.random(cells.shape) < 0.3)
    schema = ClinicalSchema.from_dict({"numeric": ["a", "b", "c"], "categorical": ["site"]}, "p.yaml")
    train, test = df.iloc[:1500], df.iloc[1500:]
    pre = ClinicalPreprocessor(schema).fit(train)
    (vt, mt), (vs, ms) = pre.transform(train), pre.transform(test)
    assert 0.25 < 1 - mt.mean() < 0.35
    torch.manual_seed(0)
    enc = ClinicalMLP(pre.feature_specs, 16, hidden=32, depth=1, dropout=0.1)
    head = torch.nn.Linear(16, 1)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-4)
    vt_t, mt_t, y_t = torch.from_numpy(vt), torch.from_numpy(mt), torch.from_numpy(y[:1500])
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(enc(vt_t, mt_t))[:, 0], y_t)
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        score = head(enc(torch.from_numpy(vs), torch.from_numpy(ms)))[:, 0].numpy()
    auc = roc_auc_score(y[1500:], score)
    onehot = pre.transform_onehot(df)
    lr = LogisticRegression(max_iter=1000).fit(onehot[:1500], y[:1500])
    lr_auc = roc_auc_score(y[1500:], lr.decision_function(onehot[1500:]))
    assert auc > 0.75 and auc > lr_auc - 0.03, (auc, lr_auc)


@pytest.mark.parametrize("kind, encoder", [("binary", "tokens"), ("multiclass", "mlp"), ("regression", "tokens"),
                                           ("survival", "mlp"), ("survival", "tokens")])
def test_clinical_only_is_trained_by_mmai_train_for_every_task(tmp_path, kind, encoder):
    """`mmai train --fusion clinical_only` (no image section) then `mmai predict`, for each task kind
    and both clinical encoders (model.clinical_encoder tokens | mlp); predictions carry the contract's columns and are finite."""
    import yaml

    trainer = pytest.importorskip("mmai.engine.trainer")
    predictor = pytest.importorskip("mmai.inference.predictor")
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=n)
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "age": (60 + 10 * x).round(1),
                       "site": rng.choice(["A", "B", ""], n), "dm": rng.choice(["yes", "no", ""], n),
                       "split": np.where(np.arange(n) >= 50, "test", "train")})
    task: dict = {"kind": kind}
    if kind == "binary":
        df["label"] = (x > 0).astype(int)
    elif kind == "multiclass":
        df["label"] = np.digitize(x, [-0.5, 0.5])
    elif kind == "regression":
        df["label"] = 2 * x + rng.normal(size=n)
    else:
        df["time"] = np.exp(-x + rng.normal(scale=0.3, size=n)).round(3)
        df["event"] = (rng.random(n) < 0.7).astype(int)
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(yaml.safe_dump({
        "task": task, "clinical": {"numeric": ["age"], "categorical": ["site"], "binary": ["dm"]}, "image": None,
        "model": {"dim": 16, "heads": 2, "clinical_encoder": encoder}, "train": {"epochs": 2, "batch_size": 32}}))
    manifest = tmp_path / "m.csv"
    df.to_csv(manifest, index=False)
    summary = trainer.train_from_files(cfg, manifest, tmp_path / "run", fusion="clinical_only", device="cpu",
                                       progress=False)
    assert summary["fusion"] == "clinical_only" and summary["n_test"] == 10
    out = tmp_path / "pred.csv"
    predictor.predict_from_files(tmp_path / "run", out, manifest_path=manifest, device="cpu", progress=False)
    pred = pd.read_csv(out)
    assert len(pred) == n and list(pred.columns)[0] == "case_id" and list(pred.columns)[-1] == "model_id"
    expected = {"binary": ["prob_0", "prob_1", "prediction"], "multiclass": ["prob_0", "prob_1", "prob_2", "prediction"],
                "regression": ["prediction"], "survival": ["risk"]}[kind]
    assert list(pred.columns)[1:-1] == [*expected, "clinical_present", "input_flags"]
    assert np.isfinite(pred[expected].to_numpy(dtype=float)).all()
