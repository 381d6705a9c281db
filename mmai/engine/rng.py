"""Every random state a training run consumes, captured and restored exactly (no reseeding).

A resumed run must draw the same random numbers an uninterrupted run would have drawn, so a
checkpoint holds: torch's CPU and CUDA generators, NumPy's and Python's global generators, the
DataLoader's generator (shuffling, worker seeds), the dataset's own generator (modality dropout)
and the state of every random MONAI transform of its augmentation chain.

The dataset side goes through a small hook: a dataset that offers ``get_rng_state()`` /
``set_rng_state(state)`` is asked directly; otherwise its public ``rng`` (a NumPy Generator)
and ``augment`` (a MONAI Compose) attributes are read and written.

States are split into JSON-able values and tensors (torch's generator states are byte
tensors), so checkpoints stay safetensors + JSON.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mmai.errors import CheckpointError


def _randomizables(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Every MONAI ``Randomizable`` reachable from a transform chain, in a fixed order (transform
    wrappers such as RandSpatialCropd keep their own random array transform inside)."""
    from monai.transforms import Randomizable, Transform

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Randomizable):
        yield obj
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            if isinstance(item, Transform | Randomizable):
                yield from _randomizables(item, seen)


def _np_state_to_json(state: tuple) -> list[Any]:
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _np_state_from_json(state: list[Any]) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def dataset_rng_state(ds: Any) -> dict[str, Any]:
    """JSON-able random state of a training dataset (modality dropout + augmentation chain)."""
    if hasattr(ds, "get_rng_state"):
        return {"hook": ds.get_rng_state()}
    out: dict[str, Any] = {}
    if isinstance(getattr(ds, "rng", None), np.random.Generator):
        out["rng"] = ds.rng.bit_generator.state
    if getattr(ds, "augment", None) is not None:
        out["augment"] = [_np_state_to_json(t.R.get_state()) for t in _randomizables(ds.augment)]
    return out


def set_dataset_rng_state(ds: Any, state: dict[str, Any]) -> None:
    """Restore :func:`dataset_rng_state`."""
    if "hook" in state:
        ds.set_rng_state(state["hook"])
        return
    if "rng" in state:
        ds.rng.bit_generator.state = state["rng"]
    if "augment" in state:
        chain = list(_randomizables(ds.augment)) if getattr(ds, "augment", None) is not None else []
        if len(chain) != len(state["augment"]):
            raise CheckpointError(f"checkpoint holds {len(state['augment'])} augmentation random states, this "
                                  f"pipeline's augmentation has {len(chain)}; resume with the same pipeline")
        for t, s in zip(chain, state["augment"], strict=True):
            t.R.set_state(_np_state_from_json(s))


def reseed_dataset(ds: Any, seed: int) -> None:
    """Seed a dataset's own generators (used in DataLoader workers, from torch's per-worker seed,
    which the saved DataLoader generator determines)."""
    if hasattr(ds, "rng"):
        ds.rng = np.random.default_rng(seed)
    if getattr(ds, "augment", None) is not None:
        ds.augment.set_random_state(seed=seed % (2**32))


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker's dataset copy draws from a seed derived from the
    loader's generator, so workers differ from each other and from epoch to epoch, reproducibly."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        reseed_dataset(info.dataset, int(info.seed) % (2**63))


def capture(loader_generator: torch.Generator | None, dataset: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able states, tensor states) of this process."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    if loader_generator is not None:
        tensors["loader"] = loader_generator.get_state()
    py = random.getstate()
    js: dict[str, Any] = {"numpy": _np_state_to_json(np.random.get_state(legacy=True)),  # type: ignore[arg-type]
                          "python": [py[0], list(py[1]), py[2]],
                          "dataset": dataset_rng_state(dataset) if dataset is not None else {}}
    return js, tensors


def restore(js: dict[str, Any], tensors: dict[str, torch.Tensor], loader_generator: torch.Generator | None,
            dataset: Any) -> None:
    """Restore what :func:`capture` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if loader_generator is not None and "loader" in tensors:
        loader_generator.set_state(tensors["loader"])
    np.random.set_state(_np_state_from_json(js["numpy"]))
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if dataset is not None and js.get("dataset"):
        set_dataset_rng_state(dataset, js["dataset"])
