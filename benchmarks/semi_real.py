"""Benchmark: issue 16's acceptance on a semi-real cohort (GBSG2, tumour size and node count in the image only).

``mmai synth --kind semireal`` (mmai/synth_semireal.py) writes the German Breast Cancer Study
Group 2 table (686 patients, real recurrence-free survival) WITHOUT its ``tsize`` and ``pnodes``
columns, and a breast CT per patient in which a tumour of diameter ``tsize`` mm and ``pnodes``
enhancing lymph nodes are drawn. Fixed split: 467 train (+ validation inside), 219 test.

References (lifelines ``CoxPHFitter``, ridge penalizer by 5-fold CV on the training rows):

- ``cox_full``: the table WITH the true tsize and pnodes (the reachable target for fusion);
- ``cox_clinical``: the table without them (what clinical-only can reach);
- ``oracle_image``: tsize + pnodes alone (the target for image-only).

mmai models: ``image_only``, ``clinical_only`` and ``cross_attention``, trained through the public
API with the pipeline a user would write for such CT (task, clinical columns, a soft-tissue window
at 3 mm: :data:`PIPELINE`), nothing else: every training setting comes from mmai's defaults
(autoconfig). Test C-index from the Predictor's risks on the 219 test patients.

Acceptance (issue 16): cross_attention >= cox_full - 0.01 and >= clinical_only + 0.02;
image_only >= oracle_image - 0.03.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/semi_real.py [--seeds 0] [--models image_only,clinical_only,cross_attention]
        [--work DIR] [--threads 1] [--workers 2] [--set KEY=VALUE ...] [--split-seeds 0,1,2]
        [--variant NAME] [--references-only]

``--split-seeds``: the test / train split (219 / 467) is redrawn per seed (0: the documented split;
the images are the same, only which patients are test changes); the acceptance is reported per
split and as mean and standard deviation over splits. ``--references-only`` fits the three Cox
references only (no training: seconds per split), to see how large the full-vs-reduced gap is on
each split. ``--variant`` renders the cohort as one of :data:`mmai.synth_semireal.VARIANTS`.

``--set`` overrides pipeline keys (pilots of what the defaults should be, e.g. ``image.descriptors=false``);
the acceptance run uses none. The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLINICAL = {"numeric": [{"name": "age", "range": [0, 120]}, {"name": "progrec", "log": True, "range": [0, 5000]},
                        {"name": "estrec", "log": True, "range": [0, 5000]}],
            "categorical": ["horTh", "menostat", {"name": "tgrade", "levels": ["I", "II", "III"]}]}
#: what a user writes for a contrast CT of the breast: task, clinical columns, a soft-tissue window, 3 mm
PIPELINE: dict[str, Any] = {
    "task": {"kind": "survival", "time": "time", "event": "event"},
    "clinical": CLINICAL,
    "image": {"column": "image", "modality": "CT", "spacing": [3.0, 3.0, 3.0], "size": [64, 64, 48],
              "orientation": "RAS", "intensity": {"kind": "window", "a_min": -160, "a_max": 240,
                                                  "b_min": 0.0, "b_max": 1.0}},
}
MODELS = ("image_only", "clinical_only", "cross_attention")
log = logging.getLogger("semi_real")


def table_features(df: pd.DataFrame, with_image: bool, image_only: bool = False) -> pd.DataFrame:
    """The design matrix a statistician fits: one-hot categories, log receptors; tsize / pnodes
    from truth when asked."""
    out = pd.DataFrame(index=df.index)
    if not image_only:
        out["age"] = df["age"].astype(float)
        out["log_progrec"] = np.log1p(df["progrec"].astype(float))
        out["log_estrec"] = np.log1p(df["estrec"].astype(float))
        out["horTh"] = (df["horTh"] == "yes").astype(float)
        out["post"] = (df["menostat"] == "Post").astype(float)
        out["grade2"] = (df["tgrade"] == "II").astype(float)
        out["grade3"] = (df["tgrade"] == "III").astype(float)
    if with_image:
        out["tsize"] = df["tsize"].astype(float)
        out["pnodes"] = df["pnodes"].astype(float)
    return out


def cox_cindex(train: pd.DataFrame, test: pd.DataFrame, cols: pd.DataFrame, cols_test: pd.DataFrame,
               seed: int) -> float:
    """Ridge Cox PH (lifelines), penalizer by 5-fold CV (C-index) on the training rows; test C-index."""
    from lifelines import CoxPHFitter
    from sklearn.model_selection import KFold

    from mmai.engine.metrics import c_index

    mu, sd = cols.mean(), cols.std().replace(0, 1.0)
    xtr, xte = (cols - mu) / sd, (cols_test - mu) / sd
    t, e = train["time"].to_numpy(float), train["event"].to_numpy(int)

    def fit(idx: np.ndarray, pen: float) -> CoxPHFitter:
        return CoxPHFitter(penalizer=pen).fit(xtr.iloc[idx].assign(T=t[idx], E=e[idx]), "T", "E")

    best, best_pen = -1.0, 0.01
    for pen in (0.001, 0.01, 0.03, 0.1, 0.3):
        scores = [c_index(t[va], e[va], np.asarray(fit(tr, pen).predict_partial_hazard(xtr.iloc[va])))
                  for tr, va in KFold(5, shuffle=True, random_state=seed).split(xtr)]
        if np.mean(scores) > best:
            best, best_pen = float(np.mean(scores)), pen
    m = fit(np.arange(len(xtr)), best_pen)
    return float(c_index(test["time"].to_numpy(float), test["event"].to_numpy(int),
                         np.asarray(m.predict_partial_hazard(xte))))


def _set(raw: dict[str, Any], assignment: str) -> None:
    key, _, value = assignment.partition("=")
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value


def mmai_cindex(fusion: str, seed: int, cohort: Path, work: Path, sets: list[str], threads: int
                ) -> tuple[float, dict[str, Any]]:
    """Train ``fusion`` with the defaults on the cohort's train rows, predict its test rows; test C-index."""
    import torch

    from mmai.config import config_from_dict
    from mmai.engine.metrics import c_index
    from mmai.engine.run import train
    from mmai.inference.predictor import Predictor
    from mmai.io.manifest import validate_manifest

    torch.set_num_threads(threads)
    raw = copy.deepcopy(PIPELINE)
    raw["model"] = {"fusion": fusion}
    if seed:
        raw["train"] = {"seed": seed}
    for s in sets:
        _set(raw, s)
    cfg = config_from_dict(raw, source=f"semi_real:{fusion}")
    manifest = pd.read_csv(cohort / "manifest.csv")
    df = validate_manifest(manifest.assign(split=manifest["split"].where(manifest["split"] == "test", None)),
                           cfg, base_dir=cohort, source="semi_real manifest")
    t0 = time.time()
    metrics = train(cfg, df, work, device="cpu", progress=False)
    test = df[df["split"] == "test"].reset_index(drop=True)
    pred, errors = Predictor(work, device="cpu").predict_frame(test)
    if errors:
        raise SystemExit(f"{work}: {len(errors)} prediction error(s), e.g. {errors[0]}")
    ci = float(c_index(test["time"].to_numpy(float), test["event"].to_numpy(int), pred["risk"].to_numpy(float)))
    info = {"c_index": ci, "best_epoch": metrics.get("best_epoch"), "seconds": round(time.time() - t0, 1),
            "metrics_test_c_index": (metrics.get("test") or {}).get("c_index"),
            "autoconfig": {c["key"]: c["value"] for c in metrics.get("autoconfig", {}).get("choices", [])}}
    return ci, info


def with_split(manifest: pd.DataFrame, split_seed: int) -> pd.DataFrame:
    """``manifest`` with its split redrawn as :func:`mmai.synth_semireal.sample_semireal_table` draws it."""
    from mmai.synth_semireal import sample_semireal_table

    split = sample_semireal_table(0, split_seed=split_seed).set_index("case_id")["split"]
    return manifest.assign(split=manifest["case_id"].map(split).to_numpy())


def acceptance(ref: dict[str, float], mean: dict[str, float]) -> dict[str, Any]:
    """Issue 16's three bars from the references and mmai's (seed-mean) test C-indices."""
    acc: dict[str, Any] = {}
    if "cross_attention" in mean:
        acc["fusion_minus_cox_full"] = mean["cross_attention"] - ref["cox_full"]
        if "clinical_only" in mean:
            acc["fusion_minus_clinical_only"] = mean["cross_attention"] - mean["clinical_only"]
    if "image_only" in mean:
        acc["image_only_minus_oracle"] = mean["image_only"] - ref["oracle_image"]
    acc["pass"] = bool(acc.get("fusion_minus_cox_full", 0) >= -0.01 and acc.get("fusion_minus_clinical_only", 1) >= 0.02
                       and acc.get("image_only_minus_oracle", 0) >= -0.03)
    return acc


def one_split(a: argparse.Namespace, cohort: Path, work: Path, split_seed: int) -> dict[str, Any]:
    """References, mmai runs and acceptance on one split."""
    manifest = pd.read_csv(cohort / "manifest.csv")
    if split_seed:
        manifest = with_split(manifest, split_seed)
        cohort_split = work / f"cohort_split{split_seed}"
        cohort_split.mkdir(parents=True, exist_ok=True)
        manifest.assign(image=[str((cohort / i).resolve()) for i in manifest["image"]]).to_csv(
            cohort_split / "manifest.csv", index=False)
    else:
        cohort_split = cohort
    truth = pd.read_csv(cohort / "truth.csv")
    full = manifest.merge(truth[["case_id", "tsize", "pnodes"]], on="case_id")
    train, test = full[full["split"] != "test"], full[full["split"] == "test"]
    ref = {name: cox_cindex(train, test, table_features(train, wi, io), table_features(test, wi, io), seed=0)
           for name, wi, io in (("cox_full", True, False), ("cox_clinical", False, False),
                                ("oracle_image", True, True))}
    ref["full_minus_clinical"] = ref["cox_full"] - ref["cox_clinical"]
    log.info("split %d references: %s", split_seed, ref)
    runs: dict[str, dict[str, Any]] = {}
    if not a.references_only:
        for fusion in a.models.split(","):
            for seed in [int(s) for s in a.seeds.split(",")]:
                sub = work / (f"{fusion}_s{seed}" if not split_seed else f"split{split_seed}_{fusion}_s{seed}")
                ci, info = mmai_cindex(fusion, seed, cohort_split, sub, a.set, a.threads)
                runs.setdefault(fusion, {})[str(seed)] = info
                log.info("split %d %s seed %d: test C-index %.4f (%s)", split_seed, fusion, seed, ci, info)
    mean = {f: float(np.mean([r["c_index"] for r in v.values()])) for f, v in runs.items()}
    return {"split_seed": split_seed, "n_train": int(len(train)), "n_test": int(len(test)), "references": ref,
            "mmai_mean": mean, "runs": runs, "acceptance": acceptance(ref, mean)}


def summary(splits: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over splits of every reference, mmai mean and acceptance margin."""
    out: dict[str, Any] = {}
    for part in ("references", "mmai_mean", "acceptance"):
        keys = sorted({k for s in splits for k, v in s[part].items() if isinstance(v, float)})
        out[part] = {k: {"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals, ddof=1)), 4)
                         if len(vals) > 1 else 0.0, "n": len(vals)}
                     for k in keys for vals in [[s[part][k] for s in splits if k in s[part]]]}
    out["passes"] = sum(bool(s["acceptance"]["pass"]) for s in splits)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (the cohort is fixed)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--work", default="/tmp/mmai_semi_real")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="processes writing the cohort")
    p.add_argument("--set", action="append", default=[], help="pipeline override KEY=VALUE (pilots only)")
    p.add_argument("--split-seeds", default="0", help="test/train splits, comma-separated (0: the documented one)")
    p.add_argument("--variant", default="default", help="cohort variant (mmai.synth_semireal.VARIANTS)")
    p.add_argument("--references-only", action="store_true", help="Cox references only, no mmai training")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from mmai.synth_semireal import variant, write_semireal_cohort

    t0 = time.time()
    work = Path(a.work)
    cohort = work / ("cohort" if a.variant == "default" else f"cohort_{a.variant}")
    if not (cohort / "truth.json").exists():
        write_semireal_cohort(cohort, seed=0, progress=False, workers=a.workers, var=variant(a.variant))
    if a.variant != "default":
        work = work / a.variant
    splits = [one_split(a, cohort, work, int(k)) for k in a.split_seeds.split(",")]
    result: dict[str, Any] = {**splits[0], "variant": a.variant, "sets": a.set,
                              "splits": splits if len(splits) > 1 else None,
                              "over_splits": summary(splits) if len(splits) > 1 else None,
                              "seconds": round(time.time() - t0, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
