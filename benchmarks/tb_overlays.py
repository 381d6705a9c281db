"""Benchmark: what the TensorBoard validation overlays cost a training run.

:func:`mmai.figures.tensorboard.validation_overlays` (saliency + attention overlays of
``N_CASES`` validation cases; forward + input-gradient pass + rendering) on a cross-attention model
with the default widths, per grid size, one torch thread; compared with one training epoch's
forward + backward of the same model on the same number of cases (the work the overlays ride on,
every ``EVERY`` epochs). Best of ``--repeat`` runs after one warm-up.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tb_overlays.py [--repeat 2] [--sizes 24,16 96]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.figures import tensorboard as tbi
from mmai.models.registry import create_model


def _best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=["24,24,16", "96,96,96"], help="grids D,H,W")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for size in args.sizes:
        shape = tuple(int(s) for s in size.split(","))
        torch.manual_seed(0)
        model = create_model("cross_attention", n_outputs=1, feature_specs=[FeatureSpec("age", "numeric")])
        affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
        items = [{"case_id": f"v{i}", "image": torch.rand(1, *shape), "image_present": torch.tensor(1.0),
                  "affine": affine, "clinical": torch.ones(1), "clinical_mask": torch.ones(1),
                  "target": torch.tensor(1.0)} for i in range(tbi.N_CASES)]
        eng = SimpleNamespace(val_loader=SimpleNamespace(dataset=items), eval_model=model, kind="binary",
                              classes=["0", "1"], device="cpu")
        overlays = _best(lambda eng=eng: tbi.validation_overlays(eng, 1), args.repeat)
        x = torch.stack([it["image"] for it in items])

        def step(model=model, x=x):
            out = model(x, torch.ones(len(x)), torch.ones(len(x), 1), torch.ones(len(x), 1))
            out.sum().backward()

        train = _best(step, args.repeat)
        out["x".join(map(str, shape))] = {"overlays_s": round(overlays, 3), "train_step_same_cases_s": round(train, 3),
                                          "ratio": round(overlays / train, 2)}
    print(json.dumps({"n_cases": tbi.N_CASES, "every_epochs": tbi.EVERY, "threads": 1, "grids": out}))


if __name__ == "__main__":
    main()
