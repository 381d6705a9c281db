"""Benchmark: lesion descriptors as model inputs vs the radiomics-style logistic regression.

Cohort: ``mmai synth --kind nodule`` (``--n`` patients per seed, 25 % held-out test patients;
a 5-8 mm nodule whose central calcification, with the same volume and mean HU as a plain nodule,
carries the image half of the outcome; see benchmarks/fullres.py). Every model sees the SAME
preprocessed lesion boxes (``benchmarks/fullres.py``'s ``fullres_roi`` pipeline: 1.5 mm, lung +
mediastinal windows, a 24 mm box around the lesion mask, its training recipe) and the same
split; the mmai models train on the non-test patients (15 % validation carved from them):

- ``roi_descriptors``: the lesion-box cross-attention model with ``image.descriptors: auto``
  (the default with a lesion mask: 20 IBSI descriptors as extra clinical tokens);
- ``roi_no_descriptors``: the same with ``image.descriptors: false``;
- ``clinical_only``: ``fusion: clinical_only`` (never takes descriptors);
- ``lr_descriptors_clinical``: scikit-learn logistic regression (C = 1) on the clinical table +
  the 20 descriptors of the preprocessed manifest (median imputation + missing indicators and
  standardisation fitted on the training rows);
- ``lr_first_order7_clinical``: the same with the issue's seven statistics only (mean, std,
  p10, median, p90, max, volume);
- ``lr_clinical``: the same on the clinical table alone.

Usage:
    .venv/bin/python benchmarks/descriptors.py [--n 300] [--seeds 0,1] [--threads 1] [--workers 1]
        [--epochs N] [--quick] [--out DIR]

The last line printed is one JSON object: ``{"seeds": {"0": {"bayes_auroc":.., "auroc": {...},
"train_s": {...}}, ...}, "mean": {...}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fullres  # noqa: E402

from mmai.transforms.descriptors import DESCRIPTOR_NAMES  # noqa: E402

FIRST_ORDER7 = ("lesion_mean", "lesion_std", "lesion_p10", "lesion_median", "lesion_p90", "lesion_max",
                "lesion_volume_mm3")
CLINICAL = ("age", "crp", "bmi", "sex", "smoking", "diabetes")


def lr_auroc(manifest: Path, extra: tuple[str, ...]) -> float:
    """Test AUROC of a logistic regression on the clinical table + ``extra`` columns, fitted on the
    non-test rows (imputation, indicators and scaling fitted there too)."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    df = pd.read_csv(manifest)
    df["crp"] = np.log1p(df["crp"])
    num = ["age", "crp", "bmi", "diabetes", *extra]
    cat = ["sex", "smoking"]
    x = df[num + cat].copy()
    x[cat] = x[cat].astype(str)
    pre = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()), num),
        ("cat", OneHotEncoder(handle_unknown="ignore"), cat)])
    model = make_pipeline(pre, LogisticRegression(C=1.0, max_iter=5000))
    test = (df["split"] == "test").to_numpy()
    y = df["label"].to_numpy()
    model.fit(x[~test], y[~test])
    return round(float(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])), 4)


def one_seed(n: int, seed: int, work: Path, epochs: int | None, quick: bool, workers: int) -> dict[str, Any]:
    from mmai.engine.trainer import train
    from mmai.io.manifest import load_manifest
    from mmai.preprocess import preprocess_frame
    from mmai.synth_nodule import write_nodule_cohort

    cohort = work / f"cohort_n{n}_s{seed}"
    truth_path = cohort / "truth.json"
    if not truth_path.exists():
        write_nodule_cohort(cohort, n=n, seed=seed, progress=False, workers=workers)
    truth = json.loads(truth_path.read_text())
    roi = fullres.configs(epochs, quick)["fullres_roi"]
    variants = {
        "roi_descriptors": roi,
        "roi_no_descriptors": roi.replace(image=dataclasses.replace(roi.image, descriptors=False)),
        "clinical_only": roi.replace(model=dataclasses.replace(roi.model, fusion="clinical_only")),
    }
    pre_dir = work / f"pre_n{n}_s{seed}"
    raw = load_manifest(cohort / "manifest.csv", roi, require_targets=False)
    summary = preprocess_frame(raw, roi, pre_dir, workers=workers, progress=False, base_dir=cohort)
    logging.info("seed %d: %s", seed, summary)
    if summary.n_failed:
        raise SystemExit(f"{summary.n_failed} case(s) failed to preprocess (see {pre_dir}/errors.csv)")
    auroc: dict[str, float | None] = {}
    train_s: dict[str, float] = {}
    for name, cfg in variants.items():
        df = load_manifest(pre_dir / "manifest.csv", cfg)
        cfg = fullres._avoid_single_batch(cfg, df)
        t = time.time()
        metrics = train(cfg, df, work / f"run_n{n}_s{seed}_{name}", device="cpu", progress=False)
        train_s[name] = round(time.time() - t, 1)
        a = metrics.get("test", {}).get("auroc")
        auroc[name] = None if a is None else round(float(a), 4)
        logging.info("seed %d %s: test AUROC %s (best epoch %s, %.0f s)", seed, name, auroc[name],
                     metrics["best_epoch"], train_s[name])
    manifest = pre_dir / "manifest.csv"
    auroc["lr_descriptors_clinical"] = lr_auroc(manifest, DESCRIPTOR_NAMES)
    auroc["lr_first_order7_clinical"] = lr_auroc(manifest, FIRST_ORDER7)
    auroc["lr_clinical"] = lr_auroc(manifest, ())
    return {"bayes_auroc": round(truth["bayes_test"], 4), "auroc": auroc, "train_s": train_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="patients per cohort (default 300; 80 with --quick)")
    ap.add_argument("--seeds", default="0,1", help="cohort seeds, comma-separated (default 0,1)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default: the fullres_roi recipe, 30)")
    ap.add_argument("--quick", action="store_true", help="small cohort, few epochs (a smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=1, help="processes for synth / preprocess (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(a.threads)
    n = a.n or (80 if a.quick else 300)
    seeds = [int(s) for s in a.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = a.out or Path(tmp)
        per = {str(s): one_seed(n, s, work, a.epochs, a.quick, a.workers) for s in seeds}
    names = list(next(iter(per.values()))["auroc"])
    mean = {k: round(float(np.mean([p["auroc"][k] for p in per.values() if p["auroc"][k] is not None])), 4)
            for k in names}
    mean["bayes_auroc"] = round(float(np.mean([p["bayes_auroc"] for p in per.values()])), 4)
    result = {"n": n, "seeds": per, "mean": mean,
              "descriptors_minus_no_descriptors": round(mean["roi_descriptors"] - mean["roi_no_descriptors"], 4),
              "descriptors_minus_lr_descriptors": round(mean["roi_descriptors"] - mean["lr_descriptors_clinical"], 4),
              "descriptors_minus_clinical_only": round(mean["roi_descriptors"] - mean["clinical_only"], 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
