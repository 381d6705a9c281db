"""Disk cache keyed by file content + pipeline id: hits on re-read, misses on any change; no pickle."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np

from mmai.config import ImageConfig
from mmai.data.cache import cache_key, content_hash
from mmai.data.dataset import ImageLoader, MultimodalDataset
from tests.data.real_pixels import ct_hu_slice


def _ct(path, add=0.0):
    vol = np.repeat(ct_hu_slice()[:, :, None], 8, axis=2) + add
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([0.66, 0.66, 5.0, 1.0])), str(path))
    return str(path)


def _cfg(tmp_path, **kw):
    return ImageConfig(**{"spacing": (2.0, 2.0, 5.0), "cache": "disk", "cache_dir": str(tmp_path / "cache"), **kw})


def test_second_read_hits_the_cache_and_equals_the_first(tmp_path):
    src = _ct(tmp_path / "ct.nii.gz")
    loader = ImageLoader(_cfg(tmp_path))
    a1, aff1 = loader.load(src)
    assert (loader.disk.hits, loader.disk.misses) == (0, 1)
    a2, aff2 = ImageLoader(_cfg(tmp_path)).load(src)  # a new loader (another process) finds it on disk
    fresh = ImageLoader(_cfg(tmp_path))
    fresh.load(src)
    assert fresh.disk.hits == 1 and fresh.disk.misses == 0
    # a hit still records what the first read learned (the run's state records the input modalities)
    assert fresh.modalities_seen == loader.modalities_seen and fresh.modalities_seen
    assert np.array_equal(a1, a2) and np.allclose(aff1, aff2)
    files = sorted(p.suffix for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == [".json", ".npy"]  # no pickle
    np.load(next((tmp_path / "cache").rglob("*.npy")), allow_pickle=False)


def test_changed_pipeline_or_content_misses(tmp_path):
    src = _ct(tmp_path / "ct.nii.gz")
    ImageLoader(_cfg(tmp_path)).load(src)
    other = ImageLoader(_cfg(tmp_path, spacing=(3.0, 3.0, 5.0)))
    arr, _ = other.load(src)
    assert other.disk.misses == 1 and other.disk.hits == 0 and arr.shape[1] != 43
    _ct(tmp_path / "ct.nii.gz", add=10.0)  # same name, new content
    again = ImageLoader(_cfg(tmp_path))
    again.load(src)
    assert again.disk.misses == 1 and again.disk.hits == 0


def test_content_hash_of_a_folder_and_key_parts(tmp_path):
    d = tmp_path / "series"
    d.mkdir()
    (d / "1.dcm").write_bytes(b"abc")
    h1 = content_hash(d)
    (d / "1.dcm").write_bytes(b"abd")
    assert content_hash(d) != h1
    assert cache_key(str(d), "p1") != cache_key(str(d), "p2")
    assert cache_key(str(d), "p1", {"roi": {"roi_center": [1, 2, 3]}}) != cache_key(str(d), "p1")


def test_disk_mode_does_not_hold_volumes_in_ram(tmp_path):
    src = _ct(tmp_path / "ct.nii.gz")
    ds = MultimodalDataset(["a"], image_paths=[src], image_cfg=_cfg(tmp_path))
    ds.preload()
    assert ds._cache == {} and ds.loader.disk.misses == 1
    x = ds[0]["image"]
    assert ds.loader.disk.hits == 1 and x.shape[0] == 1
    mem = MultimodalDataset(["a"], image_paths=[src], image_cfg=dataclasses.replace(_cfg(tmp_path), cache="memory"))
    mem.preload()
    assert len(mem._cache) == 1  # small grids stay in RAM
