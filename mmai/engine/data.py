"""DataLoaders of a training run (shuffled training shard, unpadded evaluation shards) and the
out-of-fold prediction table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mmai.config import PipelineConfig
from mmai.engine.distributed import DistInfo, shard_indices
from mmai.engine.rng import worker_init
from mmai.inference.columns import prediction_columns
from mmai.models.heads import outputs_to_predictions

log = logging.getLogger(__name__)


def train_loader(ds: Dataset, batch_size: int, info: DistInfo, seed: int, num_workers: int, *,
                 collate: Callable[[list[Any]], Any] | None = None) -> tuple[DataLoader, torch.Generator]:
    """Shuffled batches of ``ds`` (this rank's share under DDP: a DistributedSampler, reshuffled
    by epoch, the same ``seed`` on every rank) and the loader's generator (seeded ``seed + rank``:
    worker seeds), whose state the checkpoint saves."""
    g = torch.Generator()
    g.manual_seed(seed + info.rank)
    sampler: torch.utils.data.Sampler[int] | None = None
    if info.active:
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=info.world, rank=info.rank,
                                                                  shuffle=True, seed=seed)
    n_rank = len(sampler) if sampler is not None else len(ds)  # type: ignore[arg-type]
    # a last batch of one case would break BatchNorm on small feature maps ("Expected more than 1
    # value per channel"): that one case (a different one each epoch) waits for the next epoch
    lone = n_rank > 1 and n_rank % batch_size == 1
    if lone:
        log.info("training: %d cases per epoch with batch %d; the last, single-case batch is dropped",
                 n_rank, batch_size)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, generator=g,
                        num_workers=num_workers, drop_last=lone, collate_fn=collate,
                        worker_init_fn=worker_init if num_workers > 0 else None,
                        persistent_workers=False, pin_memory=info.device.startswith("cuda"))
    return loader, g


def shard_loader(ds: Dataset, batch_size: int, info: DistInfo, num_workers: int, *,
                 collate: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """In-order batches of this rank's rows of ``ds`` (all rows without DDP), for prediction;
    :func:`mmai.engine.trainer.predict_outputs` gathers the shards."""
    g = torch.Generator()
    g.manual_seed(0)
    rows = shard_indices(len(ds), info)  # type: ignore[arg-type]  # map-style datasets have a length
    return DataLoader(Subset(ds, rows), batch_size=batch_size, shuffle=False, collate_fn=collate,
                      generator=g, num_workers=num_workers, pin_memory=info.device.startswith("cuda"))


def oof_frame(config: PipelineConfig, val_df: pd.DataFrame, out: torch.Tensor, enc: Any, fold: str) -> pd.DataFrame:
    """Validation predictions of one fold: case_id, patient_id, fold, the targets as in the
    manifest, then prob_<class> (classification), prediction (regression) or risk (survival)."""
    t = config.task
    cols: dict[str, Any] = {"case_id": val_df["case_id"].astype(str).to_numpy(), "fold": fold}
    if "patient_id" in val_df:
        cols["patient_id"] = val_df["patient_id"].astype(str).to_numpy()
    targets = [t.time, t.event] if t.kind == "survival" else [t.target]
    for c in targets:
        cols[c] = val_df[c].to_numpy()
    pred = outputs_to_predictions(t.kind, out).numpy()
    names = prediction_columns(t.kind, enc.classes)  # the predictions.csv rule, without surv_<t>
    if t.kind in ("binary", "multiclass"):
        names = names[:-1]  # no argmax column: the out-of-fold table holds the scores
        pred = pred[:, : len(names)]
    elif t.kind == "regression":
        pred = pred[:, :1] * enc.std + enc.mean
    else:
        pred = pred[:, :1]
    for i, c in enumerate(names):
        cols[c] = pred[:, i]
    return pd.DataFrame(cols)
