"""Raw-input predict for every ready pipeline: a run predicts the user's raw scans exactly as it
predicts the volumes ``mmai preprocess`` wrote (within 1e-4), fitted statistics and lesion boxes
included, because the predictor's image loader comes from the run contract (RunSpec).

Each pipeline YAML of pipelines/ is used as shipped, on small synthetic volumes (coarse spacing,
tiny model, one epoch): ct_chest, ct_head, mr_brain with cohort-level statistics
(``intensity.kind: percentile``: before the run contract, every raw case of such a run failed)
and a lesion-box (``image.roi``) variant of ct_chest (before: raw scans refused)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from mmai.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (40, 36, 24)
AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, 2.0, 0, -30.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1.0]])  # x flipped (LAS)
N = 10


def _volume(rng: np.random.Generator, modality: str, label: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A body ellipsoid with a bright lesion whose size follows the label; (image, lesion mask)."""
    i, j, k = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    body = ((i - 20) / 15) ** 2 + ((j - 18) / 13) ** 2 + ((k - 12) / 10) ** 2 < 1
    c = rng.integers(14, 24, size=3)
    r = 3 + 2 * label
    lesion = ((i - c[0]) ** 2 + (j - c[1]) ** 2 + ((k - c[2]) * 1.2) ** 2) < r ** 2
    if modality == "CT":
        img = np.full(SHAPE, -1000.0, np.float32) + rng.normal(0, 5, SHAPE)
        img[body] = 40 + rng.normal(0, 20, int(body.sum()))
        img[lesion & body] = 180 + rng.normal(0, 20, int((lesion & body).sum()))
    else:  # MR: arbitrary units, a per-scanner scale
        img = np.abs(rng.normal(0, 5, SHAPE)).astype(np.float32)
        img[body] = scale * (400 + rng.normal(0, 40, int(body.sum())))
        img[lesion & body] = scale * (700 + rng.normal(0, 40, int((lesion & body).sum())))
    return img.astype(np.float32), (lesion & body).astype(np.uint8)


def _cohort(tmp: Path, modality: str) -> Path:
    """TMP/cohort/manifest.csv: raw NIfTI volumes (relative paths), lesion masks, age, label, split."""
    rng = np.random.default_rng(0)
    folder = tmp / "cohort"
    (folder / "images").mkdir(parents=True)
    rows = []
    for n in range(N):
        label = n % 2
        img, mask = _volume(rng, modality, label, scale=1.0 + 0.3 * (n % 3))
        tag = modality if modality == "MR" else "CT"
        nib.save(nib.Nifti1Image(img, AFFINE), str(folder / "images" / f"c{n}_{tag}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, AFFINE), str(folder / "images" / f"c{n}_mask.nii.gz"))
        rows.append({"case_id": f"c{n}", "image": f"images/c{n}_{tag}.nii.gz", "mask": f"images/c{n}_mask.nii.gz",
                     "age": 40.0 + 3 * n, "label": label, "split": "test" if n >= N - 2 else "train"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def _pipeline(tmp: Path, name: str, **image: object) -> Path:
    cfg = yaml.safe_load((ROOT / "pipelines" / f"{name}.yaml").read_text())
    cfg["image"].update(spacing=[6.0, 6.0, 6.0], size_multiple=8, cache="memory", cache_dir=None, **image)
    cfg["image"].pop("select", None)
    cfg["clinical"] = {"numeric": [{"name": "age", "range": [0, 120]}]}
    # base: none: a GLM base term would ship at epoch 0 on these few cases, and a model that ignores
    # the image would make raw == preprocessed (and the saliency maps) trivially true
    cfg["model"] = {**(cfg.get("model") or {}), "widths": [4, 8, 8, 16], "dim": 16, "heads": 2,
                    "fusion": "cross_attention", "base": "none"}
    cfg["model"].pop("windows", None)
    cfg["train"] = {**(cfg.get("train") or {}), "epochs": 1, "batch_size": 4, "patience": 5, "folds": 1}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _preprocess_and_train(tmp: Path, pipe: Path, manifest: Path) -> None:
    """``mmai preprocess`` the cohort into tmp/pre, then ``mmai train`` a run on it into tmp/run."""
    assert main(["preprocess", "--config", str(pipe), "--input", str(manifest), "--out", str(tmp / "pre"), "-q"]) == 0
    assert main(["train", "--config", str(pipe), "--manifest", str(tmp / "pre" / "manifest.csv"),
                 "--out", str(tmp / "run"), "--device", "cpu", "-q"]) == 0


def _raw_vs_preprocessed(tmp: Path, pipe: Path, manifest: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    _preprocess_and_train(tmp, pipe, manifest)
    assert pd.read_csv(tmp / "pre" / "errors.csv").empty
    for name, man in (("pre", tmp / "pre" / "manifest.csv"), ("raw", manifest)):
        assert main(["predict", "--run", str(tmp / "run"), "--manifest", str(man), "--out", str(tmp / f"{name}.csv"),
                     "--device", "cpu", "-q"]) == 0
        assert not (tmp / f"{name}.errors.csv").exists(), (tmp / f"{name}.errors.csv").read_text()
    pre = pd.read_csv(tmp / "pre.csv").set_index("case_id").sort_index()
    raw = pd.read_csv(tmp / "raw.csv").set_index("case_id").sort_index()
    return pre, raw


@pytest.mark.parametrize("name, modality, image", [
    ("ct_chest", "CT", {}),
    ("ct_head", "CT", {}),
    ("mr_brain", "MR", {"intensity": {"kind": "percentile", "percentiles": [0.5, 99.5]}}),
    ("ct_chest", "CT", {"roi": {"mask": "mask", "size_mm": [30.0, 30.0, 30.0]}, "crop_foreground": False}),
], ids=["ct_chest", "ct_head", "mr_brain_percentile", "ct_chest_roi"])
def test_raw_input_predictions_equal_preprocessed_ones(tmp_path, name, modality, image):
    manifest = _cohort(tmp_path, modality)
    pipe = _pipeline(tmp_path, name, **image)
    pre, raw = _raw_vs_preprocessed(tmp_path, pipe, manifest)
    assert len(pre) == len(raw) == N
    assert list(raw.index) == list(pre.index)
    np.testing.assert_allclose(raw["prob_1"], pre["prob_1"], atol=1e-4)
    assert (raw["prediction"] == pre["prediction"]).all()
    assert raw["prob_1"].std() > 0  # the image is read: cases differ


def test_percentile_run_reads_its_statistics_for_raw_inputs(tmp_path):
    """The raw input alone (no preprocessed volume read before it) is normalised with the run's
    statistics: the RunSpec's loader carries them from state.json."""
    from mmai.engine.runspec import RunSpec

    manifest = _cohort(tmp_path, "MR")
    pipe = _pipeline(tmp_path, "mr_brain", intensity={"kind": "percentile", "percentiles": [0.5, 99.5]})
    _raw_vs_preprocessed(tmp_path, pipe, manifest)
    spec = RunSpec.load(tmp_path / "run")
    loader = spec.image_loader("cpu")
    assert loader.stats is not None and loader.stats == spec.image_state["intensity_stats"]
    raw_arr, _ = loader.load(str(tmp_path / "cohort" / "images" / "c0_MR.nii.gz"))
    pre_man = pd.read_csv(tmp_path / "pre" / "manifest.csv").set_index("case_id")
    pre_arr = np.asarray(nib.load(str(tmp_path / "pre" / pre_man.loc["c0", "image"])).dataobj, np.float32)
    np.testing.assert_allclose(raw_arr[0], pre_arr, atol=1e-4)
