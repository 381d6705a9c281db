"""Benchmark: what the focal inventory is worth to a Cox model on the whole semi-real cohort, over many splits, without training.

Measures ``focal_count`` and ``focal_largest_diameter_mm`` (the models' default inputs) on every
model-ready volume of the semi-real cohort (the pipeline of ``benchmarks/semi_real.py``), then fits
the benchmark's ridge Cox (``cox_cindex``) on table + inventory and on the inventory alone, per
split, next to the same models on the true tsize / pnodes. This is the GLM base term mmai ships
when no trained epoch beats it, so it compares inventory definitions in minutes instead of hours.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/focal_cox.py --cohort /tmp/sr/cohort [--splits 20] [--variant default]

The last line printed is one JSON object (Spearman on the cohort, per-split and mean C-indices).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from scipy.stats import spearmanr
    from semi_real import PIPELINE, cox_cindex, table_features, with_split

    from mmai.config import config_from_dict
    from mmai.data.focal import attach_focal
    from mmai.synth_semireal import variant, write_semireal_cohort

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cohort", default="/tmp/mmai_semi_real/cohort", help="written when missing")
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--variant", default="default")
    a = p.parse_args(argv)
    cohort = Path(a.cohort)
    if not (cohort / "truth.json").exists():
        write_semireal_cohort(cohort, progress=False, var=variant(a.variant))
    m = pd.read_csv(cohort / "manifest.csv")
    truth = pd.read_csv(cohort / "truth.csv")
    cfg = config_from_dict({**PIPELINE, "model": {"fusion": "image_only"}}, source="focal_cox")
    m = attach_focal(cfg.image, m.assign(image=[str(cohort / i) for i in m["image"]]),
                     ("focal_count", "focal_largest_diameter_mm"))
    full = m.merge(truth[["case_id", "tsize", "pnodes"]], on="case_id")
    rho = {"diameter_tsize": float(spearmanr(full["focal_largest_diameter_mm"], full["tsize"]).statistic),
           "count_pnodes": float(spearmanr(full["focal_count"], full["pnodes"]).statistic)}

    def design(d: pd.DataFrame, table: bool, inv: bool) -> pd.DataFrame:
        x = table_features(d, with_image=not inv, image_only=not table)
        if inv:
            x["count"], x["diameter"] = d["focal_count"].fillna(0.0), d["focal_largest_diameter_mm"].fillna(0.0)
        return x

    rows = []
    for k in range(a.splits):
        f = with_split(full, k) if k else full
        tr, te = f[f["split"] != "test"], f[f["split"] == "test"]
        rows.append({name: cox_cindex(tr, te, design(tr, tab, inv), design(te, tab, inv), seed=0)
                     for name, tab, inv in (("table_inventory", True, True), ("inventory", False, True),
                                            ("table_truth", True, False), ("truth", False, False))})
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    sd = {k: round(float(np.std([r[k] for r in rows], ddof=1)), 4) for k in rows[0]} if len(rows) > 1 else {}
    result = {"n": len(full), "spearman": rho, "mean": mean, "sd": sd, "splits": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
