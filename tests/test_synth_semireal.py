"""The semi-real GBSG2 cohort: the table loses tsize / pnodes, the image carries them (measured back)."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from mmai.synth_semireal import (
    NODE_HU,
    SPACING,
    TUMOUR_HU,
    make_semireal_phantom,
    sample_semireal_table,
    write_semireal_cohort,
)


def _objects(vol: np.ndarray, level: float) -> tuple[np.ndarray, int]:
    """Connected components (6-connected) above ``level`` HU and their count."""
    return ndimage.label(vol > level)


@pytest.mark.parametrize(("tsize", "pnodes"), [(21.0, 3), (57.0, 24), (8.0, 1), (120.0, 51)])
def test_tumour_diameter_and_node_count_are_rendered(tsize, pnodes):
    vol, mask, info = make_semireal_phantom(np.random.default_rng([5, int(tsize)]), tsize, pnodes, noise=False)
    voxel = float(np.prod(SPACING))
    # the tumour: its mask's volume is the sphere of diameter tsize (partial-volume edge at half occupancy)
    d_mask = (6.0 * mask.sum() * voxel / np.pi) ** (1 / 3)
    assert abs(d_mask - tsize) <= max(SPACING), (d_mask, tsize)
    # without noise everything above the midpoint between the brightest tissue (muscle, +45 HU) and
    # the nodes (+80 HU) is a tumour or a node: one component each, and the biggest one is the tumour
    lab, n = _objects(vol, (45.0 + NODE_HU) / 2)
    sizes = np.bincount(lab.ravel())[1:]
    assert n == pnodes + 1, (n, pnodes)
    d_big = (6.0 * sizes.max() * voxel / np.pi) ** (1 / 3)
    if tsize >= 16:  # larger than every node
        assert abs(d_big - tsize) <= 2 * max(SPACING), (d_big, tsize)
    assert vol.max() <= TUMOUR_HU + 30 and len(info["node_diameters_mm"]) == pnodes
    assert all(5.0 - 1e-6 <= d <= 15.0 + 1e-6 for d in info["node_diameters_mm"])


def test_table_split_and_files(tmp_path):
    table = sample_semireal_table(seed=0)
    assert len(table) == 686 and (table["split"] == "train").sum() == 467
    assert table.equals(sample_semireal_table(seed=0))  # the split is fixed by the seed
    info = write_semireal_cohort(tmp_path, n=5, mask=True, progress=False)
    m = pd.read_csv(tmp_path / "manifest.csv")
    assert "tsize" not in m and "pnodes" not in m and {"time", "event", "lesion_mask", "tgrade"} <= set(m)
    truth = pd.read_csv(tmp_path / "truth.csv")
    assert list(truth["tsize"]) == list(table["tsize"][:5])
    img = nib.load(tmp_path / m["image"][0])
    assert img.shape == (96, 96, 36) and np.allclose(img.header.get_zooms(), SPACING)
    assert img.get_data_dtype() == np.int16 and -1100 < float(np.asarray(img.dataobj).min()) < -900
    assert json.loads((tmp_path / "truth.json").read_text())["n"] == info["n"] == 5
    mask = np.asarray(nib.load(tmp_path / m["lesion_mask"][0]).dataobj)
    d = (6.0 * mask.sum() * float(np.prod(SPACING)) / np.pi) ** (1 / 3)
    assert abs(d - truth["tsize"][0]) <= max(SPACING)
    no_mask = write_semireal_cohort(tmp_path / "plain", n=4, progress=False)
    assert not no_mask["mask"] and "lesion_mask" not in pd.read_csv(tmp_path / "plain" / "manifest.csv")


def test_split_seed_redraws_the_split_only():
    a, b = sample_semireal_table(0), sample_semireal_table(0, split_seed=3)
    assert (b["split"] == "test").sum() == (a["split"] == "test").sum() == 219
    assert not a["split"].equals(b["split"])
    assert a.drop(columns="split").equals(b.drop(columns="split"))
    assert sample_semireal_table(0, split_seed=0)["split"].equals(a["split"])


def test_variants_render_their_grid_and_contrast():
    from mmai.errors import ConfigError
    from mmai.synth_semireal import variant

    v = variant("thick_slices")
    vol, mask, _ = make_semireal_phantom(np.random.default_rng(1), 30.0, 4, var=v, noise=False)
    assert vol.shape == v.shape == (240, 240, 29)
    low = variant("low_contrast")
    vol, mask, _ = make_semireal_phantom(np.random.default_rng(1), 30.0, 4, var=low, noise=False)
    assert abs(float(np.median(vol[mask > 0])) - low.tumour_hu) < 10
    with pytest.raises(ConfigError, match="allowed"):
        variant("nope")
    with pytest.raises(ConfigError, match="allowed"):
        variant("default", contrast=3)


def test_synth_cli_passes_the_variant_and_split_seed_and_rejects_unknown_ones(tmp_path, monkeypatch, capsys):
    """`mmai synth --kind semireal --variant NAME --split-seed K` reaches the generator; an unknown
    variant is a one-line error listing the allowed ones; the options are refused for other kinds."""
    import mmai.synth_semireal as sr
    from mmai.cli import main

    seen = {}

    def fake(out_dir, **kw):
        seen.update(kw)
        return {"n": 686}

    monkeypatch.setattr(sr, "write_semireal_cohort", fake)
    assert main(["synth", "--kind", "semireal", "--out", str(tmp_path / "a"), "--variant", "low_contrast",
                 "--split-seed", "3", "-q"]) == 0
    assert seen["var"] == sr.VARIANTS["low_contrast"] and seen["split_seed"] == 3
    seen.clear()
    assert main(["synth", "--kind", "semireal", "--out", str(tmp_path / "b"), "-q"]) == 0
    assert seen["var"] == sr.DEFAULT_VARIANT and seen["split_seed"] is None
    capsys.readouterr()
    assert main(["synth", "--kind", "semireal", "--out", str(tmp_path / "c"), "--variant", "nope", "-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'nope'" in err and "low_contrast" in err and len(err.strip().splitlines()) == 1
    assert main(["synth", "--out", str(tmp_path / "d"), "--variant", "hard", "-q"]) == 2
    assert "--kind semireal only" in capsys.readouterr().err
