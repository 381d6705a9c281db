"""Checkpoints: safetensors weights + JSON state, written atomically. No pickle anywhere.

A training checkpoint (for ``--resume``) is one *commit* per epoch in ``RUN_DIR/ckpt/``:

1. ``ckpt-e0003-<token>.safetensors``: every tensor (model, optimizer moments, best and EMA
   weights, random generator states), names prefixed ``model.``, ``optim.<param>.<key>``, ...;
2. ``ckpt-e0003-<token>.json``: everything else (counters, history, scheduler, scaler, RNG);
3. ``latest.json``: the pointer naming the two files above, replaced atomically, last.

Each file is written under a temporary name and renamed, and files are never overwritten (the
token is new for every commit), so a process killed at any instant leaves ``latest.json``
naming either the previous complete commit or the new one. Files that the pointer does not
name (an older commit, or an interrupted one) are deleted after the pointer moves.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmai.errors import CheckpointError
from mmai.utils import _json_default, atomic_path

log = logging.getLogger(__name__)
POINTER = "latest.json"


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


def flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer ``state_dict`` -> (tensors ``optim.<param>.<key>``, JSON-able rest)."""
    return _flatten_optimizer(opt_state)


def unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer` (``tensors`` may hold other prefixes too)."""
    return _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, scalars)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write one checkpoint file atomically (the single place a commit writes; tests inject
    failures here)."""
    with atomic_path(path) as tmp:
        write(tmp)


class CheckpointStore:
    """The commits of one training run in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def pointer(self) -> Path:
        return self.folder / POINTER

    def exists(self) -> bool:
        return self.pointer.exists()

    def commit(self, epoch: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write one complete checkpoint and move the pointer to it; then delete stale files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"ckpt-e{epoch:04d}-{secrets.token_hex(4)}"
        flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        text = json.dumps(state, default=_json_default) + "\n"
        _write_file(self.folder / f"{stem}.safetensors", lambda p: save_file(flat, str(p)))
        _write_file(self.folder / f"{stem}.json", lambda p: _write_text(p, text))
        pointer = json.dumps({"epoch": epoch, "tensors": f"{stem}.safetensors", "state": f"{stem}.json"}) + "\n"
        _write_file(self.pointer, lambda p: _write_text(p, pointer))
        self.clean()

    def reset(self) -> None:
        """Forget every commit (a fresh run in a folder that holds an older run's checkpoint): the
        pointer goes first, so a kill during the reset leaves no resumable state."""
        self.pointer.unlink(missing_ok=True)
        self.clean()

    def clean(self) -> None:
        """Delete checkpoint files the pointer does not name."""
        keep = set()
        if self.exists():
            ptr = read_json(self.pointer, "checkpoint pointer")
            keep = {ptr["tensors"], ptr["state"]}
        # also temporary files a killed writer left behind (atomic_path names them ".<stem>.*.tmp*")
        stale = [*self.folder.glob("ckpt-e*"), *self.folder.glob(".ckpt-e*.tmp*"), *self.folder.glob(".latest.*.tmp*")]
        for f in stale:
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, state) of the commit the pointer names.

        Raises:
            CheckpointError: no pointer, or a file it names is missing or unreadable.
        """
        if not self.exists():
            raise CheckpointError(f"--resume: no checkpoint in {self.folder} (no {POINTER})")
        ptr = read_json(self.pointer, "checkpoint pointer")
        try:
            tensors_name, state_name = ptr["tensors"], ptr["state"]
        except KeyError as exc:
            raise CheckpointError(f"{self.pointer}: pointer lacks {exc}") from exc
        tensors = load_weights(self.folder / tensors_name)
        state = read_json(self.folder / state_name, "checkpoint state")
        return tensors, state

