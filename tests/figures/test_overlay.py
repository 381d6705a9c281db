"""Overlays as a user sees them: measured on the rendered pixels and the figure's objects.

A marker in the patient's LEFT must appear on the image's RIGHT of the axial and coronal panels
(radiological convention), identically for an RAS, an LPS and an axis-permuted file of the same
phantom; a sphere on 0.7 x 0.7 x 5 mm voxels must be drawn round; letters, mm positions, one grey
window and a labelled colour bar must be there.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmai.errors import MmaiError
from mmai.figures.overlay import (
    MapLayer,
    canonical,
    figure_rgb,
    overlay_figure,
    pipeline_window,
    prediction_title,
    write_overlay_png,
)

SHAPE = (40, 36, 20)  # RAS voxel order
SPACING = (1.5, 1.5, 2.5)


def _ras_phantom():
    """Body block + a marker at the patient's left (low x in RAS), anterior (high y), mid z."""
    rng = np.random.default_rng(0)
    img = rng.normal(0, 5, SHAPE).astype(np.float32)
    img[5:35, 5:31, 3:17] += 100
    marker = np.zeros(SHAPE, np.float32)
    marker[6:12, 24:30, 8:12] = 1.0  # left, anterior
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = (-30.0, -27.0, -25.0)
    return img, marker, aff


def _to_lps(arr, aff):
    """The same phantom stored LPS: voxel axes 0 and 1 flipped, affine adjusted (same world points)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = arr.shape[0] - 1, arr.shape[1] - 1
    return arr[::-1, ::-1, :].copy(), aff @ flip


def _to_zyx(arr, aff):
    """The same phantom with the voxel axes stored in (z, y, x) order."""
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = perm[3, 3] = 1.0
    return np.transpose(arr, (2, 1, 0)).copy(), aff @ perm


def _layer(marker):
    return MapLayer("marker", marker, "marker (1 = inside)", cmap="inferno", threshold=0.5)


def _panel(fig, name):
    (ax,) = [a for a in fig.axes if a.get_label() == name]
    return ax


def _marker_pixels(fig, rgb, name):
    """(rows, cols) of the marker's colour (inferno's top: pale yellow) inside one panel, relative
    to the panel's centre, in [-0.5, 0.5] (cols: right positive; rows: up positive)."""
    ax = _panel(fig, name)
    h = rgb.shape[0]
    bb = ax.get_window_extent()
    x0, x1, y0, y1 = int(bb.x0), int(bb.x1), int(h - bb.y1), int(h - bb.y0)
    crop = rgb[y0:y1, x0:x1].astype(int)
    hit = (crop[..., 0] > 200) & (crop[..., 1] > 200) & (crop[..., 2] > 100) & (crop[..., 2] < 200)
    rows, cols = np.nonzero(hit)
    assert rows.size > 20, f"marker not drawn in {name}"
    return 0.5 - rows.mean() / crop.shape[0], cols.mean() / crop.shape[1] - 0.5, rows, cols


def test_left_marker_is_on_the_image_right_for_ras_lps_and_permuted_files():
    img, marker, aff = _ras_phantom()
    renders = []
    for conv in (lambda a, f: (a, f), _to_lps, _to_zyx):
        i2, f2 = conv(img, aff)
        m2, _ = conv(marker, aff)
        fig = overlay_figure(i2, f2, [_layer(m2)], title="phantom")
        rgb = figure_rgb(fig)
        up, right, _, _ = _marker_pixels(fig, rgb, "axial:marker")
        assert right > 0.15, f"axial: marker (patient left) not on the image right: {right:.2f}"
        assert up > 0.1, f"axial: marker (anterior) not at the top: {up:.2f}"
        _, right_c, _, _ = _marker_pixels(fig, rgb, "coronal:marker")
        assert right_c > 0.15, f"coronal: patient left not on the image right: {right_c:.2f}"
        _, right_s, _, _ = _marker_pixels(fig, rgb, "sagittal:marker")
        assert right_s < -0.1, f"sagittal: anterior not on the image left: {right_s:.2f}"
        renders.append(rgb)
    np.testing.assert_array_equal(renders[0], renders[1])  # LPS file drawn exactly as the RAS file
    np.testing.assert_array_equal(renders[0], renders[2])


def test_canonical_keeps_world_positions():
    img, marker, aff = _ras_phantom()
    lps, lps_aff = _to_lps(marker, aff)
    out, out_aff = canonical(lps, lps_aff)
    np.testing.assert_array_equal(out, marker)
    np.testing.assert_allclose(out_aff, aff, atol=1e-9)


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_sphere_on_anisotropic_voxels_is_drawn_round(plane):
    sp = (0.7, 0.7, 5.0)
    shape = (60, 60, 9)
    ii = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(sum(((ii[a] - centre[a]) * sp[a]) ** 2 for a in range(3)))
    sphere = (r <= 12.5).astype(np.float32)
    aff = np.diag([*sp, 1.0])
    fig = overlay_figure(sphere * 50, aff, [_layer(sphere)], title="sphere")
    rgb = figure_rgb(fig)
    _, _, rows, cols = _marker_pixels(fig, rgb, f"{plane}:marker")
    ratio = (np.ptp(cols) + 1) / (np.ptp(rows) + 1)  # width / height in screen pixels
    assert 0.8 < ratio < 1.25, f"{plane}: a 25 mm sphere drawn with width/height {ratio:.2f}"
    ax = _panel(fig, f"{plane}:marker")
    assert ax.get_aspect() == 1.0  # axes in mm, equal scale
    x0, x1, y0, y1 = ax.images[0].get_extent()
    assert abs(y1 - y0) == pytest.approx(shape[2] * sp[2])  # the image spans its mm extent


def test_letters_positions_window_colour_bar_and_title():
    img, marker, aff = _ras_phantom()
    layers = [_layer(marker), MapLayer("attention", marker * 0.5, "attention, scaled to its maximum", cmap="viridis")]
    fig = overlay_figure(img, aff, layers, title="case c0 | model m1 | P(1) = 0.830, predicted 1")
    want = {"axial": {"R", "L", "A", "P"}, "coronal": {"R", "L", "S", "I"}, "sagittal": {"A", "P", "S", "I"}}
    clims = set()
    for layer in ("marker", "attention"):
        for plane, letters in want.items():
            ax = _panel(fig, f"{plane}:{layer}")
            assert {t.get_text() for t in ax.texts} == letters
            assert ax.get_title().endswith(" mm") and plane in ax.get_title()
            clims.add(ax.images[0].get_clim())
        cax = _panel(fig, f"colorbar:{layer}")
        assert "scaled" in cax.get_ylabel() or "1 = inside" in cax.get_ylabel()
    assert len(clims) == 1  # one greyscale window for every panel
    assert "P(1) = 0.830" in fig._suptitle.get_text()
    assert "one window for all panels" in fig._supxlabel.get_text()
    # the cut goes through the marker: the axial panel's z is the marker's centre in mm
    assert _panel(fig, "axial:marker").get_title() == "axial  z = -5.0 mm"


def test_write_png_and_bad_input(tmp_path):
    img, marker, aff = _ras_phantom()
    out = write_overlay_png(tmp_path / "o.png", img, aff, [_layer(marker)], title="t")
    assert out.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["o.png"]
    with pytest.raises(MmaiError, match="shape"):
        overlay_figure(img, aff, [_layer(marker[:-1])])


def test_prediction_title():
    t = prediction_title("c1", "m", "binary", ["neg", "pos"], [0.2, 0.8], true_label="pos")
    assert t == "case c1 | model m | P(pos) = 0.800, predicted pos | label pos"
    assert "log-risk +0.500" in prediction_title("c1", "m", "survival", [], [0.5, 0.9])


def test_pipeline_window_only_for_raw_ct_units():
    from mmai.config import IntensityConfig

    raw = np.full((8, 8, 8), -1000.0)
    raw[2:6, 2:6, 2:6] = 300.0
    win = IntensityConfig(kind="window", a_min=-160.0, a_max=240.0)
    assert pipeline_window(raw, win) == ((-160.0, 240.0), "the pipeline's intensity window, what the model saw")
    assert pipeline_window(np.clip((raw + 160) / 400, 0, 1), win) is None  # already preprocessed: [0, 1]
    assert pipeline_window(raw, IntensityConfig(kind="zscore")) is None
    fig = overlay_figure(raw, np.eye(4), [], window=(-160.0, 240.0), window_label="the pipeline's window")
    assert {a.images[0].get_clim() for a in fig.axes} == {(-160.0, 240.0)}
    assert "[-160, 240] (the pipeline's window)" in fig._supxlabel.get_text()


def test_oblique_affine_is_drawn_along_the_nearest_axes():
    img, marker, aff = _ras_phantom()
    c, s = np.cos(np.radians(12)), np.sin(np.radians(12))
    rot = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    fig = overlay_figure(img, rot @ aff, [_layer(marker)])
    _, right, _, _ = _marker_pixels(fig, figure_rgb(fig), "axial:marker")
    assert right > 0.15  # still the patient's left on the image right
