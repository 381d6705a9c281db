"""The focal inventory's fast LoG stack and local-maximum filter give the values of the plain
formulations (padded second differences, scipy's maximum filter) bit for bit, so measuring faster
changes no inventory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from mmai.transforms.focal import _log_stack, _max3


def _reference_log_stack(x: np.ndarray, sp: np.ndarray, radii: np.ndarray) -> np.ndarray:
    out = np.empty((len(radii), *x.shape), dtype=np.float32)
    x32 = x.astype(np.float32)
    for s, r in enumerate(radii):
        sigma_mm = r / math.sqrt(3.0)
        g = ndimage.gaussian_filter(x32, sigma_mm / sp, mode="nearest")
        lap = np.zeros(x.shape, dtype=np.float32)
        for axis in range(3):
            gp = np.pad(g, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
            n = g.shape[axis]
            lap += (np.take(gp, range(2, n + 2), axis=axis) - 2 * g + np.take(gp, range(0, n), axis=axis)) \
                / np.float32(sp[axis] ** 2)
        out[s] = -(sigma_mm**2) * lap
    return out


@pytest.mark.parametrize(("shape", "spacing"), [((20, 17, 9), (1.0, 1.3, 2.5)), ((33, 40, 28), (0.7, 0.7, 1.25)),
                                                ((1, 5, 7), (1.0, 1.0, 1.0)), ((2, 2, 2), (3.0, 3.0, 3.0))])
def test_log_stack_and_local_maxima_are_bit_identical_to_the_plain_formulation(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape) * 100.0 + np.linspace(0, 50, shape[-1])  # float64, a trend along K
    sp, radii = np.asarray(spacing), np.geomspace(1.0, 9.0, 5)
    got, ref = _log_stack(x, sp, radii), _reference_log_stack(x, sp, radii)
    assert got.dtype == ref.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    want = ndimage.maximum_filter(ref, size=(3, 3, 3, 3), mode="nearest")
    peaks = _max3(ref)
    assert np.array_equal(peaks, want) and peaks is not ref
    assert np.array_equal(ref, _reference_log_stack(x, sp, radii))  # the input is left as it was


@pytest.mark.parametrize("name", ["default", "small_nodes", "low_contrast", "thick_slices"])
def test_dropping_dim_candidates_before_their_box_changes_no_object(name, monkeypatch):
    """The early drop of candidates under the lowest possible attenuated floor (``_skip_below``) keeps
    exactly the objects the full test keeps, in HU and windowed to [0, 1]."""
    from mmai import synth_semireal as S
    from mmai.transforms import focal

    var = S.variant(name)
    vol, _, _ = S.make_semireal_phantom(np.random.default_rng(3), 24.0, 9, var=var)
    for v in (vol, np.clip((vol + 160) / 400, 0, 1).astype(np.float32)):
        fast = focal.focal_objects(v, var.spacing)
        with monkeypatch.context() as m:
            m.setattr(focal, "_skip_below", lambda atten, floor, lowest: [-math.inf] * len(atten))
            full = focal.focal_objects(v, var.spacing)
        assert fast == full
        assert len(full) >= 2  # the phantom's tumour and nodes are found: the comparison is not vacuous
