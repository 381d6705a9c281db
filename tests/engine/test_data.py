"""Training loaders never end an epoch on a single-case batch (BatchNorm cannot normalise one)."""

import torch
from torch.utils.data import TensorDataset

from mmai.engine.data import train_loader
from mmai.engine.distributed import DistInfo


def _info() -> DistInfo:
    return DistInfo(rank=0, world=1, device="cpu")


def test_last_batch_of_one_is_dropped_and_others_kept():
    ds = TensorDataset(torch.arange(33.0))
    loader, _ = train_loader(ds, 16, _info(), seed=0, num_workers=0)
    sizes = [len(b[0]) for b in loader]
    assert sizes == [16, 16]  # 33 % 16 == 1: the lone case waits for the next epoch
    loader, _ = train_loader(TensorDataset(torch.arange(34.0)), 16, _info(), seed=0, num_workers=0)
    assert [len(b[0]) for b in loader] == [16, 16, 2]
