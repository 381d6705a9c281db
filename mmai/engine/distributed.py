"""Data-parallel training under ``torchrun``: process group, sharding, reductions.

Every decision of the training loop (best epoch, early stop) is taken from values that are
identical on every rank: losses are all-reduced, validation outputs are gathered in full,
BatchNorm statistics are averaged. Rank 0 alone writes files.

Launch: ``torchrun --nproc-per-node N -m mmai train ...`` (see docs/training.md). Without
``WORLD_SIZE`` in the environment everything here is a no-op for a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) otherwise."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


@contextlib.contextmanager
def distributed_session(device: str) -> Iterator[DistInfo]:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA) and leave it cleanly,
    also when training raises. Yields this process's :class:`DistInfo`.

    A group that already exists is used and left alone: a program that trains several models
    in one torchrun job should create the group once itself (re-creating a destroyed group in
    the same process is not reliable)."""
    rank, local_rank, world = env_info()
    if world <= 1:
        yield DistInfo(0, 1, device)
        return
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    log.info("distributed training: rank %d of world size %d on %s", rank, world, device)
    try:
        yield DistInfo(rank, world, device)
    except BaseException:
        if owner and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may never arrive
        raise
    if owner and dist.is_initialized():
        # every rank reaches the end (rank 0 may still be writing the run folder) before the
        # group is torn down: a rank leaving early can abort its peers' gloo connections
        dist.barrier()
        dist.destroy_process_group()


def current() -> DistInfo:
    """The running job's rank and world size (device left as cpu)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    return DistInfo()


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """Rows ``rank, rank + world, ...`` of ``n``: every row on exactly one rank, none padded."""
    return list(range(info.rank, n, info.world))


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; identical result on every rank)."""
    if not info.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if info.device.startswith("cuda"):
        t = t.to(info.device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def gather_rows(index: torch.Tensor, rows: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Gather per-rank row blocks (each ``(n_r, ...)`` with global row numbers ``index`` (n_r,))
    into the full arrays in global row order, on every rank."""
    if not info.active:
        order = torch.argsort(index)
        return {k: v[order] for k, v in rows.items()}
    parts: list[Any] = [None] * info.world
    dist.all_gather_object(parts, (index.cpu(), {k: v.cpu() for k, v in rows.items()}))
    idx = torch.cat([p[0] for p in parts])
    order = torch.argsort(idx)
    return {k: torch.cat([p[1][k] for p in parts])[order] for k in rows}


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without DDP)."""
    if not info.active:
        return [obj]
    parts: list[Any] = [None] * info.world
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's value of ``flag`` on every rank (so a stop decision can never differ)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device if info.device.startswith("cuda") else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


@torch.no_grad()
def average_batchnorm(model: torch.nn.Module, info: DistInfo) -> None:
    """Replace every BatchNorm's running mean/variance by the pooled statistics over ranks
    (each rank estimated them on its own shard with the same number of batches):
    mean = avg(mean_r), var = avg(var_r + mean_r^2) - mean^2."""
    if not info.active:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            mean, var = m.running_mean, m.running_var
            assert var is not None  # tracked together with running_mean
            stats = torch.cat([mean.double(), (var.double() + mean.double() ** 2)])
            dist.all_reduce(stats)
            stats /= info.world
            new_mean = stats[: mean.numel()]
            mean.copy_(new_mean.to(mean.dtype))
            var.copy_((stats[mean.numel():] - new_mean**2).clamp_min(0).to(var.dtype))


def wrap_model(model: torch.nn.Module, info: DistInfo, *, find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when running under torchrun (else the model)."""
    if not info.active:
        return model
    ids = [torch.device(info.device).index] if info.device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def maybe_no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync()`` for the micro-batches of an accumulation group that are not its last
    (the gradient all-reduce then runs once per optimizer step)."""
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
