"""Batching volumes of different sizes (``image.size: null`` keeps each scan's own extent).

Each image is padded at the END of every spatial axis up to the largest extent in the batch, with
the pipeline's background value. Padding at the end leaves voxel (0, 0, 0) where it was, so each
case's affine (voxel -> RAS mm) stays exact and window tokens keep their patient-space positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate


def pad_to_common(arrays: Sequence[np.ndarray | torch.Tensor], value: float) -> list[Any]:
    """Pad (C, D, H, W) arrays/tensors at the end of each spatial axis to the largest extent.

    Args:
        arrays: volumes (C, D, H, W) with the same C.
        value: fill value (the pipeline's background after normalisation).

    Returns:
        The volumes, all of shape (C, max D, max H, max W), same types as given.
    """
    if not arrays:
        return []
    shapes = np.array([tuple(a.shape) for a in arrays])
    if (shapes == shapes[0]).all():
        return list(arrays)
    target = shapes.max(axis=0)
    out: list[Any] = []
    for a in arrays:
        pad = [(0, int(t - s)) for s, t in zip(a.shape, target, strict=True)]
        if isinstance(a, torch.Tensor):
            flat = [p for axis in reversed(pad) for p in axis]  # torch.nn.functional.pad: last axis first
            out.append(torch.nn.functional.pad(a, flat, value=value))
        else:
            out.append(np.pad(a, pad, constant_values=value))
    return out


class PadCollate:
    """``DataLoader(collate_fn=PadCollate(background))``: images padded to a common shape, the rest
    collated by torch's ``default_collate``."""

    def __init__(self, background: float = 0.0) -> None:
        self.background = float(background)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if items and "image" in items[0]:
            images = pad_to_common([it["image"] for it in items], self.background)
            items = [{**it, "image": img} for it, img in zip(items, images, strict=True)]
        return default_collate(items)
