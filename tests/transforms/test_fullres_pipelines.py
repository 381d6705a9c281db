"""Ready pipelines on real pixels, multi-window channels, anti-aliasing, and the FOV guard."""

from __future__ import annotations

import dataclasses
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mmai.config import FovConfig, ImageConfig, IntensityConfig, load_config
from mmai.errors import ConfigError, MmaiError, PreprocessError
from mmai.transforms.pipelines import KEY, apply_chain, image_channels, preprocess_transforms
from mmai.transforms.spatial import antialias, lost_fraction
from tests.data.real_pixels import ct_hu_slice, ct_series, mr_brain_nifti, mr_series


def ready(name: str) -> ImageConfig:
    cfg = load_config(f"pipelines/{name}.yaml").image
    return dataclasses.replace(cfg, cache="memory", cache_dir=None)


def test_ct_chest_two_windows_on_real_ct(tmp_path):
    cfg = ready("ct_chest")
    out = apply_chain(preprocess_transforms(cfg), {KEY: str(ct_series(tmp_path / "ct"))})
    x = out[KEY]
    assert x.shape[0] == 2 == image_channels(cfg)
    assert all(s % 32 == 0 for s in x.shape[1:])  # size: null -> padded to the window multiple
    assert np.allclose(np.linalg.norm(x.affine[:3, :3].numpy(), axis=0), 1.5)
    assert out["modality"] == "CT" and out["fov_lost_fraction"] == 0.0
    # the two channels are the two windows of the same HU values: soft tissue (~40 HU) is
    # 1040/1400 of the lung window and 200/400 of the mediastinal one
    hu = ct_hu_slice()
    assert hu.min() < -800 and hu.max() > 1000  # real air and bone in the slice
    lung, med = x[0].numpy(), x[1].numpy()
    soft = (med > 0.05) & (med < 0.95)  # voxels inside the mediastinal window
    assert soft.sum() > 1000
    hu_from_med = -160 + 400 * med[soft]
    hu_from_lung = -1000 + 1400 * lung[soft]
    assert np.allclose(hu_from_med, hu_from_lung, atol=2.0)


def test_ct_head_brain_and_bone_windows(tmp_path):
    cfg = ready("ct_head")
    x = apply_chain(preprocess_transforms(cfg), {KEY: str(ct_series(tmp_path / "ct"))})[KEY]
    brain, bone = x[0].numpy(), x[1].numpy()
    assert x.shape[0] == 2
    # bone (> 80 HU) saturates the brain window but not the bone window
    assert (brain >= 0.999).sum() > 100 and ((bone > 0.4) & (bone < 0.999)).sum() > 100


def test_mr_brain_percentile_stats_on_real_mr(tmp_path):
    import dataclasses

    default = ready("mr_brain")  # per-volume statistics: nothing fitted, raw inputs work as they are
    assert default.intensity.kind == "volume_percentile"
    x = apply_chain(preprocess_transforms(default), {KEY: str(mr_brain_nifti(tmp_path / "a.nii.gz"))})[KEY]
    inside = x[x != 0]
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    # the cohort-level option needs the statistics fitted on the training cases
    cfg = dataclasses.replace(default, intensity=dataclasses.replace(default.intensity, kind="percentile"))
    with pytest.raises(PreprocessError, match="fitted on the training"):
        apply_chain(preprocess_transforms(cfg), {KEY: str(mr_brain_nifti(tmp_path / "a.nii.gz"))})
    stats = {"lo": 100.0, "hi": 20000.0, "mean": 8000.0, "std": 4000.0}
    x = apply_chain(preprocess_transforms(cfg, stats=stats), {KEY: str(tmp_path / "a.nii.gz")})[KEY]
    assert x.shape[0] == 1 and float(x.max()) <= (20000 - 8000) / 4000 + 1e-5
    assert float((x == 0).float().mean()) > 0.2  # background (outside the head) is 0


def test_multi_window_config_and_errors():
    cfg = ImageConfig(intensity=IntensityConfig(kind="windows", windows=((-1000, 400), (-160, 240), (0, 80))))
    assert image_channels(cfg) == 3
    from mmai.config import config_from_dict

    with pytest.raises(ConfigError, match="windows"):
        config_from_dict({"image": {"intensity": {"kind": "windows"}}})
    with pytest.raises(ConfigError, match=r"windows\[0\]"):
        config_from_dict({"image": {"intensity": {"kind": "windows", "windows": [[400, -1000]]}}})


def _sphere(n: int = 61, radius_vox: float = 2.5, offset: float = 0.3) -> torch.Tensor:
    g = np.arange(n) - n // 2 - offset
    X, Y, Z = np.meshgrid(g, g, g, indexing="ij")
    return torch.from_numpy((np.sqrt(X**2 + Y**2 + Z**2) <= radius_vox).astype(np.float32) * 1000.0)[None]


@pytest.mark.parametrize("target", [6.0, 9.0])
def test_downsampling_keeps_a_small_sphere_integral(target):
    """A 5 mm bright sphere on a 1 mm grid resampled to 6 / 9 mm keeps its integral (sum x voxel volume)."""
    from monai.transforms import Spacing

    x = MetaTensor(_sphere(), affine=torch.eye(4, dtype=torch.float64))
    truth = float(x.sum())  # 1 mm^3 voxels
    smooth = antialias(x, [1.0] * 3, [target] * 3)
    assert abs(float(smooth.sum()) - truth) / truth < 1e-3  # smoothing itself keeps the sum
    errors = {}
    for name, vol in (("antialiased", smooth), ("plain", x)):
        out = Spacing(pixdim=[target] * 3, mode="bilinear", padding_mode="zeros")(MetaTensor(vol, affine=x.affine))
        errors[name] = abs(float(out.sum()) * target**3 - truth) / truth
    assert errors["antialiased"] < 0.03
    assert errors["plain"] > 0.10  # what the pipeline did before: the sphere falls between samples


def _body_volume(tmp_path, width_mm=200.0):
    """A 'chest' NIfTI: a 1 mm grid, body (40 HU) box of width_mm in x, air elsewhere."""
    arr = np.full((240, 120, 40), -1000.0, np.float32)
    half = int(width_mm // 2)
    arr[120 - half:120 + half, 20:100, :] = 40.0
    path = tmp_path / "body.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path, arr


def test_fov_that_cuts_the_body_is_an_error_naming_file_and_fraction(tmp_path):
    path, _ = _body_volume(tmp_path)
    cfg = ImageConfig(spacing=(2.0, 2.0, 2.0), size=(64, 64, 32))  # 128 mm box, 200 mm body
    with pytest.raises(PreprocessError, match=r"body\.nii\.gz.*would cut 36\.\d% of the body"):
        apply_chain(preprocess_transforms(cfg), {KEY: str(path)})


def test_fov_crop_mode_logs_and_records_the_fraction(tmp_path, caplog):
    path, _ = _body_volume(tmp_path)
    cfg = ImageConfig(spacing=(2.0, 2.0, 2.0), size=(64, 64, 32), fov=FovConfig(mode="crop"))
    with caplog.at_level(logging.WARNING):
        out = apply_chain(preprocess_transforms(cfg), {KEY: str(path)})
    assert out[KEY].shape[1:] == (64, 64, 32)
    assert out["fov_lost_fraction"] == pytest.approx(0.36, abs=0.02)
    assert "of the foreground lost" in caplog.text


def test_default_grid_keeps_the_whole_body(tmp_path):
    path, arr = _body_volume(tmp_path, width_mm=230.0)
    out = apply_chain(preprocess_transforms(ImageConfig()), {KEY: str(path)})  # defaults: 2 mm, size null
    x = out[KEY]
    assert out["fov_lost_fraction"] == 0.0
    assert all(s % 16 == 0 for s in x.shape[1:])
    # window [-1000, 1000] -> air 0, body (40 HU) 0.52: the body volume is the integral / 0.52
    body_mm3 = float(x[0].sum()) / 0.52 * 8.0
    assert body_mm3 == pytest.approx(float((arr > -500).sum()), rel=0.02)


def test_lost_fraction_matches_center_crop():
    fg = torch.zeros((1, 10, 4, 4))
    fg[:, 0] = 1  # one face: 16 voxels, cut by a centre crop to 8 (drops index 0 and 9)
    fg[:, 5] = 1
    assert lost_fraction(fg, (8, 4, 4)) == pytest.approx(0.5)
    assert lost_fraction(fg, (10, 4, 4)) == 0.0


def test_modality_guard_refuses_mr_series_in_ct_pipeline(tmp_path):
    folder = str(mr_series(tmp_path / "mr"))
    with pytest.raises(MmaiError, match="modality MR not in"):  # the pipeline's series selection
        apply_chain(preprocess_transforms(ready("ct_chest")), {KEY: folder})
    no_rule = dataclasses.replace(ready("ct_chest"), select=None)  # without one, image.modality refuses it
    with pytest.raises(PreprocessError, match="series modality is MR.*allowed: CT"):
        apply_chain(preprocess_transforms(no_rule), {KEY: folder})
