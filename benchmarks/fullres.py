"""Benchmark: full-resolution lesion input vs the demo's coarse grid vs clinical only.

Cohort: ``mmai synth --kind nodule`` (``--n`` patients, one study each, 25 % held-out test
patients, patient-grouped; 128 x 112 x 96 voxels at 2 mm): the outcome depends on the clinical
table and on a central calcification of a 5-8 mm lung nodule that has the same volume and mean
intensity as a plain nodule, so it is visible only at full resolution.

Models (all cross-attention fusion unless named, the clinical section of pipelines/demo.yaml,
and ONE model/training recipe: ResNet 8-16-32-64, dim 64, 1 layer, no dropout, 30 epochs,
batch 16, lr 1e-3, weight decay 0.05, EMA 0.99, selection on the validation AUROC, seed 0;
only the image input differs, so "coarse" is the same model on the demo's grid):
- ``fullres_roi``: pipelines/ct_chest.yaml (1.5 mm, lung + mediastinal windows) with
  ``image.roi: {mask: lesion_mask, size_mm: [24, 24, 24]}``: a 16^3 box around the lesion, the mask
  as a third channel; flips and 90-degree turns as augmentation.
- ``fullres_windows``: ct_chest.yaml without ``roi``, the whole body-cropped scan at 3 mm
  (96 x 64 x 64 voxels: 1.5 mm would be 8x the voxels, beyond 30 min on 2 cores) through
  ``model.windows: {roi_size: [32, 32, 32], overlap: 0, batch: 8, train_windows: all}``
  (12 windows per scan, positions in mm from the affine); flips; 20 epochs.
- ``coarse``: the demo's image section (pipelines/demo.yaml: 9 mm, 32 x 32 x 24 voxels, shifts).
- ``clinical_only``: ``fusion: clinical_only``.
The demo's own training section (EMA 0.995, 28 epochs) is tuned for 765 training cases; with
~200-320 here its EMA spans more steps than the best epoch, so all models use the ROI recipe.
Where n_train % batch == 1 the batch grows by one (a batch of one cannot train BatchNorm).

Also printed: ``reference``: logistic regression on the clinical table alone and with the TRUE
calcification flag (a perfect image reader), same split: what the clinical half can reach.

Each model is preprocessed with ``mmai preprocess`` (preprocess_frame, ``--workers``) and trained
with ``mmai.engine.trainer.train`` on the non-test patients (15 % validation carved from them),
then scored on the test patients (AUROC). ``train_s`` holds each model's training seconds.

Usage:
    .venv/bin/python benchmarks/fullres.py [--n 300] [--seed 0] [--epochs N] [--quick] [--out DIR]
        [--models fullres_roi,fullres_windows,coarse,clinical_only] [--threads 2] [--workers 2]

The last line printed is one JSON object:
``{"bayes_auroc":..,"auroc":{"fullres_roi":..,"fullres_windows":..,"coarse":..,"clinical_only":..},"train_s":..}``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmai.config import PipelineConfig, config_from_dict  # noqa: E402

ROI_SIZE_MM = [24.0, 24.0, 24.0]
WINDOWS_SPACING = [3.0, 3.0, 3.0]  # the whole scan at 3 mm (1.5 mm does not fit 30 min on 2 cores)


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "pipelines" / name).read_text())


def configs(epochs: int | None, quick: bool) -> dict[str, PipelineConfig]:
    """The four pipeline configs (fullres_roi, fullres_windows, coarse, clinical_only)."""
    demo, chest = _yaml("demo.yaml"), _yaml("ct_chest.yaml")
    roi = copy.deepcopy(demo)
    roi["image"] = {**chest["image"], "select": None, "cache": "memory", "cache_dir": None,
                    "roi": {"mask": "lesion_mask", "size_mm": ROI_SIZE_MM},
                    "augment": {"flip": True, "rotate90": True}}
    roi["model"] = {"encoder": "resnet", "widths": [8, 16, 32, 64], "fusion": "cross_attention", "dim": 64,
                    "heads": 4, "layers": 1, "dropout": 0.0}
    roi["train"] = {"epochs": epochs or (12 if quick else 30), "batch_size": 16, "lr": 1e-3, "weight_decay": 0.05,
                    "val_fraction": 0.15, "patience": 100, "ema": 0.99, "seed": 0}
    win = copy.deepcopy(roi)
    win["image"] = {**chest["image"], "select": None, "cache": "memory", "cache_dir": None,
                    "spacing": WINDOWS_SPACING, "augment": {"flip": True}}
    win["model"] = {**roi["model"], "windows": {"roi_size": [32, 32, 32], "overlap": 0.0, "batch": 8,
                                               "train_windows": "all", "checkpoint": False}}
    win["train"] = {**roi["train"], "epochs": epochs or (4 if quick else 20)}
    coarse = copy.deepcopy(roi)  # the same model and training; only the image input differs
    coarse["image"] = {**demo["image"], "select": None}
    clin = copy.deepcopy(coarse)
    clin["model"]["fusion"] = "clinical_only"
    return {name: config_from_dict(d, source=f"fullres:{name}") for name, d in
            (("fullres_roi", roi), ("fullres_windows", win), ("coarse", coarse), ("clinical_only", clin))}


def _avoid_single_batch(cfg: PipelineConfig, df: Any) -> PipelineConfig:
    """The engine keeps a last training batch of one case, and BatchNorm on the ROI model's 1^3
    deepest feature map cannot train on it: add 1 to the batch size when n_train % batch == 1."""
    from mmai.data.splits import make_splits

    split = make_splits(df, kind=cfg.task.kind, target=cfg.task.target, val_fraction=cfg.train.val_fraction,
                        seed=cfg.train.seed)[0]
    bs = cfg.train.batch_size
    if len(split.train) % bs != 1:
        return cfg
    logging.info("batch_size %d -> %d (%d training cases would leave a batch of one)", bs, bs + 1, len(split.train))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=bs + 1))


def run_model(name: str, cfg: PipelineConfig, cohort: Path, work: Path, workers: int) -> tuple[float | None, float]:
    """Preprocess (image models) + train + test AUROC; returns (auroc, train seconds)."""
    from mmai.engine.trainer import train
    from mmai.io.manifest import load_manifest
    from mmai.preprocess import preprocess_frame

    manifest = cohort / "manifest.csv"
    if cfg.model.fusion != "clinical_only":
        raw = load_manifest(manifest, cfg, require_targets=False)
        summary = preprocess_frame(raw, cfg, work / f"pre_{name}", workers=workers, progress=False, base_dir=cohort)
        logging.info("%s: %s", name, summary)
        if summary.n_failed:
            raise SystemExit(f"{name}: {summary.n_failed} case(s) failed to preprocess (see {summary.out_dir}/errors.csv)")
        manifest = work / f"pre_{name}" / "manifest.csv"
    df = load_manifest(manifest, cfg)
    cfg = _avoid_single_batch(cfg, df)
    t = time.time()
    metrics = train(cfg, df, work / f"run_{name}", device="cpu", progress=False)
    seconds = time.time() - t
    auroc = metrics.get("test", {}).get("auroc")
    logging.info("%s: test AUROC %s, trained in %.0f s (best epoch %s)", name, auroc, seconds, metrics["best_epoch"])
    return (None if auroc is None else round(float(auroc), 4)), round(seconds, 1)


def lr_reference(cohort: Path) -> dict[str, float]:
    """Logistic-regression references on the same split: the clinical table alone, and the table
    plus the TRUE calcification flag (what a perfect image reader would add). Missing cells:
    median (numeric) / own level (categorical) + a missing indicator; log CRP as in the pipeline."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    df = pd.read_csv(cohort / "manifest.csv")
    calc = pd.read_csv(cohort / "truth.csv").set_index("case_id").loc[df["case_id"], "calcified"].to_numpy()
    cols: dict[str, Any] = {}
    for c in ("age", "crp", "bmi"):
        v = np.log1p(df[c]) if c == "crp" else df[c]
        cols[c], cols[c + "_na"] = v.fillna(v.median()), v.isna().astype(float)
    for c in ("sex", "smoking", "diabetes"):
        cols.update({f"{c}={lv}": (df[c].astype(str) == lv).astype(float) for lv in df[c].astype(str).unique()})
    x = pd.DataFrame(cols).to_numpy(float)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    test = (df["split"] == "test").to_numpy()
    y = df["label"].to_numpy()
    out = {}
    for name, feats in (("clinical_lr", x), ("clinical_plus_true_calcification_lr", np.c_[x, calc])):
        lr = LogisticRegression(C=1.0, max_iter=2000).fit(feats[~test], y[~test])
        out[name] = round(float(roc_auc_score(y[test], lr.predict_proba(feats[test])[:, 1])), 4)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="patients (default 300; 120 with --quick)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: per-model recipe)")
    ap.add_argument("--quick", action="store_true", help="small cohort and few epochs (a smoke run, minutes)")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="processes for synth / preprocess (default 2)")
    ap.add_argument("--models", default="fullres_roi,fullres_windows,coarse,clinical_only", help="comma-separated subset")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(a.threads)
    n = a.n or (120 if a.quick else 300)
    from mmai.synth_nodule import write_nodule_cohort

    with tempfile.TemporaryDirectory() as tmp:
        work = a.out or Path(tmp)
        cohort = work / "cohort"
        truth_path = cohort / "truth.json"
        if not truth_path.exists() or json.loads(truth_path.read_text()).get("n") != n:
            write_nodule_cohort(cohort, n=n, seed=a.seed, progress=False, workers=a.workers)
        truth = json.loads(truth_path.read_text())
        cfgs = configs(a.epochs, a.quick)
        auroc: dict[str, float | None] = {"fullres_roi": None, "fullres_windows": None, "coarse": None,
                                          "clinical_only": None}
        train_s: dict[str, float] = {}
        for name in a.models.split(","):
            auroc[name], train_s[name] = run_model(name, cfgs[name], cohort, work, a.workers)
        reference = lr_reference(cohort)
    result = {"bayes_auroc": round(truth["bayes_test"], 4), "auroc": auroc, "train_s": train_s,
              "reference": reference,
              "n": n, "n_test": int(round(0.25 * n)), "quick": a.quick,
              "note": f"fullres_windows: the whole scan at {WINDOWS_SPACING[0]:g} mm through 32^3 windows"}
    if auroc["fullres_roi"] is not None:
        for other in ("coarse", "clinical_only"):
            if auroc[other] is not None:
                result[f"roi_minus_{other}"] = round(auroc["fullres_roi"] - auroc[other], 4)
        result["bayes_minus_roi"] = round(truth["bayes_test"] - auroc["fullres_roi"], 4)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
