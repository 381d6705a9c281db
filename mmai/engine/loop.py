"""The training loop: :func:`fit` runs epochs as a few named steps.

    state = resume or start
    validate_initial_model(...)           # epoch 0 (the GLM base term + zero residuals) is a candidate
    for each epoch:
        row = train_one_epoch(...)        # forward, losses, backward (no_sync), optimizer step
        row |= validate(...)              # precise BN, sharded prediction, gathered metrics
        keep_best_and_check_stop(...)     # same decision on every rank
        log_epoch(...)                    # log.jsonl (+ TensorBoard scalars, validation overlay images), rank 0
        save_checkpoint(...)              # one atomic commit per epoch (mmai.engine.state)

Everything the loop needs (model, optimizer, scheduler, AMP, EMA, loaders) is built once by
:func:`build_engine` into an :class:`Engine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmai.config import PipelineConfig
from mmai.engine.checkpoint import CheckpointStore
from mmai.engine.distributed import DistInfo, all_sum, average_batchnorm, broadcast_flag, maybe_no_sync
from mmai.engine.ema import EMA
from mmai.engine.engine import Engine
from mmai.engine.glm_guard import clears_initial, outputs_doc, z_threshold
from mmai.engine.runlog import RunLog
from mmai.engine.state import TrainState, load_checkpoint, save_checkpoint
from mmai.engine.trainer import (
    _forward,
    _to,
    autocast,
    aux_loss,
    evaluate_outputs,
    headline,
    predict_outputs,
    recompute_batchnorm,
    selection_score,
)
from mmai.errors import ConfigError
from mmai.figures import tensorboard as tb_images
from mmai.models.heads import task_loss
from mmai.models.pretrained import frozen_for, param_groups

log = logging.getLogger(__name__)

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_schedule(config: PipelineConfig, steps_per_epoch: int) -> Any:
    """Multiplier of train.lr at optimizer step s: linear warm-up over ``train.warmup`` of the
    steps (at most one epoch), then cosine decay to 0 (``scheduler: cosine``) or constant."""
    tc = config.train
    if not 0.0 <= tc.warmup < 1.0:
        raise ConfigError(f"{config.source}: train.warmup must be in [0, 1), got {tc.warmup}")
    total = tc.epochs * steps_per_epoch
    warmup = min(steps_per_epoch, max(1, int(total * tc.warmup)))
    cosine = tc.scheduler == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def build_engine(model: torch.nn.Module, raw: torch.nn.Module, config: PipelineConfig, train_loader: DataLoader,
                 val_loader: DataLoader | None, *, info: DistInfo, kind: str, classes: list[str],
                 generator: torch.Generator | None = None, train_ds: Any = None,
                 select_metric: str | None = None) -> Engine:
    """AdamW + the LR schedule (a torch ``LambdaLR``), EMA, AMP (with a GradScaler for fp16).
    ``select_metric``: what best-epoch selection compares on this split (``loss`` or ``auto``,
    see :func:`mmai.engine.autoconfig.resolve_select_metric`); default ``train.select_metric``."""
    tc = config.train
    # foreach: one fused kernel per step over all tensors (torch's default on CUDA, not on CPU)
    # model.pretrained: the loaded encoder parameters in their own group (lr x model.pretrained_lr)
    groups = param_groups(raw, tc.lr, config.model.pretrained_lr)
    opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
    steps_per_epoch = max(1, math.ceil(len(train_loader) / tc.accumulate))
    factor = lr_schedule(config, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor] + [
        frozen_for(config.model.freeze_pretrained, steps_per_epoch, factor)] * (len(groups) - 1))
    ema = EMA(raw, tc.ema) if tc.ema > 0 else None
    amp = AMP_DTYPES[str(tc.amp)]
    device_type = info.device.split(":")[0]
    if amp is torch.float16 and device_type != "cuda":
        raise ConfigError(f"train.amp = fp16 needs CUDA (device {info.device}); use bf16 or off")
    if amp is torch.bfloat16 and device_type == "cpu":
        log.warning("train.amp = bf16 on CPU: slower than fp32 here, and torch's CPU bf16 conv3d weight "
                    "gradient is unreliable on feature maps smaller than the kernel (docs/training.md)")
    scaler = torch.amp.GradScaler(device_type) if amp is torch.float16 else None
    return Engine(model=model, raw=raw, opt=opt, sched=sched, ema=ema, amp=amp, scaler=scaler,
                  train_loader=train_loader, val_loader=val_loader, generator=generator, train_ds=train_ds,
                  info=info, config=config, kind=kind, classes=classes,
                  select_metric=select_metric or tc.select_metric)


# ----------------------------------------------------------------------------- steps


def _optimizer_step(eng: Engine) -> None:
    """Unscale (fp16), clip, step, schedule, EMA."""
    if eng.scaler is not None:
        eng.scaler.unscale_(eng.opt)
    torch.nn.utils.clip_grad_norm_(eng.params, 5.0, foreach=True)
    eng.last_lr = float(eng.opt.param_groups[0]["lr"])
    if eng.scaler is not None:
        eng.scaler.step(eng.opt)
        eng.scaler.update()
    else:
        eng.opt.step()
    eng.opt.zero_grad(set_to_none=True)
    eng.sched.step()
    if eng.ema is not None:
        eng.ema.update_parameters(eng.raw)


def _batch_loss(eng: Engine, batch: dict[str, Any]) -> torch.Tensor:
    """Task loss + model.aux_weight x auxiliary unimodal losses of one batch."""
    with autocast(eng.device, eng.amp):
        out, aux = _forward(eng.model, batch, return_aux=True)
        loss = task_loss(eng.kind, out.float(), batch)
        if aux:
            loss = loss + eng.config.model.aux_weight * aux_loss(aux, eng.kind, batch)
    return loss


def train_one_epoch(eng: Engine, epoch: int, state: TrainState) -> dict[str, Any]:
    """One pass over the training shard with gradient accumulation (DDP all-reduces gradients
    once per optimizer step); returns the epoch's row (train loss averaged over all ranks' cases)."""
    tc, loader = eng.config.train, eng.train_loader
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    eng.model.train()
    t0, n_batches = time.time(), len(loader)
    loss_sum = torch.zeros((), dtype=torch.float64, device=eng.device)
    n_cases = 0
    eng.opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        batch = _to(batch, eng.device)
        sync = (i + 1) % tc.accumulate == 0 or i + 1 == n_batches
        with maybe_no_sync(eng.model, sync):
            loss = _batch_loss(eng, batch)
            scaled = loss / tc.accumulate
            (eng.scaler.scale(scaled) if eng.scaler is not None else scaled).backward()
        bs = int(batch["clinical"].shape[0])
        loss_sum += loss.detach().double() * bs
        n_cases += bs
        if sync:
            _optimizer_step(eng)
            state.step += 1
    total, count = all_sum([float(loss_sum), float(n_cases)], eng.info)
    return {"epoch": epoch, "train_loss": total / count if count else float("nan"), "lr": eng.last_lr,
            "seconds": round(time.time() - t0, 2), "world_size": eng.info.world}


def validate(eng: Engine) -> dict[str, Any]:
    """Precise BatchNorm (pooled over ranks), then validation loss and headline metric of the
    eval model over the whole validation set (each rank predicts its shard; outputs gathered)."""
    return validate_outputs(eng)[0]


def validate_outputs(eng: Engine) -> tuple[dict[str, Any], torch.Tensor | None, dict[str, torch.Tensor]]:
    """:func:`validate`'s row, with the validation outputs (N, Q) and targets it came from."""
    if eng.val_loader is None:
        return {}, None, {}
    recompute_batchnorm(eng.eval_model, eng.train_loader, eng.device)
    average_batchnorm(eng.eval_model, eng.info)
    out, tgt = predict_outputs(eng.eval_model, eng.val_loader, eng.device, eng.amp, eng.info)
    val = evaluate_outputs(eng.kind, out, tgt, eng.classes)
    row: dict[str, Any] = {"val_loss": val["loss"]}
    head = headline(eng.kind)
    if val.get(head) is not None:
        row[f"val_{head}"] = val[head]
    return row, out, tgt


def keep_best_and_check_stop(eng: Engine, state: TrainState, row: dict[str, Any], out: torch.Tensor | None = None,
                             targets: dict[str, torch.Tensor] | None = None) -> None:
    """Update the best epoch and weights and the early-stopping counter (every rank computes the
    same numbers; rank 0's stop flag is broadcast so no rank can wait for another forever).

    With a validated GLM (epoch 0) an epoch replaces it only when it beats the GLM significantly
    (one-sided paired bootstrap test, :mod:`mmai.engine.glm_guard`); early stopping counts from the best score of any
    epoch, so a model still improving is not stopped because it has not yet cleared the GLM."""
    score = selection_score(row, eng.kind, eng.select_metric)
    if score < min(state.raw_best, state.best_score) - 1e-5:
        state.raw_best, state.bad_epochs = score, 0
    else:
        state.bad_epochs += 1
    if score < state.best_score - 1e-5:
        clears = True
        if state.initial_outputs is not None and out is not None:
            clears, diff, se = clears_initial(eng.kind, eng.select_metric, eng.classes, out, targets or {},
                                              state.initial_outputs, seed=int(row["epoch"]), looks=int(row["epoch"]))
            row["vs_glm"] = {"difference": round(diff, 5), "se": round(se, 5), "clears": clears}
            if not clears:
                log.info("epoch %d beats the GLM on validation by %.4f, not significantly (bootstrap SE %.4f; "
                         "needs %.2f SE): the GLM stays the shipped model", row["epoch"], -diff, se,
                         z_threshold(int(row["epoch"])))
        if clears:
            state.best_score, state.best_epoch = score, row["epoch"]
            state.best_weights = {k: v.detach().clone() for k, v in eng.eval_model.state_dict().items()}
    state.stopped = broadcast_flag(state.bad_epochs >= eng.config.train.patience, eng.info)
    if state.stopped:
        log.info("early stopping at epoch %d (best epoch %d)", row["epoch"], state.best_epoch)


def validate_initial_model(eng: Engine, state: TrainState) -> dict[str, Any] | None:
    """Epoch 0: validate the model before any optimizer step and make it the first best-epoch
    candidate. For a model with a fitted GLM base term the initial model is exactly the GLM
    (every residual starts at zero), so a run whose training never beats the GLM on validation
    ships the GLM. Models without a base term (or runs without validation rows) skip it: their
    initial weights are random. Returns the epoch-0 row (also kept in ``state.initial``)."""
    if eng.val_loader is None or getattr(eng.raw, "glm", None) is None:
        return None
    val, out, _ = validate_outputs(eng)
    row: dict[str, Any] = {"epoch": 0, **val}
    state.best_score = state.raw_best = selection_score(row, eng.kind, eng.select_metric)
    state.initial_outputs = outputs_doc(out) if out is not None else None
    state.best_epoch = 0
    state.best_weights = {k: v.detach().clone() for k, v in eng.eval_model.state_dict().items()}
    state.initial = row
    log.info("epoch 0 (the GLM base term): %s", {k: round(v, 4) for k, v in row.items() if k != "epoch"})
    return row


def start_or_resume(eng: Engine, store: CheckpointStore | None, runlog: RunLog, *, resume: bool,
                    settings: dict[str, Any]) -> TrainState:
    """A fresh :class:`TrainState`, or the one of the latest checkpoint commit (log truncated)."""
    if resume and store is not None and store.exists():
        state = load_checkpoint(store, eng, settings)
        log.info("resumed from %s after epoch %d", store.folder, state.epoch)
    else:
        state = TrainState()
        if store is not None and eng.info.is_main:
            store.reset()  # an older run's checkpoint must not be resumed into this one
    runlog.start(state.log_pos, state.epoch + 1)
    return state


@dataclasses.dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]]
    initial: dict[str, Any] | None = None  # the epoch-0 validation row (validate_initial_model)


def fit(eng: Engine, *, ckpt_dir: Path | None = None, resume: bool = False, log_path: Path | None = None,
        progress: bool = True, settings: dict[str, Any] | None = None) -> FitResult:
    """Train for train.epochs (or until early stop); return the best epoch's eval weights."""
    store = CheckpointStore(ckpt_dir) if ckpt_dir is not None else None
    runlog = RunLog(log_path, enabled=eng.info.is_main)
    state = start_or_resume(eng, store, runlog, resume=resume, settings=settings or {})
    if state.epoch == 0:
        validate_initial_model(eng, state)
    epochs = eng.config.train.epochs
    bar = tqdm(total=epochs, initial=state.epoch, desc="train", unit="epoch",
               disable=not progress or not eng.info.is_main)
    with contextlib.closing(runlog), contextlib.closing(bar):
        for epoch in range(state.epoch + 1, epochs + 1):
            if state.stopped:
                break
            row = train_one_epoch(eng, epoch, state)
            val, out, tgt = validate_outputs(eng)
            row.update(val)
            keep_best_and_check_stop(eng, state, row, out, tgt)
            state.history.append(row)
            runlog.write(row)
            if tb_images.due(epoch):  # TensorBoard only: validation overlays (mmai.figures.tensorboard)
                runlog.write_images(epoch, functools.partial(tb_images.validation_overlays, eng, epoch))
            state.epoch, state.log_pos = epoch, runlog.position()
            if store is not None:
                save_checkpoint(store, eng, state, settings or {})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith(("train_loss", "val_"))})
    best = state.best_weights or {k: v.detach().clone() for k, v in eng.eval_model.state_dict().items()}
    return FitResult(best_state=best, best_epoch=state.best_epoch, history=state.history, initial=state.initial)
