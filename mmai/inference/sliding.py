"""Sliding windows at inference (docs/architecture.md).

The implementation lives in :mod:`mmai.models.windows` (tiling, positions, stitching) and
:mod:`mmai.models.image_tokens` (the window tokenizer), because the model uses the same code in
training and prediction and the models must not import ``mmai.inference``. This module is the
inference-side name for them.
"""

from __future__ import annotations

from mmai.models.image_tokens import MillimetrePosition, WindowTokenizer
from mmai.models.windows import (
                                 WindowLayout,
                                 cell_centres_voxel,
                                 default_affine,
                                 pad_volume,
                                 stitch,
                                 upsample_cells,
                                 voxel_to_mm,
                                 window_slices,
)

__all__ = ["MillimetrePosition", "WindowLayout", "WindowTokenizer", "cell_centres_voxel", "default_affine",
           "pad_volume", "stitch", "upsample_cells", "voxel_to_mm", "window_slices"]
