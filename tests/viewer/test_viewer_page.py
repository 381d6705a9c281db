"""The offline 3D viewer page: volumes embedded (decoded back = the source within downsampling and
quantisation), nothing fetched, and in headless Chromium: renders, draws the scan and the map,
the opacity control works, no console message."""

from __future__ import annotations

import base64
import gzip
import re

import nibabel as nib
import numpy as np
import pytest

from mmai.errors import MmaiError
from mmai.viewer import read_cases, write_case_page
from mmai.viewer.page import niivue_bundle
from mmai.viewer.volumes import block_reduce, decode, downsampled_affine, prepare
from tests.viewer.chromium import HAVE_CHROMIUM, SKIP_REASON, grey_levels, render, warm_mask, warm_pixels

AFFINE = np.array([[-0.8, 0, 0, 60.0], [0, 0.9, 0, -50.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1.0]])  # x flipped
SHAPE = (150, 120, 40)
PEAK = (40, 70, 22)


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A CT-like body (air -1000, tissue ~40 HU with noise) and a gaussian map peaking at PEAK."""
    g = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
    body = ((g[0] - 75) / 60) ** 2 + ((g[1] - 60) / 50) ** 2 + ((g[2] - 20) / 18) ** 2 < 1
    img = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 20, SHAPE)
    sal = np.exp(-sum((g[i] - PEAK[i]) ** 2 for i in range(3)) / 40.0).astype(np.float32)
    return img.astype(np.float32), sal


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    img, sal = phantom()
    g = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
    att = np.exp(-((g[0] - 110) ** 2 + (g[1] - 40) ** 2 + (g[2] - 22) ** 2) / 60.0).astype(np.float32)
    path = tmp_path_factory.mktemp("viewer") / "c7_viewer.html"
    write_case_page(path, img, {"saliency": sal, "attention": att}, AFFINE, case_id="c7",
                    facts=[("model", "m-1"), ("prob_1", "0.873")], max_dim=64)
    return path


def test_block_reduce_and_affine_keep_world_positions():
    arr = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    mean = block_reduce(arr, (2, 2, 1), "mean")
    assert mean.shape == (3, 2, 3)
    np.testing.assert_allclose(mean[0, 0, 0], arr[0:2, 0:2, 0].mean())
    np.testing.assert_allclose(mean[2, 1, 2], arr[4:5, 2:4, 2].mean())  # the short last block: its own voxels
    np.testing.assert_allclose(block_reduce(arr, (2, 2, 1), "max")[2, 1, 2], arr[4, 3, 2])
    # the new voxel (i, j, k) sits at the centre of its block in world space
    aff = downsampled_affine(AFFINE, (2, 2, 1))
    centre = (AFFINE @ np.array([0.5, 0.5, 0.0, 1.0]))[:3]
    np.testing.assert_allclose((aff @ np.array([0, 0, 0, 1.0]))[:3], centre)


def test_page_embeds_the_volumes_within_downsampling(page):
    img, sal = phantom()
    (case,) = read_cases(page)
    assert case["factors"] == [3, 2, 1] and case["shape"] == [50, 60, 40] and case["source_shape"] == list(SHAPE)
    assert [tuple(f) for f in case["facts"]] == [("case", "c7"), ("model", "m-1"), ("prob_1", "0.873")]
    back = decode(case["image"])
    assert back.get_data_dtype() == np.uint8  # quantised, with scl_slope / scl_inter back to HU
    lo, hi = case["image_range"]
    ref = np.clip(block_reduce(img, (3, 2, 1), "mean"), lo, hi)
    np.testing.assert_allclose(np.asarray(back.dataobj, np.float32), ref, atol=(hi - lo) / 255 / 2 + 1e-3)
    np.testing.assert_allclose(back.affine, downsampled_affine(AFFINE, (3, 2, 1)), atol=1e-5)
    sal_back = np.asarray(decode(case["maps"]["saliency"]).dataobj, np.float32)
    np.testing.assert_allclose(sal_back, block_reduce(sal, (3, 2, 1), "max"), atol=1 / 255 / 2 + 1e-6)
    assert set(case["maps"]) == {"saliency", "attention"}
    # the crosshair starts on the map's peak, in world mm (block of PEAK)
    np.testing.assert_allclose(case["peak"], [PEAK[0] // 3, PEAK[1] // 2, PEAK[2]])
    np.testing.assert_allclose(case["peak_mm"], (back.affine @ np.array([*case["peak"], 1.0]))[:3], atol=1e-4)


def test_page_is_self_contained(page):
    text = page.read_text()
    assert not re.search(r"https?://", text, re.I)  # nothing to fetch, not even a link
    assert not re.search(r"\s(src|href)\s*=", text, re.I)  # no external file of any kind
    assert "BSD 2-Clause License" in text and "Copyright (c) 2021, Niivue" in text
    version, _, packed = niivue_bundle()
    assert f"NiiVue {version}" in text and packed in text
    # the inlined bundle is the vendored file
    from importlib import resources

    vendored = resources.files("mmai").joinpath("assets/niivue/niivue.umd.js").read_bytes()
    assert gzip.decompress(base64.b64decode(packed)) == vendored
    assert page.stat().st_size < 3_000_000


def test_the_vendored_build_ships_with_the_package():
    """pyproject's package-data names the assets, and they are all there (a wheel carries them)."""
    import tomllib
    from importlib import resources
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mmai"]
    assert "assets/niivue/*" in data
    assets = resources.files("mmai").joinpath("assets/niivue")
    for name in ("niivue.umd.js", "LICENSE", "THIRD-PARTY-LICENSES.txt", "VERSION", "README.md"):
        assert assets.joinpath(name).is_file(), name
    assert "BSD 2-Clause" in assets.joinpath("LICENSE").read_text()
    assert assets.joinpath("VERSION").read_text().strip() in assets.joinpath("README.md").read_text()


def test_maps_must_lie_on_the_scan_grid():
    img, sal = phantom()
    with pytest.raises(MmaiError, match="map 'saliency' has shape"):
        prepare(img, {"saliency": sal[:-1]}, AFFINE)
    with pytest.raises(MmaiError, match="3-D"):
        prepare(img[..., 0], {}, AFFINE)


def test_real_nifti_units_survive_the_round_trip(tmp_path):
    """A map saved as explain writes it (float32 NIfTI) and read back from the page: same values."""
    img, sal = phantom()
    p = write_case_page(tmp_path / "x.html", img, {"saliency": sal}, AFFINE, case_id="x", facts=[], max_dim=200)
    case = read_cases(p)[0]
    assert case["factors"] == [1, 1, 1]
    out = decode(case["maps"]["saliency"])
    nib.save(out, str(tmp_path / "s.nii.gz"))
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "s.nii.gz").dataobj), sal, atol=1 / 510 + 1e-6)


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_page_renders_offline_in_chromium(page):
    got, console, pixels = render(page)
    assert got["state"] == "ready", got
    assert console == "", console  # no console error, warning or message
    assert got["maps"] == ["saliency", "attention"] and got["cases"] == ["c7"]
    assert "prob_1\t0.873" in got["facts"]
    h, w, _ = pixels.shape
    assert h > 300 and w > 800
    assert pixels.std() > 20  # not blank
    assert grey_levels(pixels) > 50  # the scan's slices are drawn
    assert warm_pixels(pixels) > 500  # and the map over them
    # radiological convention: the map lies on the patient's right (world x = 60 - 0.8 * 40 = +28 mm,
    # RAS), so in the axial plane (the left third of the canvas) it is drawn left of the middle
    axial = warm_mask(pixels)[:, : w // 3]
    cols = np.nonzero(axial)[1]
    assert len(cols) > 100 and cols.mean() < w / 6 - 30, (cols.mean(), w / 6)


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_opacity_control_hides_the_map(page):
    got, console, pixels = render(page, [("mmai-viewer-opacity", "0", "input")])
    assert got["state"] == "ready" and console == ""
    assert grey_levels(pixels) > 50
    assert warm_pixels(pixels) < 50  # the map is gone (the colour bar is left: it shows the colours)


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_map_selector_shows_the_other_map(page):
    _, _, sal_px = render(page)
    got, console, att_px = render(page, [("mmai-viewer-map", "attention", "change")])
    assert got["state"] == "ready" and console == ""
    a, b = warm_mask(sal_px), warm_mask(att_px)
    assert a.sum() > 300 and b.sum() > 300
    assert (a & b).sum() < 0.2 * min(a.sum(), b.sum())  # another place: the attention blob, not the saliency's


@pytest.mark.skipif(not HAVE_CHROMIUM, reason=SKIP_REASON)
def test_a_broken_volume_is_an_error_on_the_page_and_the_console(page, tmp_path):
    """The checks above can fail: a corrupt embedded volume is reported, not drawn silently."""
    text = page.read_text()
    (case,) = read_cases(page)
    bad = tmp_path / "bad_viewer.html"
    bad.write_text(text.replace(case["image"], base64.b64encode(b"not a nifti" * 50).decode()))
    got, console, pixels = render(bad)
    assert got["state"] == "error", got
    assert "mmai viewer" in console
