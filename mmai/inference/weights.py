"""Loading a run's model.safetensors into its model (safetensors only: no code execution)."""

from __future__ import annotations

from pathlib import Path

import torch

from mmai.engine.checkpoint import load_weights
from mmai.errors import CheckpointError


def load_matching_weights(model: torch.nn.Module, path: Path, model_id: str, fusion: str) -> None:
    """Load ``path`` into ``model``; a file of another model (other id, keys or shapes) is a one-line error."""
    from safetensors import safe_open

    state = load_weights(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("model_id") and meta["model_id"] != model_id:
        raise CheckpointError(f"{path} holds model {meta['model_id']!r} but state.json is model {model_id!r}: "
                              "the weights file comes from another run")
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shape = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or extra or shape:
        first = (missing or extra or shape)[0]
        raise CheckpointError(f"{path} does not fit state.json's {fusion} model: {len(missing)} missing, "
                              f"{len(extra)} unexpected, {len(shape)} differently shaped tensor(s) (first: "
                              f"{first!r}); the weights file comes from another model")
    model.load_state_dict(state)
