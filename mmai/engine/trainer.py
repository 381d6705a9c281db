"""Training: the loop (AMP, gradient accumulation, early stopping, resume, DDP) and the run folder.

``train_from_files`` is what ``mmai train`` calls. It writes RUN_DIR/config.yaml (resolved),
model.safetensors (best validation epoch), state.json (everything inference needs:
clinical preprocessor, target encoding, image pipeline, model constructor arguments, versions),
metrics.json (validation and held-out test metrics with bootstrap CIs; test rows are never
used for fitting or selection), log.jsonl (one line per epoch) and plots/.

Under ``torchrun`` (WORLD_SIZE > 1) it trains with DistributedDataParallel; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmai.config import PipelineConfig, dump_config, load_config
from mmai.data.provenance import run_image_state
from mmai.data.splits import Split, make_splits
from mmai.engine.checkpoint import load_training_checkpoint, save_training_checkpoint, save_weights
from mmai.engine.prepare import TargetEncoding, build_dataset, feature_specs, fit_clinical
from mmai.errors import CheckpointError, ConfigError
from mmai.io.manifest import load_manifest
from mmai.models.heads import n_outputs_for, outputs_to_predictions, task_loss
from mmai.models.registry import create_model
from mmai.transforms.pipelines import augment_transforms, image_channels
from mmai.utils import atomic_write_json, atomic_write_text, resolve_device, seed_everything

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _init_distributed(device: str) -> tuple[int, int, str]:
    rank, local_rank, world = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return rank, world, device


# ----------------------------------------------------------------------------- loop


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    """Move a batch to ``device``; 5-D image batches in channels-last layout (the model's layout:
    3D convolutions run about a quarter faster that way on CPU)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.dim() == 5:
                v = v.contiguous(memory_format=torch.channels_last_3d)
        out[k] = v
    return out


def _forward(model: torch.nn.Module, batch: dict[str, Any], *, return_aux: bool = False) -> Any:
    """The model's outputs (B, n_outputs); with ``return_aux``, ``(outputs, aux dict)``."""
    return model(batch.get("image"), batch["image_present"], batch["clinical"], batch["clinical_mask"],
                 return_aux=return_aux, **({"affine": batch.get("affine")} if getattr(_unwrap(model), "accepts_affine", False) else {}))


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, loader: DataLoader, device: str, amp: bool = False
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Raw outputs (N, n_outputs) on CPU and the concatenated targets of a loader."""
    model.eval()
    outs: list[torch.Tensor] = []
    targets: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        batch = _to(batch, device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            out = _forward(model, batch)
        outs.append(out.float().cpu())
        for k in ("target", "time", "event"):
            if k in batch:
                targets.setdefault(k, []).append(batch[k].cpu())
    return torch.cat(outs), {k: torch.cat(v) for k, v in targets.items()}


def evaluate_outputs(kind: str, out: torch.Tensor, targets: dict[str, torch.Tensor], classes: list[str],
                     n_boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """Loss + task metrics (with bootstrap CIs when n_boot > 0) of raw outputs."""
    from mmai.engine.metrics_report import compute_metrics

    loss = float(task_loss(kind, out, targets))
    pred = outputs_to_predictions(kind, out).numpy()
    # compute_metrics reports undefined metrics (e.g. one class in a tiny split) as None
    if kind in ("binary", "multiclass"):
        y = targets["target"].numpy().astype(int)
        m = compute_metrics(kind, y=y, prob=pred, n_boot=n_boot, seed=seed)
    elif kind == "regression":
        m = compute_metrics(kind, y=targets["target"].numpy(), pred=pred[:, 0], n_boot=n_boot, seed=seed)
    else:
        m = compute_metrics(kind, time=targets["time"].numpy(), event=targets["event"].numpy(),
                            risk=pred[:, 0], n_boot=n_boot, seed=seed)
    return {"loss": loss, **{k: v for k, v in m.items() if k not in ("calibration",)}}


def _headline(kind: str) -> str:
    return {"binary": "auroc", "multiclass": "auroc", "regression": "mae", "survival": "c_index"}[kind]


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, loader: DataLoader, device: str, max_batches: int = 10) -> None:
    """Replace BatchNorm running statistics by their average over up to ``max_batches`` training
    batches with the current weights ("precise BN"). The running averages accumulated during the
    epoch lag behind weights that moved, which makes eval-mode predictions (validation loss, the
    saved model) erratic on small cohorts."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        _forward(model, _to(batch, device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def _aux_loss(aux: dict[str, torch.Tensor], kind: str, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the unimodal auxiliary losses of a forward's ``aux`` outputs (0 if none).
    The image head only counts cases whose image is present."""
    total = torch.zeros((), device=batch["image_present"].device)
    for name, out in aux.items():
        keep = batch["image_present"] > 0 if name == "image" else torch.ones_like(batch["image_present"], dtype=torch.bool)
        if int(keep.sum()) < 2:
            continue
        sub = {k: v[keep] for k, v in batch.items() if k in ("target", "time", "event")}
        total = total + task_loss(kind, out[keep].float(), sub)
    return total


def _selection_score(row: dict[str, Any], kind: str, select_metric: str) -> float:
    """Lower is better. ``auto``: minus the validation AUROC / C-index (ranking metrics are not
    thrown off by a few over-confident predictions the way the loss is), the validation loss for
    regression; ``loss``: the validation loss. Without validation rows: the training loss."""
    if "val_loss" not in row:
        return float(row["train_loss"])
    head = _headline(kind)
    if select_metric == "auto" and kind != "regression" and row.get(f"val_{head}") is not None:
        return -float(row[f"val_{head}"])
    return float(row["val_loss"])


@dataclasses.dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]


def fit(model: torch.nn.Module, config: PipelineConfig, train_loader: DataLoader, val_loader: DataLoader | None,
        *, kind: str, classes: list[str], device: str, ckpt_dir: Path | None = None, resume: bool = False,
        progress: bool = True, rank: int = 0, log_path: Path | None = None) -> FitResult:
    """Train ``model`` with AdamW + cosine schedule; keep the weights of the best validation epoch
    (see :func:`_selection_score`) and stop after ``train.patience`` epochs without improvement."""
    tc = config.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / tc.accumulate))
    total = tc.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, max(1, total // 20))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    amp = tc.amp and device.startswith("cuda")
    history: list[dict[str, Any]] = []
    best_score, best_epoch, bad_epochs, start_epoch, step = math.inf, 0, 0, 1, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    raw_model = _unwrap(model)
    # the weights that are validated and kept: an exponential moving average when train.ema > 0
    ema = (torch.optim.swa_utils.AveragedModel(raw_model, use_buffers=True,
                                               multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tc.ema))
           if tc.ema > 0 else None)
    eval_model = ema.module if ema is not None else raw_model
    if resume and ckpt_dir is not None and (ckpt_dir / "last.json").exists():
        info, best, ema_state = load_training_checkpoint(ckpt_dir, raw_model, opt)
        if ema is not None and ema_state is not None:
            eval_model.load_state_dict(ema_state)
            ema.n_averaged.fill_(int(info.get("ema_n", 1)))
        start_epoch, step = info["epoch"] + 1, info["step"]
        best_score, best_epoch, bad_epochs = info["best_score"], info["best_epoch"], info["bad_epochs"]
        history = info.get("history", [])
        if best is not None:
            best_state = best
        torch.manual_seed(tc.seed + start_epoch)
        log.info("resumed from %s at epoch %d", ckpt_dir, start_epoch)
    elif resume:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
    bar = tqdm(range(start_epoch, tc.epochs + 1), desc="train", unit="epoch", disable=not progress or rank != 0,
               initial=start_epoch - 1, total=tc.epochs)
    for epoch in bar:
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        t0, losses = time.time(), []
        opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(train_loader):
            batch = _to(batch, device)
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                out, aux = _forward(model, batch, return_aux=True)
                loss = task_loss(kind, out.float(), batch)
                loss = loss + config.model.aux_weight * _aux_loss(aux, kind, batch)
            (loss / tc.accumulate).backward()
            losses.append(float(loss.detach()))
            if (i + 1) % tc.accumulate == 0 or i + 1 == len(train_loader):
                for g in opt.param_groups:
                    g["lr"] = tc.lr * lr_at(step)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if ema is not None:
                    ema.update_parameters(raw_model)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                               "lr": tc.lr * lr_at(max(0, step - 1)), "seconds": round(time.time() - t0, 2)}
        if val_loader is not None:
            recompute_batchnorm(eval_model, train_loader, device)
            out, tgt = predict_outputs(eval_model, val_loader, device, amp)
            val = evaluate_outputs(kind, out, tgt, classes)
            row["val_loss"] = val["loss"]
            head = _headline(kind)
            if val.get(head) is not None:
                row[f"val_{head}"] = val[head]
        score = _selection_score(row, kind, tc.select_metric)
        if score < best_score - 1e-5:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in eval_model.state_dict().items()}
        else:
            bad_epochs += 1
        history.append(row)
        if rank == 0:
            if log_path is not None:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith(("train_loss", "val_"))})
            if ckpt_dir is not None:
                save_training_checkpoint(ckpt_dir, raw_model, opt, {
                    "epoch": epoch, "step": step, "best_score": best_score, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "history": history,
                    "ema_n": int(ema.n_averaged) if ema is not None else 0}, best_model_state=best_state,
                    ema_state=eval_model.state_dict() if ema is not None else None)
        if bad_epochs >= tc.patience:
            log.info("early stopping at epoch %d (best epoch %d)", epoch, best_epoch)
            break
    bar.close()
    return FitResult(best_state=best_state, best_epoch=best_epoch, history=history)


# ----------------------------------------------------------------------------- one split


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


def _loader(ds: Any, batch_size: int, shuffle: bool, world: int, seed: int, num_workers: int) -> DataLoader:
    sampler: torch.utils.data.Sampler[int] | None = None
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=shuffle, seed=seed)
        shuffle = False
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=g,
                      num_workers=num_workers, drop_last=False)


def train_split(config: PipelineConfig, df: pd.DataFrame, split: Split, out_dir: Path, *, device: str,
                resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fit preprocessing + model on one split; write the run folder; return metrics."""
    rank, world, device = _init_distributed(device)
    seed_everything(config.train.seed)
    kind, fusion = config.task.kind, config.model.fusion
    train_df, val_df, test_df = (df.iloc[idx].reset_index(drop=True) for idx in (split.train, split.val, split.test))
    enc = TargetEncoding.fit(config, train_df)
    pre = fit_clinical(config, train_df)
    specs = feature_specs(pre)
    mc = config.model
    model_kwargs: dict[str, Any] = dict(n_outputs=n_outputs_for(kind, len(enc.classes)), in_channels=image_channels(config.image) if config.image else 1, encoder=mc.encoder,
                        widths=list(mc.widths), dim=mc.dim, heads=mc.heads, layers=mc.layers, dropout=mc.dropout,
                        clinical_encoder=mc.clinical_encoder)
    model_kwargs.update(windows=dataclasses.asdict(mc.windows) if mc.windows else None, bidirectional=mc.bidirectional)
    try:
        model = create_model(fusion, feature_specs=specs, **model_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    uses_image = model.uses_image
    if uses_image and config.image is None:
        raise ConfigError(f"--fusion {fusion} needs images, but the pipeline has image: null")
    aug = augment_transforms(config.image, seed=config.train.seed) if uses_image and config.image else None
    train_ds = build_dataset(config, train_df, pre=pre, uses_image=uses_image, targets=enc.encode(config, train_df),
                             augment=aug, image_dropout=mc.image_dropout, seed=config.train.seed)
    val_ds = build_dataset(config, val_df, pre=pre, uses_image=uses_image, targets=enc.encode(config, val_df),
                           loader=train_ds.loader)
    for ds in (train_ds, val_ds):
        ds.preload(progress=progress and rank == 0)
    # channels-last 5-D weights (torch's stubs omit Module.to's memory_format keyword)
    model.to(device, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    wrapped: torch.nn.Module = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    bs, nw, seed = config.train.batch_size, config.train.num_workers, config.train.seed
    train_loader = _loader(train_ds, bs, True, world, seed, nw)
    val_loader = _loader(val_ds, bs, False, 1, seed, nw) if len(val_ds) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    if rank == 0 and not resume and log_path.exists():
        log_path.unlink()
    result = fit(wrapped, config, train_loader, val_loader, kind=kind, classes=enc.classes, device=device,
                 ckpt_dir=out_dir / "ckpt", resume=resume, progress=progress, rank=rank, log_path=log_path)
    raw: torch.nn.Module = model
    raw.load_state_dict(result.best_state)
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "n_train": len(train_df), "n_val": len(val_df),
                               "n_test": len(test_df), "fusion": fusion, "split": split.name}
    if val_loader is not None:
        metrics["val"] = evaluate_outputs(kind, *predict_outputs(raw, val_loader, device), enc.classes,
                                          n_boot=1000, seed=seed)
    if len(test_df):
        test_ds = build_dataset(config, test_df, pre=pre, uses_image=uses_image,
                                targets=enc.encode(config, test_df), loader=train_ds.loader)
        test_loader = _loader(test_ds, bs, False, 1, seed, nw)
        metrics["test"] = evaluate_outputs(kind, *predict_outputs(raw, test_loader, device), enc.classes,
                                           n_boot=1000, seed=seed)
    if rank == 0:
        _write_run(out_dir, config, raw, model_kwargs, enc, pre, metrics, result, train_ds.loader)
    if rank == 0 and kind == "survival":  # Breslow baseline hazard on the (unaugmented) training rows
        from mmai.engine.survival import write_baseline_hazard

        fit_ds = build_dataset(config, train_df, pre=pre, uses_image=uses_image,
                               targets=enc.encode(config, train_df), loader=train_ds.loader)
        write_baseline_hazard(out_dir / "state.json", *predict_outputs(raw, _loader(fit_ds, bs, False, 1, seed, nw),
                                                                       device))
    return metrics


def _write_run(out_dir: Path, config: PipelineConfig, model: torch.nn.Module, model_kwargs: dict[str, Any],
               enc: TargetEncoding, pre: Any, metrics: dict[str, Any], result: FitResult, loader: Any = None) -> None:
    import monai

    import mmai

    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    digest = hashlib.sha1()
    for k in sorted(state_dict):
        digest.update(k.encode())
        digest.update(state_dict[k].numpy().tobytes())
    model_id = f"{config.model.fusion}-{digest.hexdigest()[:10]}"
    save_weights(state_dict, out_dir / "model.safetensors", metadata={"format": "mmai", "model_id": model_id})
    dump_config(config, out_dir / "config.yaml")
    state = {
        "model_id": model_id, "fusion": config.model.fusion, "model_kwargs": model_kwargs,
        "uses_image": bool(getattr(model, "uses_image", True)),
        "target": enc.to_state(), "task": dataclasses.asdict(config.task),
        "clinical": pre.to_state() if pre is not None else None,
        "image": None if config.image is None else run_image_state(config.image, loader),
        "best_epoch": result.best_epoch,
        "versions": {"mmai": mmai.__version__, "torch": torch.__version__, "monai": monai.__version__},
    }
    atomic_write_json(out_dir / "state.json", state)
    atomic_write_json(out_dir / "metrics.json", {"model_id": model_id, **metrics})
    try:
        from mmai.plots import plot_training_curves

        plot_training_curves(result.history, out_dir / "plots" / "training_curves.png")
    except ImportError:
        log.debug("plots unavailable")
    atomic_write_text(out_dir / "DONE", model_id + "\n")


# ----------------------------------------------------------------------------- entry point


def apply_overrides(config: PipelineConfig, *, fusion: str | None = None, epochs: int | None = None,
                    folds: int | None = None) -> PipelineConfig:
    model, train = config.model, config.train
    if fusion is not None:
        model = dataclasses.replace(model, fusion=fusion)
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {epochs}")
        train = dataclasses.replace(train, epochs=epochs)
    if folds is not None:
        if folds < 1:
            raise ConfigError(f"--folds must be >= 1, got {folds}")
        train = dataclasses.replace(train, folds=folds)
    return config.replace(model=model, train=train)


def train(config: PipelineConfig, df: pd.DataFrame, out_dir: Path, *, device: str | None = None,
          resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train on a validated manifest. With train.folds = K > 1, first K cross-validation runs
    (RUN_DIR/folds/foldK/), then the final model on all non-test rows; metrics.json gains
    ``cv`` (per-fold validation metrics and their mean)."""
    device = resolve_device(device)
    t = config.task
    splits = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=config.train.folds,
                         val_fraction=config.train.val_fraction, seed=config.train.seed)
    out_dir = Path(out_dir)
    if config.train.folds == 1:
        return train_split(config, df, splits[0], out_dir, device=device, resume=resume, progress=progress)
    cv = []
    for split in splits:
        log.info("cross-validation %s: %d train / %d val", split.name, len(split.train), len(split.val))
        cv.append(train_split(config, df, split, out_dir / "folds" / split.name, device=device, resume=resume,
                              progress=progress))
    final = make_splits(df, kind=t.kind, target=t.target, event=t.event, folds=1,
                        val_fraction=config.train.val_fraction, seed=config.train.seed)[0]
    metrics = train_split(config, df, final, out_dir, device=device, resume=resume, progress=progress)
    head = _headline(t.kind)
    vals = [m.get("val", {}).get(head) for m in cv]
    vals = [v for v in vals if v is not None]
    metrics["cv"] = {"folds": [m.get("val") for m in cv], f"mean_{head}": float(np.mean(vals)) if vals else None,
                     f"std_{head}": float(np.std(vals)) if vals else None}
    if _dist_info()[0] == 0:
        atomic_write_json(out_dir / "metrics.json", {**json.loads((out_dir / "metrics.json").read_text()),
                                                     "cv": metrics["cv"]})
    return metrics


def train_from_files(config_path: Path, manifest_path: Path, out_dir: Path, *, fusion: str | None = None,
                     folds: int | None = None, epochs: int | None = None, device: str | None = None,
                     resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``mmai train``: load + validate the config and manifest, train, write RUN_DIR."""
    config = apply_overrides(load_config(config_path), fusion=fusion, epochs=epochs, folds=folds)
    df = load_manifest(manifest_path, config)
    metrics = train(config, df, Path(out_dir), device=device, resume=resume, progress=progress)
    head = _headline(config.task.kind)
    summary = {k: metrics.get(k) for k in ("fusion", "best_epoch", "n_train", "n_val", "n_test")}
    for part in ("val", "test"):
        if part in metrics:
            summary[f"{part}_{head}"] = metrics[part].get(head)
    return summary
