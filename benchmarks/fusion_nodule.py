"""Fusion vs the better single modality on a lesion-box nodule cohort, with and without the GLM base term.

Cohort: ``mmai synth --kind nodule`` (docs/benchmarks.md "Full resolution"): the outcome's logit
is linear in the clinical table plus an image signal (a 5-8 mm nodule, calcified or not) that
only the full-resolution lesion box shows. Image input and training recipe: ``fullres_roi`` of
``benchmarks/fullres.py`` (pipelines/ct_chest.yaml at 1.5 mm, a 24 mm box around the lesion
mask, flips + 90-degree turns, ResNet 8-16-32-64, dim 64, 30 epochs, EMA 0.99). Models, each
with ``model.base: glm`` (default) and, with ``--bases glm,none``, without the base term:

- ``cross_attention``: the fusion;
- ``image_only``: the same image branch alone;
- ``clinical_only``: the clinical table alone;
- ``clinical_lr`` (reference, not mmai): logistic regression on the clinical table, same split.

Scored by the test AUROC (the cohort's ``split == test`` patients, never used for fitting or
selection). ``fusion_minus_best_single``: cross_attention - max(image_only, clinical_only).

    .venv/bin/python benchmarks/fusion_nodule.py [--n 300] [--seeds 0 1] [--bases glm,none]
        [--threads 1] [--workers 1] [--out DIR]

Last line: ``{"runs": [{"seed", "base", "auroc": {...}, "fusion_minus_best_single"}, ...],
"mean": {base: {...}}, "bayes_auroc": [...], "seconds": ..}``
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

from fullres import _avoid_single_batch, configs, lr_reference  # noqa: E402

MODELS = ("cross_attention", "image_only", "clinical_only")


def run_seed(work: Path, n: int, seed: int, bases: list[str], workers: int) -> list[dict[str, Any]]:
    from mmai.engine.trainer import train
    from mmai.io.manifest import load_manifest
    from mmai.preprocess import preprocess_frame
    from mmai.synth_nodule import write_nodule_cohort

    cohort = work / f"cohort_n{n}_seed{seed}"
    truth_path = cohort / "truth.json"
    if not truth_path.exists() or json.loads(truth_path.read_text()).get("n") != n:
        write_nodule_cohort(cohort, n=n, seed=seed, progress=False, workers=workers)
    truth = json.loads(truth_path.read_text())
    cfg = configs(None, False)["fullres_roi"]
    pre = work / f"pre_n{n}_seed{seed}"
    if not (pre / "manifest.csv").exists():
        raw = load_manifest(cohort / "manifest.csv", cfg, require_targets=False)
        summary = preprocess_frame(raw, cfg, pre, workers=workers, progress=False, base_dir=cohort)
        if summary.n_failed:
            raise SystemExit(f"{summary.n_failed} case(s) failed to preprocess (see {pre}/errors.csv)")
    df = load_manifest(pre / "manifest.csv", cfg)
    cfg = _avoid_single_batch(cfg, df)
    reference = lr_reference(cohort)
    out = []
    for base in bases:
        auroc: dict[str, float | None] = {}
        train_s: dict[str, float] = {}
        best: dict[str, int] = {}
        for fusion in MODELS:
            mcfg = cfg.replace(model=dataclasses.replace(cfg.model, fusion=fusion, base=base))
            t = time.time()
            metrics = train(mcfg, df, work / f"run_n{n}_seed{seed}_{base}_{fusion}", device="cpu", progress=False)
            train_s[fusion] = round(time.time() - t, 1)
            a = metrics.get("test", {}).get("auroc")
            auroc[fusion] = None if a is None else round(float(a), 4)
            best[fusion] = int(metrics["best_epoch"])
            logging.info("seed %d base %s %s: test AUROC %s (best epoch %s, %.0f s)", seed, base, fusion,
                         auroc[fusion], best[fusion], train_s[fusion])
        auroc["clinical_lr"] = reference["clinical_lr"]
        singles = [auroc[m] for m in ("image_only", "clinical_only") if auroc[m] is not None]
        gap = (round(auroc["cross_attention"] - max(singles), 4)
               if auroc["cross_attention"] is not None and singles else None)
        out.append({"seed": seed, "base": base, "auroc": auroc, "fusion_minus_best_single": gap,
                    "bayes_auroc": round(truth["bayes_test"], 4), "best_epoch": best, "train_s": train_s})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--bases", default="glm,none", help="comma-separated model.base values (glm, none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in ("mmai", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    bases = a.bases.split(",")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = [r for s in a.seeds for r in run_seed(work, a.n, s, bases, a.workers)]
    mean = {}
    for base in bases:
        rows = [r for r in runs if r["base"] == base]
        mean[base] = {k: round(float(np.mean([r["auroc"][k] for r in rows])), 4) for k in (*MODELS, "clinical_lr")}
        mean[base]["fusion_minus_best_single"] = round(float(np.mean([r["fusion_minus_best_single"] for r in rows])), 4)
    result = {"runs": runs, "mean": mean, "n": a.n, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
