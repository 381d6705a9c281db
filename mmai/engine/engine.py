"""What one training run is made of (:class:`Engine`), built by :func:`mmai.engine.loop.build_engine`
and read by the loop and the checkpoint state (its own module, so neither imports the other)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader

from mmai.config import PipelineConfig
from mmai.engine.distributed import DistInfo
from mmai.engine.ema import EMA


@dataclasses.dataclass
class Engine:
    """What one training run is made of. ``model`` may be DDP-wrapped; ``raw`` is the model
    inside; ``eval_model`` is what is validated and kept (the EMA weights when train.ema > 0)."""

    model: torch.nn.Module
    raw: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    val_loader: DataLoader | None
    generator: torch.Generator | None
    train_ds: Any
    info: DistInfo
    config: PipelineConfig
    kind: str
    classes: list[str]
    last_lr: float = 0.0
    select_metric: str = "auto"  # what keep-best compares: "loss", or "auto" (the headline metric)
    params: list[torch.nn.Parameter] = dataclasses.field(default_factory=list)  # clipped each step

    def __post_init__(self) -> None:
        self.params = [p for p in self.raw.parameters() if p.requires_grad]

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.raw

    @property
    def device(self) -> str:
        return self.info.device
