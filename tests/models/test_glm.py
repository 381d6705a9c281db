"""The GLM base term: design matrix, fits against scikit-learn / lifelines, models that start as the GLM."""

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmai.clinical.preprocess import FeatureSpec
from mmai.errors import ConfigError
from mmai.models.glm import GLMTerm, fit_glm, glm_term
from mmai.models.registry import create_model
from mmai.models.ridge_cox import cross_validate_penalty, fit_ridge_cox, partial_loglik

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("stage", "categorical", 4), FeatureSpec("crp", "numeric"),
         FeatureSpec("sex", "categorical", 3)]


def clinical_batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """values (n, 4), mask (n, 4): two numerics, two categoricals (level indices), ~15 % missing."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, 4, generator=g)
    values[:, 1] = torch.randint(0, 4, (n,), generator=g).float()
    values[:, 3] = torch.randint(1, 3, (n,), generator=g).float()
    mask = (torch.rand(n, 4, generator=g) > 0.15).float()
    values[mask == 0] = float("nan")  # a missing value must not reach the design (the mask decides)
    return values, mask


def test_design_matrix_is_onehot_plus_missing_indicators():
    term = GLMTerm(SPECS, 1)
    values = torch.tensor([[0.5, 2.0, -1.0, 1.0], [float("nan"), 7.0, 0.3, 2.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    x = term.design(values, mask)
    assert term.column_names == ["age", "crp", "stage=0", "stage=1", "stage=2", "stage=3", "sex=0", "sex=1",
                                 "sex=2", "age__missing", "stage__missing", "crp__missing", "sex__missing"]
    np.testing.assert_array_equal(x[0].numpy(), [0.5, -1.0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0])
    # row 2: age missing (0 + indicator), stage 7 is out of range -> the unknown bucket 0, sex missing
    np.testing.assert_allclose(x[1].numpy(), [0.0, 0.3, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1], atol=1e-7)


def _design(n: int, seed: int = 0) -> np.ndarray:
    values, mask = clinical_batch(n, seed)
    return GLMTerm(SPECS, 1).design(values, mask).numpy().astype(np.float64)


def test_logistic_fit_matches_sklearn_with_the_chosen_c():
    from sklearn.linear_model import LogisticRegression

    x = _design(300)
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - x[:, 3] + 0.8 * x[:, 9])))).astype(int)
    weight, bias, summary = fit_glm("binary", x, {"target": y.astype(np.float32)}, 1, seed=0)
    assert summary["model"] == "logistic" and summary["n_features"] == x.shape[1] and summary["folds"] == 5
    ref = LogisticRegression(C=summary["C"], max_iter=5000, tol=1e-10).fit(x, y)
    np.testing.assert_allclose(weight[:, 0], ref.coef_[0], atol=2e-3)
    np.testing.assert_allclose(bias, ref.intercept_, atol=2e-3)
    term = GLMTerm(SPECS, 1)
    term.set_coefficients(weight, bias)
    prob = torch.sigmoid(term(*clinical_batch(300))[:, 0]).numpy()
    np.testing.assert_allclose(prob, ref.predict_proba(x)[:, 1], atol=1e-4)
    # the penalty is chosen by inner CV: pure noise gets a strong penalty, a strong signal a weak one
    _, _, noise = fit_glm("binary", x, {"target": rng.integers(0, 2, 300).astype(np.float32)}, 1)
    assert noise["C"] < summary["C"]


def test_multinomial_fit_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    x = _design(300, seed=1)
    y = np.argmax(x[:, :3] @ np.random.default_rng(1).normal(size=(3, 3)) * 2
                  + np.random.default_rng(2).gumbel(size=(300, 3)), axis=1)
    weight, bias, summary = fit_glm("multiclass", x, {"target": y}, 3, seed=0)
    assert weight.shape == (x.shape[1], 3) and summary["model"] == "multinomial logistic"
    ref = LogisticRegression(C=summary["C"], max_iter=5000, tol=1e-10).fit(x, y)
    logits = x @ weight + bias
    prob = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(prob / prob.sum(1, keepdims=True), ref.predict_proba(x), atol=1e-3)


def test_ridge_regression_matches_sklearn():
    from sklearn.linear_model import Ridge

    x = _design(200, seed=2)
    y = x[:, 0] * 0.7 - x[:, 4] + np.random.default_rng(3).normal(size=200) * 0.5
    y = (y - y.mean()) / y.std()
    weight, bias, summary = fit_glm("regression", x, {"target": y.astype(np.float32)}, 1)
    ref = Ridge(alpha=summary["alpha"]).fit(x, y)
    np.testing.assert_allclose(weight[:, 0], ref.coef_, atol=1e-5)
    np.testing.assert_allclose(bias, [ref.intercept_], atol=1e-5)


def _survival(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    x = (x - x.mean(0)) / x.std(0, ddof=1)  # lifelines standardises internally: same penalty scale
    t = rng.exponential(np.exp(-(x @ np.array([0.8, -0.5, 0.3, 0.0]))))
    c = rng.exponential(2.0, size=n)
    time, event = np.minimum(t, c), (t < c).astype(float)
    if ties:
        time = np.ceil(time * 4) / 4
    return x, time, event


@pytest.mark.parametrize("penalizer", [0.01, 0.3])
def test_ridge_cox_matches_lifelines(penalizer):
    from lifelines import CoxPHFitter

    x, time, event = _survival(250, seed=0)  # continuous times: Efron (lifelines) = Breslow (mmai)
    frame = pd.DataFrame(x, columns=list("abcd")).assign(T=time, E=event)
    ref = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E").params_.to_numpy()
    np.testing.assert_allclose(fit_ridge_cox(x, time, event, penalizer), ref, atol=1e-4)


def test_ridge_cox_with_ties_is_the_breslow_optimum():
    x, time, event = _survival(120, seed=1, ties=True)
    assert len(np.unique(time)) < 0.6 * len(time)
    beta = np.array([0.3, -0.2, 0.1, 0.05])

    def brute(b: np.ndarray) -> float:  # Breslow by definition: every tied event sees the full risk set
        eta = x @ b
        return sum(eta[i] - np.log(np.exp(eta[time >= time[i]]).sum()) for i in range(len(time)) if event[i])

    ll, grad, _ = partial_loglik(x, time, event, beta, derivatives=True)
    assert ll == pytest.approx(brute(beta), rel=1e-10)
    eps = 1e-6
    numeric = [(brute(beta + eps * e) - brute(beta - eps * e)) / (2 * eps) for e in np.eye(4)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5)
    lam, n = 0.05, len(time)
    fitted = fit_ridge_cox(x, time, event, lam)
    numeric = [(brute(fitted + eps * e) - brute(fitted - eps * e)) / (2 * eps) for e in np.eye(4)]
    np.testing.assert_allclose(-np.array(numeric) / n + lam * fitted, 0.0, atol=1e-6)  # stationary


def test_cox_penalty_cv_prefers_a_weak_penalty_for_a_strong_signal():
    x, time, event = _survival(300, seed=2)
    lam, score = cross_validate_penalty(x, time, event, np.logspace(-4, 1, 11), folds=5, seed=0)
    noise_lam, _ = cross_validate_penalty(x, np.random.default_rng(5).permutation(time), event,
                                          np.logspace(-4, 1, 11), folds=5, seed=0)
    assert lam < 0.1 and noise_lam > lam and np.isfinite(score)
    _, _, summary = fit_glm("survival", x, {"time": time, "event": event}, 1)
    assert summary["penalizer"] == lam


FUSIONS_WITH_CLINICAL = ["clinical_only", "cross_attention", "concat", "late", "film", "early"]


def _model(name: str, n_outputs: int = 1, base: str = "glm") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, n_outputs=n_outputs, feature_specs=SPECS, widths=(4, 4, 8, 8), dim=16, heads=2,
                        base=base)


@pytest.mark.parametrize("name", FUSIONS_WITH_CLINICAL)
def test_fresh_model_outputs_exactly_the_glm(name):
    model = _model(name, n_outputs=3)
    term = glm_term(model)
    assert term is not None and not any(p is term.weight for p in model.parameters())  # frozen: a buffer
    term.set_coefficients(np.random.default_rng(0).normal(size=(term.n_design, 3)), np.array([0.2, -0.1, 0.4]))
    values, mask = clinical_batch(6)
    image = torch.randn(6, 1, 16, 16, 16)
    present = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # missing images too
    for train_mode in (False, True):  # dropout on or off: the residuals are exactly zero either way
        model.train(train_mode)
        out, aux = model(image, present, values, mask, return_aux=True)
        torch.testing.assert_close(out, term(values, mask), rtol=0, atol=1e-6)
        if "clinical" in aux:  # cross-attention's clinical auxiliary term includes the base term
            torch.testing.assert_close(aux["clinical"], term(values, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["clinical_only", "cross_attention", "concat"])
def test_residuals_and_image_term_train_away_from_the_glm(name):
    """Zero-initialised is not frozen: one optimizer step moves the output, the GLM stays put."""
    model = _model(name)
    term = glm_term(model)
    term.set_coefficients(np.ones((term.n_design, 1)) * 0.1, np.zeros(1))
    before = term.weight.clone()
    values, mask = clinical_batch(8)
    image, present = torch.randn(8, 1, 16, 16, 16), torch.ones(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    y = torch.randint(0, 2, (8,)).float()
    for _ in range(2):
        opt.zero_grad()
        out = model(image, present, values, mask)
        torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], y).backward()
        opt.step()
    model.eval()
    assert not torch.allclose(model(image, present, values, mask), term(values, mask), atol=1e-4)
    assert torch.equal(term.weight, before)
    if name != "clinical_only":
        assert model.image_term is not None and model.image_term.fc.weight.abs().sum() > 0


def test_base_none_keeps_the_old_layout_and_checkpoint_round_trip(tmp_path):
    old = _model("cross_attention", base="none")
    assert glm_term(old) is None
    assert not [k for k in old.state_dict() if k.startswith(("glm.", "image_term."))]
    model = _model("cross_attention")
    term = glm_term(model)
    term.set_coefficients(np.random.default_rng(1).normal(size=(term.n_design, 1)), np.array([0.7]))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {"glm.weight", "glm.bias"} <= set(saved)
    again = _model("cross_attention")
    again.load_state_dict(saved)
    torch.testing.assert_close(glm_term(again).weight, term.weight, rtol=0, atol=0)
    values, mask = clinical_batch(4)
    image, present = torch.randn(4, 1, 16, 16, 16), torch.ones(4)
    torch.testing.assert_close(again.eval()(image, present, values, mask), model.eval()(image, present, values, mask))


def test_unknown_base_is_a_config_error():
    with pytest.raises(ConfigError, match="model.base"):
        _model("clinical_only", base="lasso")


def test_glm_term_stays_float32_under_bf16_autocast():
    term = GLMTerm(SPECS, 1)
    term.set_coefficients(np.random.default_rng(2).normal(size=(term.n_design, 1)) * 3, np.array([0.123456]))
    values, mask = clinical_batch(5)
    exact = term(values, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = term(values, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-6)
