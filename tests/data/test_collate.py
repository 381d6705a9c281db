"""Volumes of different sizes batch together; padding keeps voxel (0, 0, 0) and the affine."""

import numpy as np
import torch

from mmai.data.collate import PadCollate, pad_to_common


def test_pad_collate_pads_at_the_end_with_the_background():
    a = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    b = torch.ones(2, 5, 2, 6)
    aff = torch.eye(4)
    batch = PadCollate(background=-1.0)([{"image": a, "affine": aff, "case_id": "a"},
                                        {"image": b, "affine": aff * 2, "case_id": "b"}])
    assert batch["image"].shape == (2, 2, 5, 4, 6)
    torch.testing.assert_close(batch["image"][0, :, :3, :4, :5], a)  # original voxels where they were
    assert (batch["image"][0, :, 3:] == -1).all() and (batch["image"][0, :, :, :, 5:] == -1).all()
    torch.testing.assert_close(batch["image"][1, :, :5, :2, :6], b)
    assert (batch["image"][1, :, :, 2:] == -1).all()
    torch.testing.assert_close(batch["affine"][1], aff * 2)
    assert batch["case_id"] == ["a", "b"]


def test_pad_to_common_numpy_and_same_shapes_untouched():
    x = [np.zeros((1, 2, 2, 2), np.float32), np.ones((1, 3, 2, 1), np.float32)]
    out = pad_to_common(x, 0.5)
    assert [o.shape for o in out] == [(1, 3, 2, 2)] * 2
    assert out[1][0, 2, 1, 0] == 1 and out[1][0, 0, 0, 1] == 0.5
    same = [np.zeros((1, 2, 2, 2))] * 2
    assert pad_to_common(same, 0.0)[0] is same[0]
