"""MR intensities across scanners (issue 15): mr_brain.yaml normalises each volume by its own
foreground percentiles and mean/std, so two scanners' volumes (different gain and offset)
processed together each keep background < tissue; the cohort-level fit squashes one of them
(its tissue falls below its background) and warns."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import yaml

from mmai.preprocess import run_preprocess
from mmai.transforms.intensity import volume_percentile_normalize
from tests.data.real_pixels import mr_brain_nifti

ROOT = Path(__file__).resolve().parents[2]
SCANNERS = {"scanner_a": (1.0, 0.0), "scanner_b": (0.07, 5.0)}  # gain, offset


def _cohort(tmp: Path) -> Path:
    src = nib.load(str(mr_brain_nifti(tmp / "t1.nii.gz")))
    brain = np.pad(np.asarray(src.dataobj, dtype=np.float32).clip(0), 6)  # air around the head: 0
    rows = []
    for i in range(4):
        for name, (gain, offset) in SCANNERS.items():
            cid = f"{name}_{i}"
            arr = brain * gain * (1 + 0.05 * i) + offset
            nib.save(nib.Nifti1Image(arr, src.affine), str(tmp / f"{cid}.nii.gz"))
            rows.append({"case_id": cid, "image": f"{cid}.nii.gz", "label": i % 2})
    pd.DataFrame(rows).to_csv(tmp / "m.csv", index=False)
    return tmp / "m.csv"


def _tissue_vs_background(out: Path) -> dict[str, tuple[float, float]]:
    man = pd.read_csv(out / "manifest.csv")
    res = {}
    for cid, rel in zip(man["case_id"], man["image"], strict=True):
        x = np.asarray(nib.load(str(out / rel)).dataobj)
        res[cid] = (float(np.percentile(x[x != 0], 75)), float(x[0, 0, 0]))  # bright tissue, background
    return res


def _pipeline(tmp: Path, kind: str) -> Path:
    cfg = yaml.safe_load((ROOT / "pipelines" / "mr_brain.yaml").read_text())
    cfg["image"].update(spacing=[2.0, 2.0, 2.0], cache="none")
    cfg["image"]["intensity"]["kind"] = kind
    p = tmp / f"{kind}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_mr_brain_default_is_per_volume():
    cfg = yaml.safe_load((ROOT / "pipelines" / "mr_brain.yaml").read_text())
    assert cfg["image"]["intensity"]["kind"] == "volume_percentile"


def test_two_scanners_keep_background_below_tissue(tmp_path, caplog):
    man = _cohort(tmp_path)
    run_preprocess(config_path=_pipeline(tmp_path, "volume_percentile"), input_path=man,
                   out_dir=tmp_path / "vol", progress=False)
    per_volume = _tissue_vs_background(tmp_path / "vol")
    assert len(per_volume) == 8
    for cid, (tissue, background) in per_volume.items():
        assert tissue > background + 0.3, (cid, tissue, background)
    a, b = (np.asarray(nib.load(str(tmp_path / "vol" / "images" / f"{n}_0.nii.gz")).dataobj) for n in SCANNERS)
    # a gain/offset change leaves the output as it was (bar a few voxels at the foreground threshold)
    assert a.shape == b.shape and np.mean(np.abs(a - b) < 0.05) > 0.999
    with caplog.at_level(logging.WARNING, logger="mmai.transforms.intensity"):
        run_preprocess(config_path=_pipeline(tmp_path, "percentile"), input_path=man, out_dir=tmp_path / "coh",
                       progress=False)
    cohort = _tissue_vs_background(tmp_path / "coh")
    squashed = [cid for cid, (tissue, background) in cohort.items() if tissue <= background]
    assert squashed and all(c.startswith("scanner_b") for c in squashed)  # the failure the default avoids
    assert "scanner_b_0.nii.gz: the foreground spans" in caplog.text
    assert "the intensity range fitted on the training cases" in caplog.text and "scanner_a" not in caplog.text


def test_volume_percentile_array_function():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 20, 20, 20), generator=g) * 100 + 50
    fg = torch.zeros((1, 20, 20, 20), dtype=torch.bool)
    fg[:, 5:15, 5:15, 5:15] = True
    z = volume_percentile_normalize(x, fg, (0.5, 99.5))
    inside = z[fg]
    assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std(unbiased=False)) - 1) < 1e-3
    assert float(z[~fg].abs().max()) == 0.0
    z2 = volume_percentile_normalize(x * 3 + 700, fg, (0.5, 99.5))
    torch.testing.assert_close(z, z2, atol=1e-4, rtol=0)
