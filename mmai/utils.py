"""Small shared helpers: atomic file writes, JSON, seeding, device choice."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A killed process leaves either the old file or the new one, never a half-written file.
    The temporary name keeps the final suffix (e.g. ``.nii.gz``) so writers that infer the
    format from the name work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp" + suffix,
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> str:
    """``None`` -> cuda if available else cpu; validates explicit choices."""
    import torch

    from mmai.errors import ConfigError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r} is not allowed; choose cpu, cuda or cuda:N")
    return device


def shard_rows(df: Any, shard: tuple[int, int] | None) -> Any:
    """The rows of a frame that belong to shard ``(i, n)``: positions i, i + n, i + 2n, ... (all rows
    when ``shard`` is None). The one shard rule of preprocess and predict; the index is reset."""
    if shard is None:
        return df
    i, n = shard
    return df.iloc[i::n].reset_index(drop=True)
