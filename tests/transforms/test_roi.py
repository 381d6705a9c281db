"""Lesion boxes (image.roi): geometry in millimetres, mask channel, centre points, missing inputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmai.config import ImageConfig, IntensityConfig, RoiConfig, config_from_dict
from mmai.errors import ConfigError, PreprocessError
from mmai.transforms.pipelines import KEY, apply_chain, image_channels, output_shape, preprocess_transforms
from mmai.transforms.roi import roi_sources
from tests.data.real_pixels import ct_hu_slice

LESION_RAS = np.array([12.0, -20.0, 31.0])


def _scene(tmp_path):
    """Real CT pixels (0.66 mm, LPS-stored like DICOM, shifted origin) + a lesion mask on another grid."""
    hu = np.repeat(ct_hu_slice()[:, :, None], 40, axis=2)
    aff = np.diag([-0.661468, -0.661468, 2.0, 1.0])
    aff[:3, 3] = [40.0, 45.0, -10.0]
    nib.save(nib.Nifti1Image(hu, aff), str(tmp_path / "ct.nii.gz"))
    # the mask: 1 mm grid, RAS-stored, different origin; a 6 mm-radius ball at LESION_RAS
    m_aff = np.eye(4)
    m_aff[:3, 3] = [-40.0, -60.0, -5.0]
    g = [np.arange(n) for n in (90, 90, 70)]
    X, Y, Z = np.meshgrid(*g, indexing="ij")
    ras = np.stack([X, Y, Z], -1) + m_aff[:3, 3]
    mask = (np.linalg.norm(ras - LESION_RAS, axis=-1) <= 6.0).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, m_aff), str(tmp_path / "mask.nii.gz"))
    return tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"


def _cfg(**roi) -> ImageConfig:
    return ImageConfig(spacing=(1.5, 1.5, 1.5), intensity=IntensityConfig(kind="windows", windows=((-1000, 400), (-160, 240))),
                       roi=RoiConfig(size_mm=(30.0, 30.0, 30.0), **roi))


def test_mask_at_a_known_position_ends_up_at_the_box_centre(tmp_path):
    ct, mask = _scene(tmp_path)
    cfg = _cfg(mask="lesion")
    out = apply_chain(preprocess_transforms(cfg), {KEY: str(ct), "roi_mask": str(mask)})[KEY]
    assert out.shape == (3, 20, 20, 20) == (image_channels(cfg), *output_shape(cfg))
    m = out[2].numpy()
    assert set(np.unique(m)) == {0.0, 1.0}  # nearest neighbour: a binary channel
    com = np.argwhere(m > 0.5).mean(axis=0)
    assert np.allclose(com, 9.5, atol=0.35)  # centre of a 20-voxel box
    aff = out.affine.numpy()
    assert np.allclose(aff[:3, :3], np.diag([1.5] * 3))
    assert np.allclose(aff @ np.array([9.5, 9.5, 9.5, 1.0]), [*LESION_RAS, 1.0], atol=0.5)
    # the ball's volume survives resampling (4/3 pi 6^3 = 905 mm^3; 1.5 mm voxels)
    assert m.sum() * 1.5**3 == pytest.approx(905, rel=0.15)


def test_center_point_lps_and_ras_give_the_same_box(tmp_path):
    ct, _ = _scene(tmp_path)
    df = pd.DataFrame({"case_id": ["a"], "x": [-LESION_RAS[0]], "y": [-LESION_RAS[1]], "z": [LESION_RAS[2]]})
    lps = _cfg(center=("x", "y", "z"), space="LPS")
    src = roi_sources(lps, df)[0]
    assert np.allclose(src["roi_center"], LESION_RAS)
    out = apply_chain(preprocess_transforms(lps), {KEY: str(ct), **src})[KEY]
    assert out.shape == (2, 20, 20, 20)  # no mask channel for a point
    assert np.allclose(out.affine.numpy() @ np.array([9.5, 9.5, 9.5, 1.0]), [*LESION_RAS, 1.0], atol=1e-4)


def test_box_outside_the_scan_is_padded_with_air(tmp_path):
    ct, _ = _scene(tmp_path)
    out = apply_chain(preprocess_transforms(_cfg(center=("x", "y", "z"))), {KEY: str(ct), "roi_center": [500.0, 0, 0]})
    x = out[KEY]
    # the whole box holds the scan's darkest value (air, about -870 HU after smoothing), never tissue
    assert float(x[0].max() - x[0].min()) < 1e-4 and float(x[0].max()) < (-800 + 1000) / 1400
    assert float(x[1].max()) == 0.0


def test_missing_mask_or_centre_is_a_per_case_error(tmp_path):
    ct, mask = _scene(tmp_path)
    df = pd.DataFrame({"case_id": ["a", "b"], "lesion": ["mask.nii.gz", None]})
    srcs = roi_sources(_cfg(mask="lesion"), df, base_dir=tmp_path)
    assert srcs[0] == {"roi_mask": str(mask.resolve())}
    with pytest.raises(PreprocessError, match="neither a lesion mask nor a centre"):
        apply_chain(preprocess_transforms(_cfg(mask="lesion")), {KEY: str(ct), **srcs[1]})
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(empty))
    with pytest.raises(PreprocessError, match="empty.nii.gz: the lesion mask is empty"):
        apply_chain(preprocess_transforms(_cfg(mask="lesion")), {KEY: str(ct), "roi_mask": str(empty)})


def test_roi_config_validation():
    with pytest.raises(ConfigError, match="exactly one of 'mask'"):
        config_from_dict({"image": {"roi": {"size_mm": [30, 30, 30]}}})
    with pytest.raises(ConfigError, match="needs image.spacing"):
        config_from_dict({"image": {"spacing": None, "roi": {"mask": "m"}}})
    cfg = config_from_dict({"image": {"roi": {"center": ["x", "y", "z"], "space": "LPS", "size_mm": [20, 20, 10]}}})
    assert cfg.image.roi.center == ("x", "y", "z") and output_shape(cfg.image) == (10, 10, 5)
