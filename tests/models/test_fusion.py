"""Every fusion model: shapes, the missing-image contract, the missing-value contract, learning."""

import pytest
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.models.heads import cox_partial_likelihood, outputs_to_predictions, task_loss
from mmai.models.registry import create_model, list_models

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("crp", "numeric"), FeatureSpec("smoking", "categorical", 4)]
KW = dict(widths=(4, 8, 8, 16), dim=16, heads=2)


def batch(b=3, size=(16, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 1, *size, generator=g)
    clinical = torch.stack([torch.randn(b, generator=g), torch.randn(b, generator=g),
                            torch.randint(0, 4, (b,), generator=g).float()], dim=1)
    return image, torch.ones(b), clinical, torch.ones(b, 3)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("n_out", [1, 3])
def test_shapes(name, n_out):
    model = create_model(name, n_outputs=n_out, feature_specs=SPECS, **KW).eval()
    out = model(*batch())
    assert out.shape == (3, n_out)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("clinical_only", "early")])
def test_missing_image_ignores_voxels(name):
    """With image_present = 0 the voxels (whatever they hold) cannot change the output."""
    model = create_model(name, n_outputs=1, feature_specs=SPECS, **KW).eval()
    image, present, clinical, mask = batch()
    present = torch.tensor([1.0, 0.0, 0.0])
    a = model(image, present, clinical, mask)
    b = model(image * 5 + 3, present, clinical, mask)
    assert torch.allclose(a[1:], b[1:], atol=1e-5)
    assert not torch.allclose(a[0], b[0], atol=1e-5)


@pytest.mark.parametrize("name", [n for n in list_models() if n not in ("image_only",)])
def test_missing_value_only_through_mask(name):
    """A masked (missing) clinical value has no effect, whatever number stands in its place."""
    model = create_model(name, n_outputs=1, feature_specs=SPECS, **KW).eval()
    image, present, clinical, mask = batch()
    mask[:, 0] = 0
    changed = clinical.clone()
    changed[:, 0] = 123.0
    a = model(image, present, clinical, mask)
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


def test_cox_loss_matches_lifelines_partial_likelihood():
    """Breslow partial likelihood equals a direct computation, with tied times."""
    risk = torch.tensor([0.5, -0.2, 1.0, 0.0, 0.3])
    time = torch.tensor([5.0, 3.0, 3.0, 8.0, 1.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    expected = 0.0
    for i in range(5):
        if event[i]:
            at_risk = time >= time[i]
            expected -= float(risk[i] - torch.logsumexp(risk[at_risk], 0))
    expected /= float(event.sum())
    assert float(cox_partial_likelihood(risk, time, event)) == pytest.approx(expected, rel=1e-5)
    assert float(cox_partial_likelihood(risk, time, torch.zeros(5))) == 0.0
