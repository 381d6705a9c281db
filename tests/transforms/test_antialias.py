"""The slab-wise, in-place anti-aliasing smoothing against independent references (SciPy, MONAI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.layers.simplelayers import separable_filtering
from scipy.ndimage import correlate1d, gaussian_filter

from mmai.transforms.spatial import antialias, antialias_sigma, gaussian_kernel, smooth_axis_

CT_SPACING = [0.7, 0.7, 1.25]  # a chest CT's voxels (mm) -> ct_chest.yaml's 1.5 mm


def _volume(shape=(2, 23, 17, 19), seed: int = 0) -> torch.Tensor:
    """(C, I, J, K) noise plus a bright block touching one border (so the border rule matters)."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 200.0 - 100.0
    x[:, :5, 3:9, 4:10] += 1000.0
    return x


def test_matches_scipy_correlate1d_with_the_same_kernels():
    """Separable correlation with replicated borders == scipy.ndimage.correlate1d(mode="nearest") per axis."""
    x = _volume()
    sigma = antialias_sigma(CT_SPACING, [1.5] * 3)
    assert sigma[0] > 1.0 and sigma[2] > 0.5  # every axis is smoothed
    ref = x.double().numpy()
    for axis, s in enumerate(sigma, start=1):
        ref = correlate1d(ref, gaussian_kernel(s).numpy(), axis=axis, mode="nearest")
    out = antialias(x, CT_SPACING, [1.5] * 3)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-3)  # values span ~1200


@pytest.mark.parametrize(("target", "tol"), [(3.0, 0.015), (6.0, 0.005)])
def test_matches_scipy_gaussian_filter(target, tol):
    """Same as scipy's Gaussian (sampled kernel; ours is MONAI's erf-integrated one: they converge as sigma grows)."""
    x = _volume((1, 40, 36, 32), seed=1)
    sigma = antialias_sigma([1.0] * 3, [target] * 3)
    ref = gaussian_filter(x.double().numpy(), [0.0, *sigma], mode="nearest", truncate=4.0)
    out = antialias(x, [1.0] * 3, [target] * 3).numpy()
    assert np.abs(out - ref).max() < tol * float(x.max() - x.min())


def test_matches_the_previous_monai_separable_filtering():
    x = _volume()
    sigma = antialias_sigma(CT_SPACING, [1.5] * 3)
    kernels = [gaussian_kernel(s).float() for s in sigma]
    ref = separable_filtering(x[None], kernels, mode="replicate")[0]
    out = antialias(x, CT_SPACING, [1.5] * 3)
    assert float((out - ref).abs().max()) < 1e-3


def test_slabs_do_not_change_the_result_and_the_input_is_kept():
    x = _volume()
    whole = smooth_axis_(x.clone(), gaussian_kernel(1.2), 1)
    for axis in (1, 2, 3):
        one = smooth_axis_(x.clone(), gaussian_kernel(1.2), axis)
        tiny = smooth_axis_(x.clone(), gaussian_kernel(1.2), axis, slab_voxels=7)  # one plane per slab
        assert torch.equal(one, tiny)
    assert not torch.equal(whole, x)
    before = x.clone()
    m = MetaTensor(x, affine=torch.diag(torch.tensor([0.7, 0.7, 1.25, 1.0], dtype=torch.float64)))
    out = antialias(m, CT_SPACING, [1.5] * 3)
    assert torch.equal(x, before)  # the input is not smoothed in place
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, m.affine)


def test_no_downsampling_is_a_no_op():
    x = _volume()
    assert antialias(x, [1.5] * 3, [1.5] * 3) is x
