"""Benchmark: does the mask-free focal inventory read size and count on cohorts it was not tuned on?

No training. For each semi-real cohort variant (:data:`mmai.synth_semireal.VARIANTS`: lesion /
node contrast, noise, anisotropic or fine voxels, node sizes, matted nodes, an irregular tumour,
body size, all at once), ``--n`` patients of the GBSG2 table (the same rows for every variant) are
rendered as NIfTI CTs and measured exactly as a user's pipeline measures them: the run's
:class:`~mmai.data.dataset.ImageLoader` with the semi-real benchmark's pipeline (soft-tissue
window [-160, 240] HU at 3 mm, 64 x 64 x 48; ``benchmarks/semi_real.py``), then
:func:`mmai.data.focal.attach_focal`. Per variant: Spearman between the largest object's
diameter and the true tumour size, between the object count and the true node count, the median
count / (nodes + 1) and diameter / size ratios, and how many scans gave no object.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/focal_variants.py [--n 60] [--variants default,noisy,...]
        [--work DIR] [--seed 0]

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("focal_variants")


def render(var_name: str, rows: pd.DataFrame, out: Path, seed: int) -> pd.DataFrame:
    """Write one NIfTI per row of ``rows`` (tsize, pnodes) for the variant; rows with an ``image`` column."""
    from mmai.synth_semireal import affine_ras, make_semireal_phantom, variant

    var = variant(var_name)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(rows.itertuples()):
        path = out / f"{r.case_id}.nii.gz"
        if not path.exists():
            vol, _, _ = make_semireal_phantom(np.random.default_rng([seed, 3, i]), float(r.tsize), int(r.pnodes),
                                              var=var)
            nib.save(nib.Nifti1Image(np.round(vol).astype(np.int16), affine_ras(var)), str(path))
        paths.append(str(path))
    return rows.assign(image=paths)


def measure(rows: pd.DataFrame) -> dict[str, Any]:
    """Inventory through the semi-real pipeline's loader; Spearman with the truth."""
    from scipy.stats import spearmanr
    from semi_real import PIPELINE

    from mmai.config import config_from_dict
    from mmai.data.focal import attach_focal
    from mmai.transforms.focal import FOCAL_NAMES

    cfg = config_from_dict({**PIPELINE, "model": {"fusion": "image_only"}}, source="focal_variants")
    t0 = time.time()
    f = attach_focal(cfg.image, rows, FOCAL_NAMES)
    sec = (time.time() - t0) / len(rows)
    d, c = f["focal_largest_diameter_mm"].to_numpy(float), f["focal_count"].to_numpy(float)
    ts, pn = rows["tsize"].to_numpy(float), rows["pnodes"].to_numpy(float)
    return {"spearman_diameter_tsize": round(float(spearmanr(d, ts).statistic), 3),
            "spearman_count_pnodes": round(float(spearmanr(c, pn).statistic), 3),
            "median_count_over_objects": round(float(np.median(c / (pn + 1))), 3),
            "median_diameter_over_tsize": round(float(np.median(d / ts)), 3),
            "zero_objects": int((c == 0).sum()), "seconds_per_case": round(sec, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mmai.synth_semireal import VARIANTS, sample_semireal_table

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=60, help="patients per variant (the same GBSG2 rows for each)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--work", default="/tmp/mmai_focal_variants")
    p.add_argument("--seed", type=int, default=0, help="which rows, and the phantoms' anatomy")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()
    table = sample_semireal_table(0)
    rows = table.iloc[np.random.default_rng(a.seed).permutation(len(table))[: a.n]].reset_index(drop=True)
    rows = rows[["case_id", "tsize", "pnodes"]]
    out: dict[str, Any] = {}
    for name in a.variants.split(","):
        res = measure(render(name, rows, Path(a.work) / name, a.seed))
        out[name] = res
        log.info("%s: %s", name, res)
    worst = {k: min(v[k] for v in out.values()) for k in ("spearman_diameter_tsize", "spearman_count_pnodes")}
    result = {"n": a.n, "seed": a.seed, "variants": out, "worst": worst, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
