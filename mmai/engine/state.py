"""The resumable state of a training run and its checkpoint (one commit per epoch).

A commit holds everything the next epoch depends on: model weights, optimizer moments, the
learning-rate scheduler, the GradScaler, the EMA weights, the best weights so far, the
counters of :class:`TrainState` (epoch, optimizer step, early stopping, history, log.jsonl
position) and every random generator of every rank (:mod:`mmai.engine.rng`). Resuming from it
continues bit for bit the run that wrote it; nothing is reseeded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from mmai.engine import rng
from mmai.engine.checkpoint import CheckpointStore, flatten_optimizer, unflatten_optimizer
from mmai.engine.distributed import gather_objects
from mmai.errors import CheckpointError

if TYPE_CHECKING:
    from mmai.engine.engine import Engine

FORMAT = 2


@dataclasses.dataclass
class TrainState:
    """Counters of a run after ``epoch`` finished epochs (0 = before the first)."""

    epoch: int = 0
    step: int = 0
    best_score: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    log_pos: int = 0
    initial: dict[str, Any] | None = None  # epoch 0's validation row (the GLM base term), if validated
    initial_outputs: list[list[float]] | None = None  # epoch 0's validation outputs (mmai.engine.glm_guard)
    raw_best: float = math.inf  # the best selection score of any epoch (early stopping counts from it)
    best_weights: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    def counters(self) -> dict[str, Any]:
        """Everything but the weights, JSON-able."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_weights"}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(store: CheckpointStore, eng: Engine, state: TrainState, settings: dict[str, Any]) -> None:
    """Commit ``state`` (collective under DDP: every rank's random state goes to rank 0, which
    writes). ``settings``: the resolved config, refused on resume if it differs."""
    per_rank = gather_objects(rng.capture(eng.generator, eng.train_ds), eng.info)
    if not eng.info.is_main:
        return
    opt_tensors, opt_json = flatten_optimizer(eng.opt.state_dict())
    tensors = {**_prefixed("model", eng.raw.state_dict()), **opt_tensors}
    if state.best_weights is not None:
        tensors.update(_prefixed("best", state.best_weights))
    if eng.ema is not None:
        tensors.update(_prefixed("ema", eng.ema.state_dict()))
    for r, (_, rank_tensors) in enumerate(per_rank):
        tensors.update(_prefixed(f"rng.{r}", rank_tensors))
    doc = {"format": FORMAT, "train": state.counters(), "optimizer": opt_json,
           "scheduler": eng.sched.state_dict(), "scaler": eng.scaler.state_dict() if eng.scaler else None,
           "rng": [js for js, _ in per_rank], "world_size": eng.info.world, "settings": settings}
    store.commit(state.epoch, tensors, doc)


def load_checkpoint(store: CheckpointStore, eng: Engine, settings: dict[str, Any]) -> TrainState:
    """Restore the engine from the latest commit and return its :class:`TrainState`.

    Raises:
        CheckpointError: no commit, another world size, other settings, or tensors that do not fit.
    """
    tensors, doc = store.load()
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{store.folder}: checkpoint format {doc.get('format')!r}, this mmai reads "
                              f"{FORMAT}; train again without --resume")
    if doc["world_size"] != eng.info.world:
        raise CheckpointError(f"{store.folder}: checkpoint written by {doc['world_size']} process(es), resumed "
                              f"with {eng.info.world}; resume with the same --nproc-per-node x nodes")
    diff = _diff(doc["settings"], settings)
    if diff:
        raise CheckpointError(f"{store.folder}: the checkpoint was written with other settings ({diff}); "
                              "resume with the same config and flags")
    try:
        eng.raw.load_state_dict(_strip("model", tensors))
        eng.opt.load_state_dict(unflatten_optimizer(tensors, doc["optimizer"]))
        eng.sched.load_state_dict(doc["scheduler"])
        if eng.scaler is not None and doc["scaler"]:
            eng.scaler.load_state_dict(doc["scaler"])
        if eng.ema is not None:
            eng.ema.load_state_dict(_strip("ema", tensors))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{store.folder}: checkpoint does not match this model/config: {exc}") from exc
    r = eng.info.rank
    rng.restore(doc["rng"][r], _strip(f"rng.{r}", tensors), eng.generator, eng.train_ds)
    best = _strip("best", tensors) or None
    return TrainState(**doc["train"], best_weights=best)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _diff(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """``key: saved -> now`` for the first few settings that differ ('' if none)."""
    a, b = _flat(saved), _flat(now)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])
