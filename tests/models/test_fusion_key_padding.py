"""The cross-attention's key-padding mask is left out only where it changes nothing: eager batches
with every image present (no sympy import on the first prediction); the masked path stays for
batches with an absent image and for tracing (``mmai export``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmai.models import fusion
from mmai.models.registry import create_model
from tests.models.test_fusion import KW, SPECS, awake, batch


def _model(**kw):
    torch.manual_seed(0)
    return awake(create_model("cross_attention", n_outputs=2, feature_specs=SPECS, **KW, **kw)).eval()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_unmasked_equals_masked_bit_for_bit_when_every_image_is_present(monkeypatch, bidirectional):
    model = _model(bidirectional=bidirectional)
    x = batch(b=3)
    with torch.no_grad():
        fast = model(*x)
        fast_attn = model.last_attention.clone()
        monkeypatch.setattr(fusion, "_key_padding", lambda pad, absent: pad)  # always the mask (before)
        masked = model(*x)
    assert torch.equal(fast, masked)
    assert torch.equal(fast_attn, model.last_attention)


def test_key_padding_is_none_only_when_no_image_is_absent():
    pad = torch.zeros(2, 5, dtype=torch.bool)
    assert fusion._key_padding(pad, torch.tensor([False, False])) is None
    assert fusion._key_padding(pad, torch.tensor([False, True])) is pad


def test_trace_on_a_present_image_keeps_the_mask_for_an_absent_one():
    """Tracing freezes Python branches: a trace taken on a case with its image must still mask
    the image tokens of a case without one (as ``mmai export`` traces one example case)."""
    model = _model()
    image, _, clinical, mask = batch(b=1)
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, torch.ones(1), clinical, mask), check_trace=False)
        absent = torch.zeros(1)
        want = model(image, absent, clinical, mask)
        got = traced(image, absent, clinical, mask)
        got_other_voxels = traced(image * 5 + 3, absent, clinical, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_other_voxels, want, atol=1e-6, rtol=0)


def test_prediction_with_every_image_present_does_not_import_sympy():
    """``nn.MultiheadAttention`` checks a key-padding mask with ``torch._check_with``, which imports
    sympy (~0.8 CPU-s); a batch with every image present passes no mask, so none is imported."""
    code = ("import sys, torch\n"
            "from mmai.models.registry import create_model\n"
            "from tests.models.test_fusion import KW, SPECS, batch\n"
            "m = create_model('cross_attention', n_outputs=1, feature_specs=SPECS, **KW).eval()\n"
            "with torch.inference_mode():\n    m(*batch(b=2))\n"
            "print('sympy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
