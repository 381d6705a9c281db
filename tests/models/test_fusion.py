"""Every fusion model: shapes, the missing-image contract, the missing-value contract, learning."""

import argparse

import numpy as np
import pandas as pd
import pytest
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.models.fusion_names import FUSIONS
from mmai.models.heads import Head, cox_partial_likelihood, outputs_to_predictions, task_loss
from mmai.models.registry import MODELS, create_model, list_models

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("crp", "numeric"), FeatureSpec("smoking", "categorical", 4)]
KW = dict(widths=(4, 8, 8, 16), dim=16, heads=2)


def batch(b=3, size=(16, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, *size, generator=g)
    clinical = torch.stack([torch.randn(b, generator=g), torch.randn(b, generator=g),
                            torch.randint(0, 4, (b,), generator=g).float()], dim=1)
    return image, torch.ones(b), clinical, torch.ones(b, 3)


def awake(model):
    """Give zero-initialised heads (the cross-attention's fused term starts at exactly 0) random
    weights, as training would, so that tests of what the image can change see a live image path."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, Head) and not m.fc.weight.any():
            with torch.no_grad():
                m.fc.weight.copy_(torch.randn(m.fc.weight.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("n_out", [1, 3])
def test_shapes(name, n_out):
    model = create_model(name, n_outputs=n_out, feature_specs=SPECS, **KW).eval()
    out = model(*batch())
    assert out.shape == (3, n_out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in list_models() if n != "clinical_only"])
def test_missing_image_ignores_voxels(name):
    """With image_present = 0 the voxels (whatever they hold) cannot change the output."""
    model = awake(create_model(name, n_outputs=1, feature_specs=SPECS, **KW)).eval()
    image, present, clinical, mask = batch()
    present = torch.tensor([1.0, 0.0, 0.0])
    a = model(image, present, clinical, mask)
    b = model(image * 5 + 3, present, clinical, mask)
    assert torch.allclose(a[1:], b[1:], atol=1e-5)
    assert not torch.allclose(a[0], b[0], atol=1e-5)


@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("image_only",)])
def test_missing_value_only_through_mask(name):
    """A masked (missing) clinical value has no effect, whatever number stands in its place."""
    model = awake(create_model(name, n_outputs=1, feature_specs=SPECS, **KW)).eval()
    image, present, clinical, mask = batch()
    mask[:, 0] = 0
    changed = clinical.clone()
    changed[:, 0] = 123.0
    a = model(image, present, clinical, mask)
    assert torch.allclose(a, model(image, present, changed, mask), atol=1e-5)
    changed[:, 0] = float("nan")
    assert torch.allclose(a, model(image, present, changed, mask), atol=1e-5)
    mask2 = mask.clone()
    mask2[:, 0] = 1
    assert not torch.allclose(a, model(image, present, clinical, mask2), atol=1e-5)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="cross_attention"):
        create_model("magic", n_outputs=1, feature_specs=SPECS)


def test_clinical_model_without_features_is_an_error():
    with pytest.raises(ValueError, match="clinical"):
        create_model("cross_attention", n_outputs=1, feature_specs=[])


@pytest.mark.slow
def test_cross_attention_learns_an_image_clinical_interaction():
    """y = [bright blob] XOR [clinical x > 0]: neither modality alone can fit it."""
    torch.manual_seed(0)
    n, size = 64, (8, 8, 8)
    blob = torch.rand(n) < 0.5
    image = torch.randn(n, 1, *size) * 0.1
    image[blob, :, 2:6, 2:6, 2:6] += 1.0
    x = torch.randn(n)
    clinical = torch.stack([x, torch.randn(n), torch.zeros(n)], dim=1)
    y = (blob ^ (x > 0)).float()
    model = create_model("cross_attention", n_outputs=1, feature_specs=SPECS, **KW)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = {"target": y}
    for _ in range(120):
        loss = task_loss("binary", model(image, torch.ones(n), clinical, torch.ones(n, 3)), data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    acc = ((outputs_to_predictions("binary", model(image, torch.ones(n), clinical, torch.ones(n, 3)))[:, 1] > 0.5)
           == y.bool()).float().mean()
    assert acc > 0.9, float(acc)


def test_cox_loss_matches_a_direct_breslow_computation_with_ties():
    """Breslow partial likelihood equals a direct computation, with tied times (two events tied at
    t = 3 here, where Breslow and Efron differ); no event in the batch -> 0."""
    risk = torch.tensor([0.5, -0.2, 1.0, 0.0, 0.3, 0.7])
    time = torch.tensor([5.0, 3.0, 3.0, 8.0, 1.0, 3.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    expected = 0.0
    for i in range(len(risk)):
        if event[i]:
            at_risk = time >= time[i]
            expected -= float(risk[i] - torch.logsumexp(risk[at_risk], 0))
    expected /= float(event.sum())
    assert float(cox_partial_likelihood(risk, time, event)) == pytest.approx(expected, rel=1e-5)
    assert float(cox_partial_likelihood(risk, time, torch.zeros(len(risk)))) == 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_cox_loss_matches_lifelines(ties):
    """lifelines' CoxPHFitter on 2 covariates: at its fitted coefficients our loss times the number
    of events equals minus its partial log-likelihood, and our gradient there is zero (its
    coefficients minimise our loss). ``ties``: times rounded so that many censored cases share a
    time with an event (only one event per time, where Efron, lifelines' method, equals Breslow)."""
    lifelines = pytest.importorskip("lifelines")
    rng = np.random.default_rng(0)
    n = 80
    x = rng.normal(size=(n, 2))
    t = rng.exponential(1.0 / np.exp(0.8 * x[:, 0] - 0.5 * x[:, 1]))
    e = (rng.random(n) < 0.7).astype(int)
    if ties:
        t = np.round(t, 1) + 0.1
        order = np.argsort(t)
        seen: set[float] = set()
        for i in order:  # at most one event per distinct time
            if e[i] and float(t[i]) in seen:
                e[i] = 0
            elif e[i]:
                seen.add(float(t[i]))
        assert len(np.unique(t)) < n - 10
    df = pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "T": t, "E": e})
    cph = lifelines.CoxPHFitter().fit(df, "T", "E")
    beta = torch.tensor(cph.params_[["x0", "x1"]].to_numpy(), dtype=torch.float64, requires_grad=True)
    X, T, E = (torch.tensor(v, dtype=torch.float64) for v in (x, t, e))
    loss = cox_partial_likelihood(X @ beta, T, E)
    assert float(loss.detach()) * int(e.sum()) == pytest.approx(-cph.log_likelihood_, rel=1e-6)
    loss.backward()
    assert beta.grad.abs().max() < 1e-4, beta.grad
    # and the loss is not flat: a different coefficient vector is worse
    assert float(cox_partial_likelihood(X @ (beta.detach() + 0.3), T, E)) > float(loss) + 1e-3


def test_fusion_list_is_defined_once():
    """The registry, the config validator and the CLI's --fusion choices are the same list."""
    import mmai.cli
    import mmai.config

    assert tuple(MODELS) == FUSIONS and list_models() == list(FUSIONS)
    assert mmai.config.FUSIONS is FUSIONS and mmai.cli.FUSIONS is FUSIONS
    parser = mmai.cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    fusion = next(a for a in train._actions if a.dest == "fusion")
    assert tuple(fusion.choices) == FUSIONS


def test_fusion_list_import_is_torch_free():
    """The CLI and the config read the list without importing torch (``mmai --help`` stays instant)."""
    import subprocess
    import sys

    code = "import sys, mmai.cli, mmai.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _clinical_only_into_cross_attention(co, ca):
    """Copy a clinical-only model's weights into the clinical term of a cross-attention model."""
    state = {("clinical_head." + k[5:] if k.startswith("head.") else k): v for k, v in co.state_dict().items()}
    missing, unexpected = ca.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.startswith(("clinical.", "clinical_head.")) for k in missing)


@pytest.mark.parametrize("encoder", ["tokens", "mlp"])
def test_cross_attention_starts_as_the_clinical_only_model(encoder):
    """At initialisation the cross-attention model is exactly its clinical term, which is the
    clinical-only model (same encoder, same head): the image changes nothing until training
    gives the fused term weight; aux["clinical"] is that clinical term."""
    kw = dict(KW, clinical_encoder=encoder)
    co = create_model("clinical_only", n_outputs=1, feature_specs=SPECS, **kw).eval()
    ca = create_model("cross_attention", n_outputs=1, feature_specs=SPECS, **kw).eval()
    _clinical_only_into_cross_attention(co, ca)
    image, present, clinical, mask = batch(b=4)
    mask[1, 0] = 0
    out, aux = ca(image, present, clinical, mask, return_aux=True)
    expected = co(None, present, clinical, mask)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(aux["clinical"], expected)
    torch.testing.assert_close(ca(image * 7 - 2, present, clinical, mask), expected)
    assert set(aux) == {"image", "clinical", "clinical_tokens", "fused"}
    assert all(v.shape == (4, 1) for v in aux.values())
    # once the fused term has weight, the image does count (the fusion keeps its capacity)
    awake(ca)
    assert not torch.allclose(ca(image * 7 - 2, present, clinical, mask), ca(image, present, clinical, mask))


def test_fused_term_learns_from_zero():
    """The zero-initialised fused term gets a gradient and leaves zero after one step."""
    torch.manual_seed(0)
    model = create_model("cross_attention", n_outputs=1, feature_specs=SPECS, **KW)
    image, present, clinical, mask = batch(b=8)
    y = {"target": (torch.arange(8) % 2).float()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    task_loss("binary", model(image, present, clinical, mask), y).backward()
    assert model.head.fc.weight.grad.abs().sum() > 0
    opt.step()
    assert model.head.fc.weight.abs().sum() > 0
