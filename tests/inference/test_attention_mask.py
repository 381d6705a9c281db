"""The fusion passes no key padding mask when every image is present (mmai/models/fusion.py): that
must give the very floats of an all-False mask, at predict (eval, attention weights asked for)."""

from __future__ import annotations

import torch

from mmai.models.attention import CrossAttentionBlock


def test_no_mask_gives_the_floats_of_an_all_false_mask() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim=32, heads=4, dropout=0.1).eval()
    q, kv = torch.randn(3, 5, 32), torch.randn(3, 300, 32)
    with torch.no_grad():
        masked, w_masked = block(q, kv, torch.zeros(3, 300, dtype=torch.bool))
        plain, w_plain = block(q, kv, None)
    assert torch.equal(masked, plain) and torch.equal(w_masked, w_plain)


def test_a_real_mask_still_changes_the_output() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim=32, heads=4, dropout=0.0).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 50, 32)
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[:, 1:] = True  # an absent image: only the no-image token is attended
    with torch.no_grad():
        assert not torch.equal(block(q, kv, pad)[0], block(q, kv, None)[0])
