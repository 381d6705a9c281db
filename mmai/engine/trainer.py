"""The model-call layer of training and the import point of the engine.

``_forward`` is the single place a model is called (training, validation, precise BatchNorm);
``predict_outputs`` predicts a loader (sharded over DDP ranks and gathered); ``evaluate_outputs``
turns outputs into loss + metrics. The training itself lives in sibling modules:

- :mod:`mmai.engine.run`: ``train_from_files`` / ``train`` (``mmai train``): splits, K-fold,
  datasets, the run folder;
- :mod:`mmai.engine.loop`: ``fit``, the epoch loop as named steps;
- :mod:`mmai.engine.state`: the exact-resume checkpoint of a run (weights, optimizer, schedule,
  EMA, every random state) on :mod:`mmai.engine.checkpoint`;
- :mod:`mmai.engine.distributed`: DDP under torchrun; :mod:`mmai.engine.runlog`: log.jsonl and
  TensorBoard.

``train``, ``train_from_files``, ``apply_overrides``, ``train_split`` and ``fit`` are importable
from here as before (resolved lazily, so this module imports none of the modules above).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from mmai.engine.distributed import DistInfo, gather_rows
from mmai.models.heads import outputs_to_predictions, task_loss

_LAZY = {"train": "run", "train_from_files": "run", "apply_overrides": "run", "train_split": "run", "fit": "loop",
         "FitResult": "loop"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"mmai.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from mmai.engine.runspec import model_inputs

    args, kwargs = model_inputs(_unwrap(model), batch)
    return model(*args, return_aux=return_aux, **kwargs)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, loader: DataLoader, device: str, amp: torch.dtype | bool | None = None,
                    info: DistInfo | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Raw outputs (N, n_outputs) on CPU and the concatenated targets of a loader.

    Under DDP a loader over a :class:`~torch.utils.data.Subset` (this rank's shard, see
    :func:`mmai.engine.data.shard_loader`) is predicted here and gathered, so every rank
    returns all N rows in the order of the full dataset. ``amp``: an autocast dtype (``True`` = bfloat16).
    """
    dtype = torch.bfloat16 if amp is True else (amp or None)
    model.eval()
    outs: list[torch.Tensor] = []
    targets: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        batch = _to(batch, device)
        with autocast(device, dtype):
            out = _forward(model, batch)
        outs.append(out.float().cpu())
        for k in ("target", "time", "event"):
            if k in batch:
                targets.setdefault(k, []).append(batch[k].cpu())
    rows = {"out": torch.cat(outs), **{k: torch.cat(v) for k, v in targets.items()}}
    if info is not None and info.active:
        if not isinstance(loader.dataset, Subset):
            raise TypeError("predict_outputs under DDP needs a shard loader (torch Subset)")
        rows = gather_rows(torch.as_tensor(list(loader.dataset.indices)), rows, info)
    out = rows.pop("out")
    return out, rows


def evaluate_outputs(kind: str, out: torch.Tensor, targets: dict[str, torch.Tensor], classes: list[str],
                     n_boot: int = 0, seed: int = 0, groups: Any = None) -> dict[str, Any]:
    """Loss + task metrics (with bootstrap CIs when n_boot > 0; resampling ``groups``, e.g.
    patients, when given) of raw outputs (N, n_outputs)."""
    from mmai.engine.metrics_report import compute_metrics

    loss = float(task_loss(kind, out, targets))
    pred = outputs_to_predictions(kind, out).numpy()
    extra: dict[str, Any] = {"n_boot": n_boot, "seed": seed}
    if groups is not None:
        extra["groups"] = groups
    # compute_metrics reports undefined metrics (e.g. one class in a tiny split) as None
    if kind in ("binary", "multiclass"):
        m = compute_metrics(kind, y=targets["target"].numpy().astype(int), prob=pred, **extra)
    elif kind == "regression":
        m = compute_metrics(kind, y=targets["target"].numpy(), pred=pred[:, 0], **extra)
    else:
        m = compute_metrics(kind, time=targets["time"].numpy(), event=targets["event"].numpy(), risk=pred[:, 0],
                            **extra)
    return {"loss": loss, **{k: v for k, v in m.items() if k not in ("calibration",)}}


def autocast(device: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device`` (a no-op context for ``dtype=None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def headline(kind: str) -> str:
    """The metric a task is judged by."""
    return {"binary": "auroc", "multiclass": "auroc", "regression": "mae", "survival": "c_index"}[kind]


def selection_score(row: dict[str, Any], kind: str, select_metric: str) -> float:
    """Lower is better. ``auto`` / ``metric``: minus the validation AUROC / C-index (ranking
    metrics are not thrown off by a few over-confident predictions the way the loss is), the
    validation loss for regression; ``loss``: the validation loss. Without validation rows: the
    training loss. (What ``auto`` means for a small validation set is decided per split by
    :func:`mmai.engine.autoconfig.resolve_select_metric`, which passes ``loss`` here.)"""
    if "val_loss" not in row:
        return float(row["train_loss"])
    head = headline(kind)
    if select_metric in ("auto", "metric") and kind != "regression" and row.get(f"val_{head}") is not None:
        return -float(row[f"val_{head}"])
    return float(row["val_loss"])


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, loader: DataLoader, device: str, max_batches: int = 10) -> None:
    """Replace BatchNorm running statistics by their average over up to ``max_batches`` training
    batches with the current weights ("precise BN"). The running averages accumulated during the
    epoch lag behind weights that moved, which makes eval-mode predictions (validation loss, the
    saved model) erratic on small cohorts. Under DDP follow with
    :func:`mmai.engine.distributed.average_batchnorm`."""
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


def aux_loss(aux: dict[str, torch.Tensor], kind: str, batch: dict[str, Any]) -> torch.Tensor:
    """Sum of the unimodal auxiliary losses of a forward's ``aux`` outputs (0 if none).
    The image head only counts cases whose image is present. A head with fewer than two cases
    to learn from contributes ``0 * outputs``, which keeps its parameters in the graph (DDP
    then needs no ``find_unused_parameters``)."""
    total = torch.zeros((), device=batch["image_present"].device)
    for name, out in aux.items():
        keep = batch["image_present"] > 0 if name == "image" else torch.ones_like(batch["image_present"], dtype=torch.bool)
        if int(keep.sum()) < 2:
            total = total + 0.0 * out.float().sum()
            continue
        sub = {k: v[keep] for k, v in batch.items() if k in ("target", "time", "event")}
        total = total + task_loss(kind, out[keep].float(), sub)
    return total
