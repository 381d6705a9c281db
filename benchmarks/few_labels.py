"""Label efficiency: does self-supervised pretraining (``mmai pretrain``) help when labels are few?

One ``mmai synth`` NIfTI cohort (binary: the lesion volume is in the image only; the clinical
score in the table) is preprocessed with the demo pipeline (9 mm, 32x32x24). Its held-out
``split == test`` patients score every model and are never used for fitting, selection or
pretraining. From the other patients (the pool):

1. ``mmai pretrain`` runs once on the images of the whole pool, without labels (the labelled
   subsets below are drawn from the same pool: their images are unlabelled data too);
2. for each labelled size L (default 100 / 200 / 400) and seed, L pool patients are drawn
   (seeded) and ``image_only`` and ``cross_attention`` are trained on them from scratch and from
   the pretrained encoder (``model.pretrained: DIR``; optional ``--pretrained-lr``), plus
   ``clinical_only`` as the reference the fusion must beat;
3. each run's test AUROC (C-index for ``--task survival``) comes from its metrics.json.

The image-only oracle is the same metric of the true lesion radius on the test patients, the
Bayes figure that of the true probabilities (truth.json).

    .venv/bin/python benchmarks/few_labels.py [--n 600] [--labels 100 200 400] [--seeds 0 1]
        [--epochs 24] [--pretrain-epochs 10] [--contrastive-weight 0] [--pretrained-lr 1.0]
        [--freeze N|all] [--models image_only cross_attention] [--jobs 2] [--quick] [--out DIR]

Every supervised run uses the demo recipe except ``train.ema``, left to mmai's self-configuring
default (see :func:`base_config`). The runs go ``--jobs`` at a time (default 2, one process and
one torch thread each: the 2-core host); the pretraining starts first and the runs that do not
need it fill the other core meanwhile. Where the time goes (one run at a time, idle host): a
supervised run is ~80% optimisation steps and ~20% validation (each recomputes the BatchNorm
statistics over 10 training batches); cohort writing + preprocessing ~1 min, pretraining ~2 min.
``--quick`` is a 3-minute smoke run.

With ``--out``, finished runs (and the pretraining) are reused by a later invocation with the same
recipe, so a long measurement can be split (e.g. ``--labels 400 --seeds 0`` on its own).

Last line: ``{"task": .., "oracle_image": .., "bayes_test": .., "results": {"100": {"image_only":
{"scratch": {"mean": .., "std": .., "values": [..]}, "pretrained": {...}, "gain": ..}, ...}, ...},
"pretrain": {...}, "timings": {"cohort": .., "runs": ..}, "seconds": ..}``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmai.config import PipelineConfig, PretrainConfig, TaskConfig  # noqa: E402
from mmai.demo import demo_config  # noqa: E402
from mmai.engine.metrics import auroc, c_index  # noqa: E402

log = logging.getLogger("benchmarks.few_labels")
IMAGE_MODELS = ("image_only", "cross_attention")


def base_config(task: str, epochs: int, pretrain_epochs: int, contrastive_weight: float = 0.0) -> PipelineConfig:
    """The demo pipeline for ``task`` with ``epochs`` of training and the pretraining settings.

    ``train.ema`` is left to mmai's self-configuring default (an EMA horizon of a sixth of the
    run's optimisation steps, :mod:`mmai.engine.autoconfig`) instead of the demo's 0.995: that
    value was tuned for 765 labelled patients (~1100 steps); with 100 labels a 24-epoch run has
    144 steps, and a 200-step horizon kept about half of every model at its initial weights
    (docs/benchmarks.md "Few labels")."""
    cfg = demo_config(epochs)
    return cfg.replace(task=TaskConfig(kind="binary" if task == "binary" else "survival"),
                       pretrain=PretrainConfig(epochs=pretrain_epochs, batch_size=16, lr=2e-3,
                                               contrastive_weight=contrastive_weight),
                       explicit=cfg.explicit - {"train.ema"})


def cohort(root: Path, cfg: PipelineConfig, task: str, n: int, seed: int, workers: int = 2
           ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The preprocessed manifest (validated) and truth.json of a synth cohort (reused when present)."""
    from mmai.io.manifest import load_manifest
    from mmai.preprocess import preprocess_frame
    from mmai.synth import SynthSpec, write_cohort

    folder = root / f"{task}_n{n}_seed{seed}"
    if not (folder / "cohort" / "truth.json").exists():
        write_cohort(folder / "cohort", SynthSpec(n=n, task=task, seed=seed, fmt="nifti"), progress=False,
                     workers=workers)
    if not (folder / "preprocessed" / "manifest.csv").exists():
        raw = load_manifest(folder / "cohort" / "manifest.csv", cfg)
        preprocess_frame(raw, cfg, folder / "preprocessed", workers=workers, progress=False)
    df = load_manifest(folder / "preprocessed" / "manifest.csv", cfg)
    truth = json.loads((folder / "cohort" / "truth.json").read_text())
    radius = pd.read_csv(folder / "cohort" / "truth.csv", dtype={"case_id": str})[["case_id", "lesion_radius_mm"]]
    return df.merge(radius, on="case_id", how="left"), truth


def oracle_image(test: pd.DataFrame, task: str) -> float:
    """The test metric of the true lesion radius alone (the image's whole information)."""
    r = test["lesion_radius_mm"].to_numpy(float)
    if task == "binary":
        return float(auroc(test["label"].to_numpy(int), r))
    return float(c_index(test["time"].to_numpy(float), test["event"].to_numpy(int), r))


def run_pretrain(cfg: PipelineConfig, pool: pd.DataFrame, out: Path) -> dict[str, Any]:
    from mmai.pretrain.run import pretrain, pretrain_config

    if (out / "pretrain.json").exists():  # reused: the epochs' seconds from its log
        summary = json.loads((out / "pretrain.json").read_text())
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        summary["seconds"] = round(sum(float(r.get("seconds", 0)) for r in rows), 1)
        return summary
    out.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / "unlabelled.csv"
    pool[["case_id", "patient_id", cfg.image.column if cfg.image else "image"]].to_csv(manifest, index=False)
    t = time.time()
    summary = pretrain(pretrain_config(cfg), manifest, out, device="cpu", progress=False)
    summary["seconds"] = round(time.time() - t, 1)
    log.info("pretraining: %s", summary)
    return summary


def feature_probe(cfg: PipelineConfig, df: pd.DataFrame, pre_dir: Path, seed: int = 0) -> dict[str, float]:
    """How much of the lesion radius a frozen encoder's pooled features hold: 5-fold cross-validated
    R^2 of a ridge regression (features -> true radius) on the pool, for the pretrained encoder and
    for the same encoder at random initialisation (no labels of the outcome involved)."""
    import torch
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_score

    from mmai.engine.prepare import build_dataset
    from mmai.models.image_encoders import create_encoder
    from mmai.models.pretrained import load_into, read_checkpoint

    ds = build_dataset(cfg, df, pre=None, targets=None, uses_image=True)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])  # (N, 1, D, H, W)
    y = df["lesion_radius_mm"].to_numpy(float)
    out: dict[str, float] = {}
    for arm in ("random_init", "pretrained"):
        torch.manual_seed(seed)
        enc = create_encoder(cfg.model.encoder, in_channels=x.shape[1], widths=cfg.model.widths)
        if arm == "pretrained":
            tensors, fmt, _ = read_checkpoint(pre_dir)
            load_into(enc, tensors, source=str(pre_dir), fmt=fmt)
        enc.eval()
        with torch.no_grad():
            feats = torch.cat([enc(x[i : i + 64]) for i in range(0, len(x), 64)]).numpy()  # (N, C)
        ridge = RidgeCV(alphas=np.logspace(-3, 3, 13))
        out[f"probe_r2_{arm}"] = round(float(cross_val_score(ridge, feats, y, cv=5, scoring="r2").mean()), 4)
    return out


def train_one(cfg: PipelineConfig, df: pd.DataFrame, out: Path, fusion: str, seed: int,
              pretrained: Path | None, pretrained_lr: float, freeze: bool | int = False) -> float:
    """Train one model on ``df`` (labelled pool patients + the test patients) into ``out``; its test
    AUROC / C-index. ``freeze``: ``model.freeze_pretrained`` of the pretrained arm (True: frozen
    throughout, N: for the first N epochs)."""
    from mmai.engine.trainer import headline, train

    if (out / "DONE").exists():  # finished by an earlier invocation with the same --out (same recipe)
        return float(json.loads((out / "metrics.json").read_text())["test"][headline(cfg.task.kind)])
    if out.exists():
        shutil.rmtree(out)
    model = dataclasses.replace(cfg.model, fusion=fusion, pretrained=str(pretrained) if pretrained else None,
                                pretrained_lr=pretrained_lr if pretrained else 1.0,
                                freeze_pretrained=freeze if pretrained else False)
    mcfg = cfg.replace(model=model, train=dataclasses.replace(cfg.train, seed=seed))
    m = train(mcfg, df, out, device="cpu", progress=False)
    return float(m["test"][headline(cfg.task.kind)])


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: the pretraining (``fusion == "pretrain"``) or one supervised run."""

    n_lab: int
    seed: int
    fusion: str
    arm: str  # scratch | pretrained
    out: Path

    @property
    def cost(self) -> float:
        """Relative CPU cost (for longest-first scheduling): image runs scale with the labelled cases."""
        if self.fusion == "pretrain":
            return 1e9
        return self.n_lab * (0.1 if self.fusion == "clinical_only" else 1.0)


def _worker_init() -> None:
    """One torch thread per worker process (two workers = the two cores); quiet library logs."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("mmai", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _run_job(job: Job, cfg: PipelineConfig, df: pd.DataFrame, pre_dir: Path, pretrained_lr: float,
             freeze: bool | int) -> tuple[Job, Any, float]:
    """Run ``job`` (in a worker process or in-line); (job, test metric or pretrain summary, seconds)."""
    t = time.time()
    if job.fusion == "pretrain":
        value: Any = run_pretrain(cfg, df, pre_dir)
    else:
        src = pre_dir if job.arm == "pretrained" else None
        value = train_one(cfg, df, job.out, job.fusion, job.seed, src, pretrained_lr, freeze)
    return job, value, time.time() - t


def run_jobs(jobs: list[tuple[Job, pd.DataFrame]], pre_job: tuple[Job, pd.DataFrame], cfg: PipelineConfig,
             pre_dir: Path, pretrained_lr: float, freeze: bool | int, workers: int
             ) -> tuple[dict[Job, float], dict[str, Any]]:
    """The pretraining and every run, ``workers`` processes at a time (one torch thread each).

    The pretraining starts first and the runs that do not need it (from scratch, clinical-only)
    fill the other workers meanwhile; the pretrained arms are queued when it has finished.
    Longest runs first, so the last minutes are not one long run on one core."""
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    later = sorted([j for j in jobs if j[0].arm == "pretrained"], key=lambda j: -j[0].cost)
    first = [pre_job, *sorted([j for j in jobs if j[0].arm != "pretrained"], key=lambda j: -j[0].cost)]
    values: dict[Job, float] = {}
    summary: dict[str, Any] = {}

    def record(job: Job, value: Any, seconds: float) -> None:
        if job.fusion == "pretrain":
            summary.update(value)
            log.info("pretraining done (%.0f s): %s", seconds, value)
        else:
            values[job] = float(value)
            log.info("L=%d seed %d %s %s: %.4f (%.0f s)", job.n_lab, job.seed, job.fusion, job.arm, value, seconds)

    if workers <= 1:
        for job, df in [*first, *later]:
            record(*_run_job(job, cfg, df, pre_dir, pretrained_lr, freeze))
        return values, summary
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        pending: set[Future[Any]] = {pool.submit(_run_job, job, cfg, df, pre_dir, pretrained_lr, freeze)
                                     for job, df in first}
        queued = False
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                job, value, seconds = fut.result()
                record(job, value, seconds)
                if job.fusion == "pretrain" and not queued:
                    pending |= {pool.submit(_run_job, j, cfg, d, pre_dir, pretrained_lr, freeze) for j, d in later}
                    queued = True
    return values, summary


def spread(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.0,
            "min": round(float(v.min()), 4), "max": round(float(v.max()), 4), "values": [round(float(x), 4) for x in v]}


def _freeze_arg(text: str) -> bool | int:
    """``--freeze``: ``all`` (frozen throughout), or N epochs of warm-up with the encoder frozen."""
    if text == "all":
        return True
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--freeze takes 'all' or a whole number of epochs, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"--freeze must be >= 0 epochs, got {n}")
    return n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="binary", choices=["binary", "survival"])
    ap.add_argument("--n", type=int, default=600, help="patients in the cohort (25%% held out for test)")
    ap.add_argument("--labels", type=int, nargs="+", default=[100, 200, 400], help="labelled pool sizes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=24, help="training epochs of every supervised run")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrained-lr", type=float, default=1.0, help="model.pretrained_lr of the fine-tunes")
    ap.add_argument("--freeze", type=_freeze_arg, default=0,
                    help="model.freeze_pretrained of the pretrained arm: N warm-up epochs with the encoder frozen "
                    "(default 0), or 'all'")
    ap.add_argument("--contrastive-weight", type=float, default=0.0,
                    help="pretrain.contrastive_weight (default 0: inpainting only, the better recipe here, see "
                    "docs/benchmarks.md)")
    ap.add_argument("--models", nargs="+", default=list(IMAGE_MODELS), choices=list(IMAGE_MODELS))
    ap.add_argument("--jobs", type=int, default=2,
                    help="runs in parallel, one process and one torch thread each (default 2: the 2-core host)")
    ap.add_argument("--quick", action="store_true", help="n=240, labels 60 120, one seed, 3 + 3 epochs (smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="keep cohorts and runs here (default: a temp dir)")
    a = ap.parse_args(argv)
    _worker_init()
    if a.quick:
        a.n, a.labels, a.seeds, a.epochs, a.pretrain_epochs = 240, [60, 120], [0], 3, 3
    t0 = time.time()
    cfg = base_config(a.task, a.epochs, a.pretrain_epochs, a.contrastive_weight)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or Path(tmp)
        df, truth = cohort(root, cfg, a.task, a.n, 0, workers=max(1, a.jobs))
        timings["cohort"] = round(time.time() - t0, 1)
        test = df[df["split"] == "test"].reset_index(drop=True)
        pool = df[df["split"] != "test"].reset_index(drop=True)
        if max(a.labels) > len(pool):
            raise SystemExit(f"--labels {max(a.labels)} > {len(pool)} pool patients; raise --n")
        folder = root / f"{a.task}_n{a.n}_seed0"
        tag = f"p{a.pretrain_epochs}_c{a.contrastive_weight:g}"
        pre_dir = folder / f"pretrain_{tag}"
        freeze_tag = "" if a.freeze is False or a.freeze == 0 else ("_frozen" if a.freeze is True else f"_warm{a.freeze}")
        jobs: list[tuple[Job, pd.DataFrame]] = []
        for n_lab in a.labels:
            for seed in a.seeds:
                lab = pool.sample(n=n_lab, random_state=seed)
                sub = pd.concat([lab, test], ignore_index=True)
                runs = folder / f"runs_e{a.epochs}_emaauto" / f"L{n_lab}_s{seed}"
                for fusion in a.models:
                    jobs.append((Job(n_lab, seed, fusion, "scratch", runs / f"{fusion}_scratch"), sub))
                    name = f"{fusion}_pretrained_{tag}_lr{a.pretrained_lr:g}{freeze_tag}"
                    jobs.append((Job(n_lab, seed, fusion, "pretrained", runs / name), sub))
                jobs.append((Job(n_lab, seed, "clinical_only", "scratch", runs / "clinical_only"), sub))
        t = time.time()
        got, pre_summary = run_jobs(jobs, (Job(0, 0, "pretrain", "", pre_dir), pool), cfg, pre_dir,
                                    a.pretrained_lr, a.freeze, a.jobs)
        timings["runs"] = round(time.time() - t, 1)
        pre_summary.update(feature_probe(cfg, pool, pre_dir))
        log.info("feature probe: %s", pre_summary)
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for job, _ in jobs:  # grid order: labels, seeds, models
        per = values.setdefault(str(job.n_lab), {}).setdefault(job.fusion, {})
        per.setdefault(job.arm, []).append(got[job])
    results: dict[str, Any] = {}
    for n_lab, per in values.items():
        results[n_lab] = {}
        for model, arms in per.items():
            entry: dict[str, Any] = {arm: spread(v) for arm, v in arms.items()}
            if "pretrained" in arms:
                gains = np.asarray(arms["pretrained"]) - np.asarray(arms["scratch"])
                entry["gain"] = spread(list(gains))
            results[n_lab][model] = entry
    out = {"task": a.task, "metric": truth["metric"], "n": a.n, "n_test": len(test), "n_pool": len(pool),
           "labels": a.labels, "seeds": a.seeds, "epochs": a.epochs, "pretrain_epochs": a.pretrain_epochs,
           "pretrained_lr": a.pretrained_lr, "freeze": a.freeze, "contrastive_weight": a.contrastive_weight,
           "jobs": a.jobs, "oracle_image": round(oracle_image(test, a.task), 4),
           "bayes_test": round(float(truth["bayes_test"]), 4), "pretrain": pre_summary, "results": results,
           "quick": a.quick, "timings": timings, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
