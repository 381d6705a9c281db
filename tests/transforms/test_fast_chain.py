"""The fast preprocessing chain (default) gives the reference chain's output to float32 rounding.

The reference is ``preprocess_transforms(..., fast=False)``: MONAI's LoadImaged, Orientationd,
AntiAliasd, Spacingd step by step (the chain before issue 18).
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from mmai.config import ImageConfig, load_config
from mmai.transforms.pipelines import KEY, apply_chain, preprocess_transforms
from mmai.transforms.resample import FastResampled, apply_axis, apply_axis_from, axis_matrix
from tests.data.real_pixels import ct_series, mr_brain_nifti

TOL = 2e-5  # windowed output in [0, 1]: float32 rounding of sums of ~20 terms of HU-sized values


def ready(name: str, **kw) -> ImageConfig:
    cfg = load_config(f"pipelines/{name}.yaml").image
    return dataclasses.replace(cfg, cache="memory", cache_dir=None, **kw)


def both(cfg: ImageConfig, source, **kw) -> tuple[dict, dict]:
    ref = apply_chain(preprocess_transforms(cfg, fast=False, **kw), {KEY: source})
    fast = apply_chain(preprocess_transforms(cfg, fast=True, **kw), {KEY: source})
    return ref, fast


def assert_same(ref: dict, fast: dict) -> None:
    a, b = ref[KEY], fast[KEY]
    assert tuple(a.shape) == tuple(b.shape)
    assert torch.allclose(a.affine, b.affine, atol=1e-9), (a.affine, b.affine)
    diff = (a.as_tensor() - b.as_tensor()).abs().max()
    assert float(diff) <= TOL, float(diff)
    assert ref.get("fov_lost_fraction") == fast.get("fov_lost_fraction")
    assert ref.get("modality") == fast.get("modality")
    assert b.dtype == torch.float32 and b.is_contiguous()


def synthetic_ct(path, affine: np.ndarray, shape=(150, 130, 60), seed: int = 0):
    """An int16 chest-like NIfTI: air, an ellipsoid body (40 HU), a lung (-850 HU), noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    vol = np.full(shape, -1000.0)
    vol[(x / (0.4 * shape[0])) ** 2 + (y / (0.33 * shape[1])) ** 2 + (z / (0.45 * shape[2])) ** 2 < 1] = 40
    vol[((x - 0.15 * shape[0]) / (0.12 * shape[0])) ** 2 + (y / (0.2 * shape[1])) ** 2 < 1] = -850
    vol = (vol + rng.normal(0, 30, shape)).astype(np.int16)
    img = nib.Nifti1Image(vol, affine)
    img.set_data_dtype(np.int16)
    nib.save(img, str(path))
    return path


def _affine(kind: str) -> np.ndarray:
    a = np.diag([0.8, 0.75, 1.25, 1.0])
    a[:3, 3] = [-60.3, -48.1, 12.7]
    if kind == "lps":  # the DICOM-like x/y flips
        a[0, 0], a[1, 1] = -0.8, -0.75
    elif kind == "permuted":  # i runs along y, j along x
        a[:3, :3] = [[0, 0.75, 0], [0.8, 0, 0], [0, 0, 1.25]]
    elif kind == "oblique":  # 10 degrees about z: not separable, MONAI's resampling
        c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
        a[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.75, 1.25])
    return a


@pytest.mark.parametrize("kind", ["ras", "lps", "permuted", "oblique"])
def test_fast_chain_equals_reference_on_synthetic_ct(tmp_path, kind):
    path = synthetic_ct(tmp_path / f"{kind}.nii", _affine(kind))
    assert_same(*both(ready("ct_chest"), str(path)))


@pytest.mark.parametrize("pipeline", ["ct_chest", "ct_head"])
def test_fast_chain_equals_reference_on_real_ct_dicom(tmp_path, pipeline):
    folder = str(ct_series(tmp_path / "ct", k=24))
    assert_same(*both(ready(pipeline), folder))


def test_fast_chain_equals_reference_on_a_compressed_nifti_and_defaults(tmp_path):
    path = synthetic_ct(tmp_path / "ct.nii.gz", _affine("lps"), seed=3)
    assert_same(*both(ImageConfig(), str(path)))  # 2 mm, one window, no fixed foreground
    assert_same(*both(ImageConfig(antialias=False, size=(64, 64, 48)), str(path)))  # fixed grid, no pre-crop


def test_fast_chain_equals_reference_on_real_mr(tmp_path):
    path = str(mr_brain_nifti(tmp_path / "mr.nii.gz"))
    stats = {"lo": 10.0, "hi": 400.0, "mean": 150.0, "std": 60.0}
    assert_same(*both(ready("mr_brain"), path, stats=stats))  # automatic threshold: no pre-crop
    ref, fast = both(ready("mr_brain"), path, raw=True)
    assert torch.allclose(ref[KEY].as_tensor(), fast[KEY].as_tensor(), atol=1e-3)
    assert torch.equal(ref["fg"].as_tensor(), fast["fg"].as_tensor())


def test_fast_chain_on_a_metatensor_without_loading(tmp_path):
    vol = synthetic_ct(tmp_path / "a.nii", _affine("ras"))
    img = nib.load(str(vol))
    x = MetaTensor(torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None],
                   affine=torch.as_tensor(img.affine))
    ref = apply_chain(preprocess_transforms(ready("ct_chest"), load=False, fast=False), {KEY: x.clone()})
    fast = apply_chain(preprocess_transforms(ready("ct_chest"), load=False), {KEY: x.clone()})
    assert_same(ref, fast)


def test_precrop_computes_only_the_body_region(tmp_path):
    """The resampled box is cut to where the body can be (+ margin), before the body crop."""
    path = synthetic_ct(tmp_path / "ct.nii", _affine("ras"))
    chain = preprocess_transforms(ready("ct_chest"))
    d = {KEY: str(path)}
    for t in chain.transforms:
        d = t(d)
        if isinstance(t, FastResampled):
            break
    cut = d[KEY].shape[1:]
    full = preprocess_transforms(ready("ct_chest", crop_foreground=False))
    d2 = {KEY: str(path)}
    for t in full.transforms:
        d2 = t(d2)
        if isinstance(t, FastResampled):
            break
    assert d2[KEY].shape[1:] == (80, 66, 50)  # MONAI's whole output grid
    assert cut[1] < 0.8 * 66 and cut[2] <= 50, cut  # the body: 66 % of y


def test_axis_matrix_is_smoothing_then_linear_interpolation():
    m = axis_matrix(10, np.arange(5), 2.0, 0.5, sigma=0.0)
    assert m.shape == (5, 10)
    np.testing.assert_allclose(m.sum(1), 1.0)
    np.testing.assert_allclose(m[1, 2:4], [0.5, 0.5])  # position 2.5
    smooth = axis_matrix(10, np.arange(5), 2.0, 0.5, sigma=1.0)
    np.testing.assert_allclose(smooth.sum(1), 1.0)
    assert (smooth[2] > 0).sum() > 2  # the Gaussian's support, replicated at the border


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_apply_axis_is_the_matrix_along_one_axis(axis):
    """The banded, in-place BLAS products equal a dense float64 tensordot along the axis; so does
    the slab-wise first pass over a strided int16 view (a cropped, memory-mapped NIfTI)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 29, 53, generator=gen) * 300
    m = axis_matrix(x.shape[axis], np.arange(19), 2.3, 0.4, sigma=1.1)

    def dense(v: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(v.double(), torch.as_tensor(m), dims=([axis], [1])).movedim(-1, axis)

    y = apply_axis(x, m, axis, block=5)
    assert y.is_contiguous() and y.dtype == torch.float32
    assert float((y - dense(x)).abs().max()) < 1e-3
    assert torch.equal(apply_axis(x, m, axis), apply_axis(x, m, axis, out=torch.empty_like(y)))
    if axis:
        big = (x * 3).to(torch.int16).permute(2, 1, 0).contiguous().permute(2, 1, 0)  # column-major
        view = big[2:35]  # cropped: not contiguous
        m2 = axis_matrix(view.shape[axis], np.arange(19), 1.4, 0.2, sigma=0.7)
        y2 = apply_axis_from(view, m2, axis, slab_voxels=3 * 29 * 53)  # several slabs, a short last one
        ref = torch.tensordot(view.double(), torch.as_tensor(m2), dims=([axis], [1])).movedim(-1, axis)
        assert y2.dtype == torch.float32 and float((y2 - ref).abs().max()) < 1e-3


@pytest.mark.parametrize("b_min,b_max", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_windows_in_place_are_bitwise_the_reference_windows(b_min, b_max):
    from mmai.transforms.fastchain import window_into
    from mmai.transforms.intensity import window_channels

    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(1, 23, 19, 17, generator=gen) * 3000 - 1500).permute(0, 3, 2, 1)  # not contiguous
    windows = [(-1000, 400), (-160, 240), (0, 80)]
    ref = window_channels(x, windows, b_min, b_max)
    out = torch.full((3, 19, 17, 27), 7.0).permute(0, 2, 1, 3)  # strided destination, larger than the source
    for c, (lo, hi) in enumerate(windows):
        window_into(out[c, :, :, 2:25], x[0], lo, hi, b_min, b_max)
    assert torch.equal(out[:, :, :, 2:25], ref)
    assert bool((out[:, :, :, :2] == 7.0).all()) and bool((out[:, :, :, 25:] == 7.0).all())


@pytest.mark.parametrize("layout", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_mask_box_is_monais_bounding_box_in_any_memory_order(layout):
    from monai.transforms.utils import generate_spatial_bounding_box

    from mmai.transforms.fastchain import mask_box
    from mmai.transforms.pipelines import _AboveThreshold

    gen = torch.Generator().manual_seed(2)
    m = torch.zeros(31, 27, 23, dtype=torch.uint8)
    m[3:29, 1:25, 6:21] = (torch.rand(26, 24, 15, generator=gen) > 0.97).to(torch.uint8)
    m[0, 26, 22] = 1  # a corner voxel: the margin is clipped at the image edge
    inv = np.argsort(layout).tolist()
    fg = m.permute(*layout).contiguous().permute(*inv)[None]  # same values, another memory order
    for margin in (0, 2):
        ref = generate_spatial_bounding_box(fg, _AboveThreshold(0.5), None, margin, True)
        assert mask_box(fg, margin) == (list(ref[0]), list(ref[1]))
    m[0, 26, 22] = 0
    assert mask_box((m * 0)[None], 2) is None


@pytest.mark.parametrize("size", [(48, 40, 24), (96, 80, 64), (40, 96, 30)])
def test_fit_and_windows_in_one_step_on_a_fixed_grid(tmp_path, size):
    """A fixed ``size`` that cuts the body (fov: crop), pads it, or both at once: the fused fit +
    windows step gives the reference's grid, values, padding and lost fraction."""
    from mmai.transforms.fastchain import FitWindowsd

    path = synthetic_ct(tmp_path / "ct.nii", _affine("lps"), seed=5)
    base = ready("ct_chest")
    cfg = dataclasses.replace(base, size=size, fov=dataclasses.replace(base.fov, mode="crop"))
    assert any(isinstance(t, FitWindowsd) for t in preprocess_transforms(cfg).transforms)
    ref, fast = both(cfg, str(path))
    assert_same(ref, fast)
    assert tuple(fast[KEY].shape[1:]) == size
    if size == (48, 40, 24):
        assert fast["fov_lost_fraction"] > 0.1


@pytest.mark.parametrize("dtype", [">i2", "float64", "float32", "int8-scaled"])
def test_stored_dtypes_and_byte_orders_of_a_nifti(tmp_path, dtype):
    """Stored int16 / float32 stay as stored until the resampling reads them; big-endian, float64
    and scaled data are converted to float32 at load, as the reference does."""
    src = synthetic_ct(tmp_path / "src.nii", _affine("lps"), seed=7)
    img = nib.load(str(src))
    vol = np.asarray(img.dataobj)
    path = tmp_path / "ct.nii"
    if dtype == "int8-scaled":  # HU / 16 stored as int8, scl_slope 16
        out = nib.Nifti1Image(np.clip(vol // 16, -128, 127).astype(np.int8), img.affine)
        out.header.set_slope_inter(16.0, 0.0)
    else:
        header = nib.Nifti1Header(endianness=">" if dtype.startswith(">") else "<")
        header.set_data_dtype(np.dtype(dtype).newbyteorder("="))
        out = nib.Nifti1Image(vol.astype(dtype), img.affine, header=header)
    nib.save(out, str(path))
    if dtype == ">i2":
        assert np.asanyarray(nib.load(str(path)).dataobj).dtype == np.dtype(">i2")  # really big-endian on disk
    assert_same(*both(ready("ct_chest"), str(path)))
