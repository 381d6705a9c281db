"""Checkpoints: safetensors weights + JSON state, written atomically. No pickle anywhere.

A training checkpoint (for ``--resume``) is ``ckpt/last.safetensors`` (model and optimizer
tensors, flattened to ``model.<name>`` / ``optim.<param index>.<key>``) plus ``ckpt/last.json``
(epoch, best score, optimizer scalars, RNG seeds, early-stopping counters).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmai.errors import CheckpointError
from mmai.utils import atomic_path, atomic_write_json


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a model state dict as safetensors (tensors made contiguous, on CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors weights (never executes code)."""
    if not Path(path).exists():
        raise CheckpointError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from exc


def read_json(path: Path, what: str = "state") -> dict[str, Any]:
    if not Path(path).exists():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {what} file is not valid JSON: {exc}") from exc


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, st in opt_state["state"].items():
        entry = {}
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                entry[key] = value
        scalars["state"][str(pid)] = entry
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in scalars["state"].items()}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_training_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             info: dict[str, Any], best_model_state: dict[str, torch.Tensor] | None = None,
                             ema_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``last.safetensors`` + ``last.json`` (json last: its presence marks a complete checkpoint)."""
    opt_tensors, opt_scalars = _flatten_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    if best_model_state is not None:
        tensors.update({f"best.{k}": v for k, v in best_model_state.items()})
    if ema_state is not None:
        tensors.update({f"ema.{k}": v for k, v in ema_state.items()})
    save_weights(tensors, folder / "last.safetensors")
    atomic_write_json(folder / "last.json", {**info, "optimizer": opt_scalars})


def load_training_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                             ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """Restore model and optimizer from ``folder``; returns (info, best model state, EMA state),
    the last two None when the checkpoint has none."""
    info = read_json(folder / "last.json", "checkpoint")
    tensors = load_weights(folder / "last.safetensors")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")} or None
    opt = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    try:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(_unflatten_optimizer(opt, info.pop("optimizer")))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{folder}: checkpoint does not match this model/config: {exc}") from exc
    return info, best, ema
