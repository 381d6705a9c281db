"""The input guards read a column-major (NIfTI-order) volume without a C-order copy, and decide
exactly as on the same volume in C order (the fast chain hands them column-major arrays)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mmai.errors import PreprocessError
from mmai.io.modality_guess import _sample, modality_evidence
from mmai.transforms.guards import all_finite, check_volume


def _column_major(shape=(1, 61, 47, 33), seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    a = np.asfortranarray(rng.normal(-400, 500, shape[1:]).astype(np.float32))
    return torch.from_numpy(a)[None]  # (1, I, J, K), strides of a column-major array


def test_modality_sample_is_the_same_voxels_in_any_memory_order():
    x = _column_major()
    assert not x.is_contiguous()
    c = x.contiguous()
    np.testing.assert_array_equal(_sample(x), _sample(c))
    np.testing.assert_array_equal(_sample(MetaTensor(x)), _sample(c))
    assert modality_evidence(x) == modality_evidence(c)


def test_modality_sample_of_a_large_volume_is_strided_and_finite_only():
    x = _column_major((1, 130, 120, 60))
    x[0, 5, 7, 9] = float("nan")
    v = _sample(x)
    assert v.dtype == np.float64 and np.isfinite(v).all()
    assert v.size <= 130 * 120 * 60 // (130 * 120 * 60 // 400_000)
    np.testing.assert_array_equal(v, _sample(x.contiguous()))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_voxels_of_a_column_major_volume_are_found_and_counted(value):
    x = _column_major()
    assert all_finite(x)
    x[0, 60, 0, 32] = value  # the last row, first column: far from the start of memory
    x[0, 1, 2, 3] = value
    assert not all_finite(x)
    with pytest.raises(PreprocessError, match="2 non-finite voxel"):
        check_volume(x, name="ct.nii")
    filled, flags = check_volume(x, name="ct.nii", nonfinite="fill")
    assert flags == {"nonfinite_voxels": 2} and bool(torch.isfinite(filled).all())


def test_a_clean_volume_passes_unchanged_and_integers_are_always_finite():
    x = _column_major()
    y, flags = check_volume(x)
    assert y is x and flags == {}
    assert all_finite(torch.zeros(4, dtype=torch.int16))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.float16))
