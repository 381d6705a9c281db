"""Training throughput: mmai's training loop vs a bare PyTorch loop, same model, data, augmentation.

One process, one synthetic cohort (``mmai synth`` + ``mmai preprocess`` with the demo pipeline,
NIfTI, 32x32x24 voxels), one cached training dataset with the pipeline's augmentation (random
translation); then alternating timed epochs of

- **mmai**: :func:`mmai.engine.loop.train_one_epoch`, i.e. what ``mmai train`` runs per epoch:
  AdamW, the torch LR scheduler, gradient clipping, EMA update, auxiliary unimodal losses,
  loss reduction, channels-last batches;
- **torch**: the loop a PyTorch user writes: DataLoader over the same dataset (same batch size,
  shuffling, augmentation), forward, the same loss (main + auxiliary BCE, see ``--objective``),
  backward, AdamW step,

each on its own copy of the same initial model (channels-last, like mmai's). Validation and
checkpointing are not timed (they are per epoch, not per case). Each round times one epoch of
each side, in alternating order; the figure per side is its fastest epoch (best-of, as timeit
does: on a shared machine the slower epochs measure the neighbours, not the loop).

    python benchmarks/train_throughput.py [--n 160] [--rounds 7] [--threads 1] [--fusion cross_attention]

Prints a table, then as its LAST line one JSON object:
``{"mmai_cases_per_s": .., "torch_cases_per_s": .., "overhead": ..}`` (overhead = 1 - mmai/torch).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def make_data(work: Path, n: int, fusion: str) -> dict[str, Any]:
    """Cohort -> preprocessed manifest -> (config, model, cached augmented training dataset)."""
    from mmai.cli import main
    from mmai.config import load_config
    from mmai.data.splits import make_splits
    from mmai.engine.prepare import TargetEncoding, build_dataset, fit_clinical
    from mmai.engine.run import _build_model, apply_overrides
    from mmai.io.manifest import load_manifest
    from mmai.transforms.pipelines import augment_transforms

    pipe = ROOT / "pipelines" / "demo.yaml"
    if not (work / "pre" / "manifest.csv").exists():
        assert main(["synth", "--out", str(work / "cohort"), "--n", str(n), "--format", "nifti", "-q"]) == 0
        assert main(["preprocess", "--config", str(pipe), "--input", str(work / "cohort" / "manifest.csv"),
                     "--out", str(work / "pre"), "-q"]) == 0
    config = apply_overrides(load_config(pipe), fusion=fusion)
    df = load_manifest(work / "pre" / "manifest.csv", config)
    t = config.task
    split = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=1,
                        val_fraction=config.train.val_fraction, seed=0)[0]
    train_df = df.iloc[split.train].reset_index(drop=True)
    enc = TargetEncoding.fit(config, train_df)
    pre = fit_clinical(config, train_df)
    model, _ = _build_model(config, t.kind, len(enc.classes), pre)
    ds = build_dataset(config, train_df, pre=pre, uses_image=model.uses_image, targets=enc.encode(config, train_df),
                       augment=augment_transforms(config.image, seed=0), image_dropout=config.model.image_dropout)
    ds.preload()
    return {"config": config, "model": model, "ds": ds, "classes": enc.classes}


def mmai_epoch(data: dict[str, Any]) -> Any:
    """A closure running one mmai training epoch (engine built once, like ``mmai train``)."""
    from mmai.engine.data import train_loader
    from mmai.engine.distributed import DistInfo
    from mmai.engine.loop import build_engine, train_one_epoch
    from mmai.engine.state import TrainState

    model = copy.deepcopy(data["model"]).to(memory_format=torch.channels_last_3d)
    info = DistInfo()
    cfg = data["config"]
    loader, gen = train_loader(data["ds"], cfg.train.batch_size, info, 0, 0)
    eng = build_engine(model, model, cfg, loader, None, info=info, kind=cfg.task.kind, classes=data["classes"],
                       generator=gen, train_ds=data["ds"])
    state = TrainState()
    counter = iter(range(1, 10**6))
    return lambda: train_one_epoch(eng, next(counter), state)


def torch_epoch(data: dict[str, Any], objective: str = "same") -> Any:
    """A closure running one epoch of the bare PyTorch loop. ``objective="same"``: the model's own
    training objective written out in plain PyTorch (main BCE + model.aux_weight x the auxiliary
    unimodal BCEs, the image one over cases with an image), so the comparison isolates mmai's loop
    machinery; ``"main"``: the main BCE only (what a user who ignores the auxiliary heads writes)."""
    cfg = data["config"]
    model = copy.deepcopy(data["model"]).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    g = torch.Generator()
    g.manual_seed(0)
    loader = torch.utils.data.DataLoader(data["ds"], batch_size=cfg.train.batch_size, shuffle=True, generator=g)
    bce = torch.nn.BCEWithLogitsLoss()
    aux_w = cfg.model.aux_weight if objective == "same" else 0.0

    def epoch() -> None:
        model.train()
        for batch in loader:
            image = batch["image"].contiguous(memory_format=torch.channels_last_3d)
            y, present = batch["target"].float(), batch["image_present"]
            out, aux = model(image, present, batch["clinical"], batch["clinical_mask"], return_aux=aux_w > 0)\
                if aux_w > 0 else (model(image, present, batch["clinical"], batch["clinical_mask"]), {})
            loss = bce(out[:, 0], y)
            for name, a in aux.items():
                keep = present > 0 if name == "image" else torch.ones_like(present, dtype=torch.bool)
                loss = loss + aux_w * bce(a[keep][:, 0], y[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=160, help="synthetic patients (default 160)")
    ap.add_argument("--rounds", type=int, default=7, help="timed epochs per side (default 7)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--fusion", default="cross_attention")
    ap.add_argument("--workdir", default=None, help="keep the cohort here between runs")
    ap.add_argument("--objective", choices=("same", "main"), default="same",
                    help="the bare loop's loss: the model's objective incl. auxiliary heads (default) or main only")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(work, a.n, a.fusion)
        n_cases = len(data["ds"])
        runs = {"mmai": mmai_epoch(data), "torch": torch_epoch(data, a.objective)}
        for fn in runs.values():  # warm-up epoch each (allocator, oneDNN kernels, first-touch caches)
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(a.rounds):  # alternate, so drift on a shared machine hits both sides alike
            for name in sorted(runs, reverse=bool(r % 2)):
                fn = runs[name]
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    rate = {k: n_cases / min(v) for k, v in times.items()}
    overhead = 1 - rate["mmai"] / rate["torch"]
    print(f"{'loop':8s} {'cases/s':>9s}  epochs (s)   [{n_cases} training cases, {a.fusion}, "
          f"{a.threads} thread(s)]")
    for k in runs:
        print(f"{k:8s} {rate[k]:9.1f}  " + " ".join(f"{t:.2f}" for t in times[k]))
    print(f"overhead of mmai's loop: {overhead:+.1%}")
    print(json.dumps({"mmai_cases_per_s": round(rate["mmai"], 2), "torch_cases_per_s": round(rate["torch"], 2),
                      "overhead": round(overhead, 4), "n_cases": n_cases, "fusion": a.fusion,
                      "threads": a.threads, "rounds": a.rounds, "torch_objective": a.objective}))


if __name__ == "__main__":
    main()
