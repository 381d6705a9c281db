"""Lesion descriptors against analytic truth: spheres and ellipsoids of known size and HU, on
isotropic and anisotropic CT-like grids, and inside the preprocessing chain (HU, not windowed)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from mmai.config import ImageConfig, IntensityConfig, RoiConfig
from mmai.transforms.descriptors import (
    DESCRIPTOR_NAMES,
    DESCRIPTORS_KEY,
    lesion_descriptors,
    mesh_area_volume,
)
from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms


def _grid(shape, spacing):
    """(I, J, K) physical coordinates (mm) centred on the grid's middle."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij")


def _chest_like(shape, spacing, lesion, hu=60.0, noise=20.0, seed=0):
    """A CT-like volume (lung -850 HU with noise) with the lesion voxels at ``hu`` + noise."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(-850.0, noise, shape)
    vol[lesion] = rng.normal(hu, noise, int(lesion.sum()))
    return vol


def _named(values):
    return dict(zip(DESCRIPTOR_NAMES, values, strict=True))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 2.0)])
def test_sphere_of_known_radius_and_hu(spacing):
    r, hu, sd = 9.0, 60.0, 20.0
    shape = tuple(int(np.ceil(48 / s)) for s in spacing)  # a 48 mm box, the lesion in its middle
    x, y, z = _grid(shape, spacing)
    ball = x**2 + y**2 + z**2 <= r**2
    d = _named(lesion_descriptors(_chest_like(shape, spacing, ball, hu, sd), ball, spacing))
    n = int(ball.sum())
    assert d["lesion_volume_mm3"] == pytest.approx(4 / 3 * np.pi * r**3, rel=0.04)
    assert d["lesion_volume_mm3"] == pytest.approx(n * np.prod(spacing))
    assert d["lesion_surface_mm2"] == pytest.approx(4 * np.pi * r**2, rel=0.2)
    assert 0.85 < d["lesion_sphericity"] <= 1.0
    assert 2 * r - max(spacing) <= d["lesion_max_diameter_mm"] <= 2 * r + max(spacing)
    for axis in ("major", "minor", "least"):  # a solid ball of radius r: 4 sqrt(r^2 / 5)
        assert d[f"lesion_{axis}_axis_mm"] == pytest.approx(4 * r / np.sqrt(5), rel=0.04)
    assert d["lesion_elongation"] == pytest.approx(1.0, abs=0.03)
    assert d["lesion_flatness"] == pytest.approx(1.0, abs=0.03)
    se = sd / np.sqrt(n)
    assert d["lesion_mean"] == pytest.approx(hu, abs=5 * se)
    assert d["lesion_std"] == pytest.approx(sd, rel=0.08)
    assert d["lesion_median"] == pytest.approx(hu, abs=8 * se)
    z = 1.2815516  # the 90th percentile of a standard normal
    assert d["lesion_p10"] == pytest.approx(hu - z * sd, abs=2.0)
    assert d["lesion_p90"] == pytest.approx(hu + z * sd, abs=2.0)
    assert d["lesion_p25"] < d["lesion_median"] < d["lesion_p75"]
    assert d["lesion_min"] < d["lesion_p10"] and d["lesion_max"] > d["lesion_p90"]
    assert abs(d["lesion_skewness"]) < 0.3 and abs(d["lesion_kurtosis"]) < 0.5  # Gaussian: 0 and 0 (excess)


def test_ellipsoid_gives_elongation_flatness_and_axes():
    a, b, c = 12.0, 6.0, 4.0  # semi-axes (mm) along x, y, z
    spacing = (0.8, 0.8, 1.0)
    shape = (40, 24, 16)
    x, y, z = _grid(shape, spacing)
    ell = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1.0
    d = _named(lesion_descriptors(np.zeros(shape), ell, spacing))
    assert d["lesion_elongation"] == pytest.approx(b / a, abs=0.03)
    assert d["lesion_flatness"] == pytest.approx(c / a, abs=0.03)
    assert d["lesion_major_axis_mm"] == pytest.approx(4 * a / np.sqrt(5), rel=0.03)
    assert d["lesion_least_axis_mm"] == pytest.approx(4 * c / np.sqrt(5), rel=0.08)
    assert 2 * a - 1.0 <= d["lesion_max_diameter_mm"] <= 2 * a + 1.0
    assert d["lesion_volume_mm3"] == pytest.approx(4 / 3 * np.pi * a * b * c, rel=0.05)
    assert d["lesion_sphericity"] < 0.85  # far from a ball
    # a constant lesion: spread 0, and skewness / kurtosis 0 by convention (not NaN)
    assert d["lesion_std"] == 0.0 and d["lesion_skewness"] == 0.0 and d["lesion_kurtosis"] == 0.0


def test_anisotropic_spacing_is_measured_in_millimetres():
    """The same physical ball on a 0.6 x 0.6 x 2.5 mm grid and on a 1 mm grid gives the same shape."""
    r = 8.0
    out = {}
    for spacing in ((1.0, 1.0, 1.0), (0.6, 0.6, 2.5)):
        shape = tuple(int(np.ceil(30 / s)) for s in spacing)
        x, y, z = _grid(shape, spacing)
        ball = x**2 + y**2 + z**2 <= r**2
        out[spacing] = _named(lesion_descriptors(np.full(shape, 40.0), ball, spacing))
    iso, aniso = out.values()
    for k in ("lesion_volume_mm3", "lesion_major_axis_mm", "lesion_least_axis_mm"):
        assert aniso[k] == pytest.approx(iso[k], rel=0.06), k
    assert aniso["lesion_max_diameter_mm"] == pytest.approx(iso["lesion_max_diameter_mm"], abs=2.5)
    assert aniso["lesion_elongation"] > 0.9 and aniso["lesion_flatness"] > 0.9


def test_mesh_of_a_box_of_voxels():
    """A 10^3-voxel cube (1 mm): the mesh through the edge midpoints is the 10 mm cube with its 12
    edges chamfered at 45 degrees (0.5 mm legs) and its 8 corners cut by triangles: area =
    6 x 9^2 flat + 12 x 9 x sqrt(2)/2 chamfers + 8 x sqrt(3)/8 corners; volume = 1000 - 12 x 10 /8
    + 8 x 1/12 (the chamfers overlap at the corners)."""
    area, volume = mesh_area_volume(np.ones((10, 10, 10), bool), (1.0, 1.0, 1.0))
    assert area == pytest.approx(6 * 81 + 54 * np.sqrt(2) + np.sqrt(3), abs=1e-6)
    assert volume == pytest.approx(1000 - 15 + 8 / 12, abs=1e-6)
    a2, v2 = mesh_area_volume(np.ones((10, 10, 10), bool), (2.0, 1.0, 1.0))  # in mm: scales with the spacing
    assert v2 == pytest.approx(2 * volume, rel=1e-9) and area < a2 < 2 * area


def test_empty_mask_gives_missing_values_not_zeros():
    out = lesion_descriptors(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), (1.0, 1.0, 1.0))
    assert out.shape == (len(DESCRIPTOR_NAMES),) and np.isnan(out).all()


def _raw_scene(tmp_path, hu=250.0):
    """A raw CT NIfTI (1 x 1 x 2.5 mm, lung at -850 HU) with a 7 mm ball at ``hu`` HU, and its mask
    on another (1 mm, shifted) grid."""
    shape, spacing = (80, 80, 32), (1.0, 1.0, 2.5)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-40.0, -40.0, -40.0]
    x, y, z = _grid(shape, spacing)
    centre = np.array([5.0, -3.0, 2.5])
    ball = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 7.0**2
    vol = _chest_like(shape, spacing, ball, hu=hu, noise=10.0).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "ct.nii.gz"))
    m_shape = (90, 90, 90)
    m_aff = np.eye(4)
    m_aff[:3, 3] = [-44.0, -45.0, -46.0]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in m_shape], indexing="ij"), -1) + m_aff[:3, 3]
    # the CT grid's centre is at its affine origin + (shape - 1) / 2 * spacing
    ct_centre = aff[:3, 3] + (np.array(shape) - 1) / 2 * np.array(spacing)
    mask = (np.linalg.norm(idx - (ct_centre + centre), axis=-1) <= 7.0).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, m_aff), str(tmp_path / "mask.nii.gz"))
    return tmp_path / "ct.nii.gz", tmp_path / "mask.nii.gz"


def test_chain_measures_hounsfield_units_before_windowing(tmp_path, caplog):
    ct, mask = _raw_scene(tmp_path, hu=250.0)
    cfg = ImageConfig(spacing=(1.5, 1.5, 1.5), antialias=False,
                      intensity=IntensityConfig(kind="windows", windows=((-1000, 400), (-160, 240))),
                      roi=RoiConfig(mask="lesion", size_mm=(30.0, 30.0, 30.0)))
    out = apply_chain(preprocess_transforms(cfg), {KEY: str(ct), "roi_mask": str(mask)})
    d = out[DESCRIPTORS_KEY]
    assert list(d) == list(DESCRIPTOR_NAMES)
    # HU (the windowed channels are in [0, 1]); the box's bilinear resampling mixes the rim with lung
    assert 150.0 < d["lesion_median"] < 260.0 and d["lesion_p90"] > 200.0
    assert d["lesion_volume_mm3"] == pytest.approx(4 / 3 * np.pi * 7.0**3, rel=0.15)
    assert out[KEY].shape == (3, 20, 20, 20) and float(out[KEY][:2].max()) <= 1.0
    # a box too small for the lesion: measured as cut, and said so
    small = ImageConfig(spacing=(1.5, 1.5, 1.5), antialias=False, intensity=cfg.intensity,
                        roi=RoiConfig(mask="lesion", size_mm=(9.0, 9.0, 9.0)))
    with caplog.at_level(logging.WARNING):
        cut = apply_chain(preprocess_transforms(small), {KEY: str(ct), "roi_mask": str(mask)})[DESCRIPTORS_KEY]
    assert cut["lesion_volume_mm3"] <= 9.0**3 < d["lesion_volume_mm3"]  # no more than the box holds
    assert "touches its" in caplog.text and "ct.nii.gz" in caplog.text
