"""Training augmentation: translation moves the content by whole voxels and fills with background."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mmai.config import AugmentConfig, ImageConfig, IntensityConfig, config_from_dict
from mmai.errors import ConfigError
from mmai.transforms.pipelines import KEY, augment_transforms


def _cfg(**augment) -> ImageConfig:
    return ImageConfig(spacing=None, size=(12, 10, 8), intensity=IntensityConfig(b_min=-1.0, b_max=1.0),
                       augment=AugmentConfig(**augment))


def _shifted(x: np.ndarray, d: tuple[int, ...], fill: float) -> np.ndarray:
    """``x`` (1, I, J, K) moved by ``d`` voxels, the uncovered border set to ``fill``."""
    out = np.full_like(x, fill)
    src = tuple(slice(max(0, -v), n - max(0, v)) for v, n in zip(d, x.shape[1:], strict=True))
    dst = tuple(slice(max(0, v), n - max(0, -v)) for v, n in zip(d, x.shape[1:], strict=True))
    out[(slice(None), *dst)] = x[(slice(None), *src)]
    return out


def test_translate_shifts_by_whole_voxels_within_range_and_pads_with_background():
    cfg = _cfg(translate=2)
    g = np.random.default_rng(0)
    x = torch.from_numpy(g.uniform(-0.5, 1.0, (1, 12, 10, 8)).astype(np.float32))  # tissue everywhere
    x[0, 5, 4, 3] = 2.0  # one distinct peak to read the offset from
    chain = augment_transforms(cfg, seed=3)
    offsets = set()
    for _ in range(40):
        y = chain({KEY: MetaTensor(x.clone())})[KEY]
        assert tuple(y.shape) == (1, 12, 10, 8)
        peak = np.unravel_index(int(torch.argmax(y)), y.shape[1:])
        d = tuple(int(p - q) for p, q in zip(peak, (5, 4, 3), strict=True))
        assert all(abs(v) <= 2 for v in d), d
        offsets.add(d)
        # moved by whole voxels, not resampled; the uncovered border is the background b_min = -1
        # (no voxel of x is -1: zeros or edge copies there would differ)
        np.testing.assert_array_equal(y.numpy(), _shifted(x.numpy(), d, -1.0))
    assert len(offsets) > 5 and any(v != 0 for d in offsets for v in d)  # it really moves, in several directions


def test_no_augmentation_gives_no_chain():
    assert augment_transforms(_cfg()) is None


def test_negative_translate_is_a_config_error():
    with pytest.raises(ConfigError, match="image.augment.translate must be >= 0"):
        config_from_dict({"image": {"augment": {"translate": -1}}}, "p.yaml")
