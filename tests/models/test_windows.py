"""Sliding-window image tokens: equality with the direct pass, batch-size invariance, millimetre
positions that follow the affine, training subsets, checkpointing, bidirectional cross-attention."""

import numpy as np
import pytest
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.models.heads import task_loss
from mmai.models.registry import create_model
from mmai.models.windows import WindowLayout, stitch, window_slices

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("crp", "numeric")]
KW = dict(widths=(4, 8, 8, 16), dim=16, heads=2)
ROI = (32, 32, 32)


def model(windows=None, bidirectional=False, seed=0, **kw):
    torch.manual_seed(seed)
    w = None if windows is False else {"roi_size": list(ROI), "overlap": 0.25, "batch": 2, **(windows or {})}
    m = create_model("cross_attention", n_outputs=1, feature_specs=SPECS, windows=w,
                     bidirectional=bidirectional, **KW, **kw).eval()
    with torch.no_grad():  # as after training: the fused (image) term starts at exactly 0 (docs/models.md)
        torch.nn.init.normal_(m.head.fc.weight, std=0.5)
    return m


def inputs(b=2, size=(40, 48, 36), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, *size, generator=g), torch.ones(b), torch.randn(b, 2, generator=g), torch.ones(b, 2))


def affine(spacing=(1.5, 0.8, 2.5), origin=(-120.0, 30.0, 400.0), b=2):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return torch.tensor(np.stack([a] * b), dtype=torch.float32)


def direct_centres_mm(aff: np.ndarray, size, grid, start=(0, 0, 0)) -> np.ndarray:
    """Independent reference: cell k of a window of ``size`` voxels starting at ``start`` covers
    [k * size / grid, (k + 1) * size / grid) -> its centre in voxels, then through the affine."""
    axes = [start[a] + (np.arange(grid[a]) + 0.5) * size[a] / grid[a] - 0.5 for a in range(3)]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def test_one_window_equals_direct_forward():
    m = model()
    image = torch.randn(2, 1, *ROI)
    aff = affine()
    tok, layout = m.image_tokens(image, aff)
    with torch.no_grad():
        fmap = m.encoder.forward_features(image)  # (B, C, d, h, w)
        grid = fmap.shape[2:]
        mm = torch.tensor(np.stack([direct_centres_mm(aff[i].double().numpy(), ROI, grid) for i in range(2)]))
        direct = m.img_proj(fmap.flatten(2).transpose(1, 2)) + m.windows.pos(mm)
    assert len(layout.slices) == 1 and tok.shape == direct.shape
    torch.testing.assert_close(tok.detach(), direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(layout.centres_mm, mm, atol=1e-6, rtol=0)


def test_every_window_equals_the_direct_pass_on_its_crop():
    m = model()
    image, *_ = inputs(b=2)
    with torch.no_grad():
        tok, layout = m.image_tokens(image, affine())
        n = layout.tokens_per_window
        assert len(layout.slices) > 1 and layout.pad == (0, 0, 0)
        for w, s in enumerate(layout.slices):
            crop = image[(slice(None), slice(None), *s)]
            ref = m.img_proj(m.encoder.forward_features(crop).flatten(2).transpose(1, 2))
            ref = ref + m.windows.pos(layout.centres_mm[:, w * n : (w + 1) * n])
            torch.testing.assert_close(tok[:, w * n : (w + 1) * n], ref, atol=1e-5, rtol=0)


def test_tiling_covers_the_volume_like_monai():
    slices = window_slices((40, 48, 20), ROI, 0.25)
    cover = np.zeros((40, 48, 32), int)  # axis 2 padded from 20 to 32
    for s in slices:
        cover[s] += 1
    assert cover.min() >= 1 and len(slices) == 4
    with pytest.raises(ValueError, match="overlap"):
        window_slices((40, 40, 40), ROI, 1.0)


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_tokens_and_predictions_do_not_depend_on_window_batch(batch):
    image, present, clinical, mask = inputs(b=2)
    aff = affine()
    ref_model = model({"batch": 2})
    with torch.no_grad():
        ref_tok, _ = ref_model.image_tokens(image, aff)
        ref_out = ref_model(image, present, clinical, mask, affine=aff)
        m = model({"batch": batch})
        tok, _ = m.image_tokens(image, aff)
        out = m(image, present, clinical, mask, affine=aff)
    torch.testing.assert_close(tok, ref_tok, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)


def test_positions_are_millimetres_that_follow_the_affine():
    m = model()
    image, present, clinical, mask = inputs(b=1)
    aff = affine(b=1)
    with torch.no_grad():
        _, base = m.image_tokens(image, aff)
        shifted = aff.clone()
        shifted[:, :3, 3] += torch.tensor([10.0, -5.0, 42.0])
        _, moved = m.image_tokens(image, shifted)
        torch.testing.assert_close(moved.centres_mm - base.centres_mm,
                                   torch.tensor([10.0, -5.0, 42.0], dtype=torch.float64).expand_as(base.centres_mm))
        # axis 0 flipped: voxel i sits where voxel (D-1-i) was; the same set of x positions, reversed
        flipped = aff.clone()
        d = image.shape[2]
        flipped[:, 0, 0] = -aff[:, 0, 0]
        flipped[:, 0, 3] = aff[:, 0, 3] + (d - 1) * aff[:, 0, 0]
        _, flip = m.image_tokens(image, flipped)
        x0, x1 = base.centres_mm[0, :, 0], flip.centres_mm[0, :, 0]
        torch.testing.assert_close(torch.sort(x1).values, torch.sort(x0).values, atol=1e-4, rtol=0)
        assert x1[0] > x1.mean() > x0[0]  # the first token moved to the far end
        # positions change the prediction (they are part of the tokens)
        assert not torch.allclose(m(image, present, clinical, mask, affine=aff),
                                  m(image, present, clinical, mask, affine=shifted), atol=1e-6)
        # no affine: the voxel-index grid at 1 mm (the identity affine)
        _, ident = m.image_tokens(image, None)
        torch.testing.assert_close(ident.centres_mm, base.centres_mm * 0 + ident.centres_mm)
        assert ident.centres_mm[0, 0].tolist() == [7.5, 7.5, 7.5]  # cell 0: voxels 0..15 -> centre 7.5


def test_without_windows_the_model_is_unchanged_and_ignores_the_affine():
    plain = model(False)
    assert plain.windows is None and plain.back is None
    assert not any(k.startswith(("windows.", "back.")) for k in plain.state_dict())
    image, present, clinical, mask = inputs(b=2, size=(16, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(plain(image, present, clinical, mask),
                                   plain(image, present, clinical, mask, affine=affine()))


def test_training_samples_k_windows_evaluation_uses_all():
    m = model({"train_windows": 2})
    image, *_ = inputs(b=2)
    m.train()
    tok, layout = m.image_tokens(image, None)
    assert len(layout.slices) == 2 and tok.shape[1] == 2 * layout.tokens_per_window
    m.eval()
    _, full = m.image_tokens(image, None)
    assert len(full.slices) == len(window_slices(image.shape[2:], ROI, 0.25)) > 2


def test_checkpointing_gives_the_same_gradients():
    image, present, clinical, mask = inputs(b=2)
    grads = []
    for ckpt in (False, True):
        m = model({"checkpoint": ckpt}).train()
        torch.manual_seed(1)  # same dropout masks
        m(image, present, clinical, mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.encoder.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0


def test_stitch_blends_constant_windows_to_a_constant_map():
    slices = tuple(window_slices((40, 48, 20), ROI, 0.25))
    layout = WindowLayout(image_shape=(40, 48, 20), pad=(0, 0, 6), padded_shape=(40, 48, 32), roi_size=ROI,
                          slices=slices, fmap_shape=(2, 2, 2), centres_mm=torch.zeros(1, 1, 3))
    maps = torch.full((1, len(slices), *ROI), 3.0)
    out = stitch(maps, layout)
    assert out.shape == (1, 40, 48, 20)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))
    maps[0, 0] = 0.0  # one window disagrees: the blend lies between, nearest its own centre
    out = stitch(maps, layout)
    assert out[0, 0, 0, 10] == 0.0 and 0.0 < out[0, 20, 20, 10] < 3.0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_windowed_model_trains(bidirectional):
    """A few steps on a learnable signal (a bright cube in positive cases): the loss decreases."""
    torch.manual_seed(0)
    n = 16
    y = torch.arange(n) % 2
    image = torch.randn(n, 1, 24, 40, 24) * 0.1
    image[y == 1, :, 8:16, 10:30, 8:16] += 1.0
    clinical, mask, present = torch.randn(n, 2), torch.ones(n, 2), torch.ones(n)
    m = model({"roi_size": [24, 24, 24], "batch": 4, "train_windows": 2, "checkpoint": True},
              bidirectional=bidirectional).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = task_loss("binary", m(image, present, clinical, mask), {"target": y.float()})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    if bidirectional:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.back.parameters())


def test_no_window_batch_of_one_in_training():
    """9 windows in batches of 4 -> 4, 5 (a lone window cannot be batch-normalised in training)."""
    from mmai.models.image_tokens import _chunks

    assert _chunks(9, 4) == [(0, 4), (4, 9)] and _chunks(8, 4) == [(0, 4), (4, 8)] and _chunks(1, 4) == [(0, 1)]
    m = model({"roi_size": [16, 16, 16], "batch": 4, "train_windows": 3}).train()
    m.image_tokens(torch.randn(3, 1, 32, 32, 32), None)  # 9 (window, case) pairs, 1x1x1 feature maps


def test_inference_window_copies_equal_the_training_path():
    """Without gradients the windows are copied straight into a channels-last batch; with them
    they are stacked: same tokens (a padded volume, windows of both volumes of the batch)."""
    m = model({"batch": 3})
    image, *_ = inputs(b=2, size=(40, 28, 36))  # axis 1 padded to 32
    aff = affine()
    with torch.no_grad():
        fast, layout = m.image_tokens(image, aff)
    slow, _ = m.image_tokens(image, aff)  # grad enabled: the stacking path
    assert len(layout.slices) > 2 and layout.pad[1] > 0
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=0)
