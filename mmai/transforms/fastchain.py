"""The fast preprocessing chain (the default of :func:`mmai.transforms.pipelines.preprocess_transforms`).

Same steps and same output (to float32 rounding) as the reference chain that MONAI transforms spell
out one by one (``preprocess_transforms(..., fast=False)``, kept for the equality tests and the
benchmarks), with three changes where the time went (docs/benchmarks.md):

- :class:`FastLoadd` reads with mmai's reader but keeps the array in its memory order: a NIfTI
  volume is column-major, and MONAI's ``LoadImage`` made it row-major (a full transposing copy,
  about half of the old chain's time on a 512 x 512 x 400 CT);
- :class:`mmai.transforms.resample.FastResampled` replaces ``Orientationd`` + ``AntiAliasd`` +
  ``Spacingd`` by one separable pass over the body region only;
- what follows (body mask, intensity windows, body crop, fit to the grid) is unchanged, on a
  volume that is already nearly cut to the body.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.transforms.io.array import switch_endianness
from monai.utils import ensure_tuple

from mmai.config import ImageConfig


class FastLoadd(MapTransform):
    """mmai's ``LoadImaged`` (same reader, same metadata, channel first) without the row-major copy.

    Args:
        keys: the image key.
        loader: the ``mmai.io.reader.mmai_load_imaged`` transform whose reader (series selection,
            geometry policy) is used.
    """

    def __init__(self, keys: Any, loader: Any) -> None:
        super().__init__(keys)
        self.reader = loader.mmai_reader

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            d[k] = self.load(d[k])
        return d

    def load(self, source: Any) -> MetaTensor:
        """A path / folder / file list -> (1, I, J, K) float32 MetaTensor with the reader's metadata."""
        names = tuple(f"{Path(s).expanduser()}" for s in ensure_tuple(source))
        arr, meta = self.reader.get_data(self.reader.read(names))
        arr = np.asarray(arr, dtype=np.float32)  # a no-op or one pass in the array's own memory order
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous) or any(s < 0 for s in arr.strides):
            arr = np.ascontiguousarray(arr)
        meta = switch_endianness(meta, "<")
        meta["filename_or_obj"] = f"{names[0]}"
        out = MetaTensor(torch.from_numpy(arr)[None], meta=meta)
        out.affine = torch.as_tensor(np.asarray(meta["affine"]), dtype=torch.float64)
        return out


def body_threshold(cfg: ImageConfig) -> float | None:
    """The raw intensity of the foreground mask when it is known before resampling (a fixed
    ``image.foreground``, or a windowed CT's automatic one); None when it depends on the resampled
    volume (MR without ``foreground``)."""
    from mmai.transforms.pipelines import _windows
    from mmai.transforms.spatial import auto_threshold

    if cfg.foreground is not None:
        return float(cfg.foreground)
    if cfg.intensity.kind in ("window", "windows"):
        return auto_threshold(cfg.intensity.kind, _windows(cfg), torch.zeros(1))
    return None


def fast_spatial(cfg: ImageConfig, loader: Any, *, device: str, load: bool, raw: bool) -> list[Any]:
    """Load (optional) + reorient + anti-alias + resample (+ pre-crop to the body) transforms."""
    from mmai.transforms.pipelines import KEY
    from mmai.transforms.resample import FastResampled

    if cfg.spacing is None:
        raise ValueError("fast_spatial needs image.spacing")
    chain: list[Any] = [FastLoadd(KEY, loader)] if load else []
    precrop = cfg.crop_foreground and cfg.roi is None and not raw
    chain.append(FastResampled(KEY, cfg.spacing, axcodes=cfg.orientation, antialias=cfg.antialias,
                               body_threshold=body_threshold(cfg) if precrop else None, margin=2, device=device))
    return chain
