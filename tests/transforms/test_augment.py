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


def test_translate_shifts_by_whole_voxels_within_range_and_pads_with_background():
    cfg = _cfg(translate=2)
    x = torch.full((1, 12, 10, 8), -1.0)
    x[0, 5, 4, 3] = 1.0  # one bright voxel
    x[0, 4:7, 3:6, 2:5] += 0.5  # and a dimmer cube around it (values stay distinct)
    chain = augment_transforms(cfg, seed=3)
    offsets = set()
    for _ in range(40):
        y = chain({KEY: MetaTensor(x.clone())})[KEY]
        assert tuple(y.shape) == (1, 12, 10, 8)
        peak = np.unravel_index(int(torch.argmax(y)), y.shape[1:])
        d = tuple(int(p - q) for p, q in zip(peak, (5, 4, 3), strict=True))
        assert all(abs(v) <= 2 for v in d), d
        offsets.add(d)
        # content is moved, not resampled: the same multiset of non-background values
        vals = np.sort(y.numpy().ravel())
        np.testing.assert_allclose(vals[vals > -1.0], np.sort(x.numpy().ravel())[np.sort(x.numpy().ravel()) > -1.0])
        assert float(y.min()) == -1.0  # the uncovered border is background (b_min), not zeros
    assert len(offsets) > 5  # it really moves, in several directions


def test_no_augmentation_gives_no_chain():
    assert augment_transforms(_cfg()) is None


def test_negative_translate_is_a_config_error():
    with pytest.raises(ConfigError, match="image.augment.translate must be >= 0"):
        config_from_dict({"image": {"augment": {"translate": -1}}}, "p.yaml")
