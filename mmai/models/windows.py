"""Sliding windows over a volume of any size: tiling, feature-cell positions in millimetres, stitching.

Plain functions (no learned parameters) shared by the model (:mod:`mmai.models.image_tokens`),
the predictor and the explanations (:mod:`mmai.inference.explain`); ``mmai.inference.sliding``
re-exports them. The tiling is MONAI's: the same scan interval as ``sliding_window_inference``
(``int(roi * (1 - overlap))``, at least 1) and ``monai.data.utils.dense_patch_slices``; the
stitching blends window maps with ``monai.data.utils.compute_importance_map`` (gaussian).

Conventions:
    image     (B, C, D, H, W)   the model's input grid (voxel axes i, j, k = D, H, W)
    affine    (B, 4, 4)         voxel index (i, j, k, 1) -> RAS millimetres of that voxel's centre
    a volume smaller than ``roi_size`` along an axis is padded symmetrically (as MONAI does) with
    ``pad_value``; the padding never produces tokens outside the image's own coordinates (their
    positions are still computed from the affine, just beyond the edge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from torch.nn import functional as F

Slices = tuple[slice, slice, slice]


@dataclass(frozen=True)
class WindowLayout:
    """Where the tokens of a windowed forward pass come from (enough to stitch maps back).

    Attributes:
        image_shape: spatial shape (D, H, W) of the unpadded input.
        pad: (before) padding per axis; the padded shape is ``padded_shape``.
        padded_shape: spatial shape after padding to at least ``roi_size``.
        roi_size: window size (voxels).
        slices: the encoded windows, in token order, as slices of the PADDED volume.
        fmap_shape: feature grid (d, h, w) of one window; each window gives d*h*w tokens.
        centres_mm: (B, N, 3) token positions in millimetres (RAS).
    """

    image_shape: tuple[int, int, int]
    pad: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    roi_size: tuple[int, int, int]
    slices: tuple[Slices, ...]
    fmap_shape: tuple[int, int, int]
    centres_mm: torch.Tensor

    @property
    def tokens_per_window(self) -> int:
        d, h, w = self.fmap_shape
        return d * h * w


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's scan interval: ``roi`` where the window covers the axis, else ``int(roi * (1 - overlap))`` (>= 1)."""
    out = []
    for n, r in zip(image_size, roi_size, strict=True):
        out.append(int(r) if r == n else max(1, int(r * (1 - overlap))))
    return tuple(out)


def pad_amounts(image_size: Sequence[int], roi_size: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """Symmetric padding (before, per axis) and the padded shape so that every axis holds one window."""
    before, padded = [], []
    for n, r in zip(image_size, roi_size, strict=True):
        diff = max(int(r) - int(n), 0)
        before.append(diff // 2)
        padded.append(int(n) + diff)
    return (before[0], before[1], before[2]), tuple(padded)


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[Slices]:
    """Windows of ``roi_size`` covering a (padded) volume of ``image_size``: MONAI's dense patch slices.

    Raises:
        ValueError: ``overlap`` outside [0, 1) or a roi/image size that is not positive.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"window overlap must be in [0, 1), got {overlap!r}")
    if len(roi_size) != 3 or min(roi_size) < 1 or len(image_size) != 3 or min(image_size) < 1:
        raise ValueError(f"window roi_size {tuple(roi_size)} and image size {tuple(image_size)} must be 3 positive ints")
    _, padded = pad_amounts(image_size, roi_size)
    interval = scan_interval(padded, roi_size, overlap)
    slices = dense_patch_slices(padded, roi_size, interval)
    return [tuple(slice(int(s.start), int(s.stop)) for s in win) for win in slices]  # type: ignore[misc]


def pad_volume(image: torch.Tensor, roi_size: Sequence[int], value: float = 0.0) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, D, H, W) -> padded (B, C, D', H', W') with every axis >= roi, and the (before) padding."""
    before, padded = pad_amounts(image.shape[2:], roi_size)
    if tuple(padded) == tuple(image.shape[2:]):
        return image, before
    widths: list[int] = []
    for axis in (2, 1, 0):  # F.pad takes the last axis first
        after = padded[axis] - image.shape[2 + axis] - before[axis]
        widths += [before[axis], after]
    return F.pad(image, widths, mode="constant", value=value), before


def cell_centres_voxel(slices: Sequence[Slices], roi_size: Sequence[int], fmap_shape: Sequence[int],
                       pad: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Voxel coordinates (of the UNPADDED image) of every feature cell centre: (W * d*h*w, 3).

    A window of ``roi`` voxels with a feature grid of ``f`` cells has a stride ``roi / f``; cell k
    covers voxels ``[k * stride, (k + 1) * stride)`` of the window, so its centre is at
    ``start + (k + 0.5) * stride - 0.5`` (voxel centres are at integer indices).
    """
    axes = []
    for a in range(3):
        stride = roi_size[a] / fmap_shape[a]
        axes.append((torch.arange(fmap_shape[a], device=device, dtype=torch.float64) + 0.5) * stride - 0.5)
    local = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (d*h*w, 3)
    starts = torch.tensor([[s[a].start - pad[a] for a in range(3)] for s in slices], dtype=torch.float64,
                          device=device)  # (W, 3)
    return (starts[:, None, :] + local[None]).reshape(-1, 3)  # (W * d*h*w, 3)


def voxel_to_mm(affine: torch.Tensor, ijk: torch.Tensor) -> torch.Tensor:
    """Voxel coordinates (N, 3) -> millimetres (B, N, 3) through affines (B, 4, 4)."""
    aff = affine.to(torch.float64)
    return (ijk.to(aff.device)[None] @ aff[:, :3, :3].transpose(1, 2) + aff[:, None, :3, 3])


def default_affine(batch: int, device: torch.device | None = None) -> torch.Tensor:
    """The fallback when no affine is given: voxel index = millimetres (1 mm grid): (B, 4, 4)."""
    return torch.eye(4, dtype=torch.float64, device=device).expand(batch, 4, 4)


def stitch(window_maps: torch.Tensor, layout: WindowLayout, *, mode: str = "gaussian",
           sigma_scale: float = 0.125) -> torch.Tensor:
    """Blend per-window maps into one map over the unpadded image: (B, W, r0, r1, r2) -> (B, D, H, W).

    Each window map must be at window resolution (``roi_size``); a coarser map (e.g. one value
    per feature cell) is first upsampled with :func:`upsample_cells`. Overlaps are averaged with
    MONAI's importance map (gaussian by default), like ``sliding_window_inference``; voxels that
    no window covered (possible when training sampled a subset) are 0.
    """
    b, n_win = window_maps.shape[:2]
    if n_win != len(layout.slices):
        raise ValueError(f"stitch: {n_win} window maps for a layout of {len(layout.slices)} windows")
    weight = compute_importance_map(layout.roi_size, mode=mode, sigma_scale=sigma_scale,
                                    device=window_maps.device, dtype=torch.float32)  # (r0, r1, r2)
    acc = torch.zeros((b, *layout.padded_shape), dtype=torch.float32, device=window_maps.device)
    norm = torch.zeros(layout.padded_shape, dtype=torch.float32, device=window_maps.device)
    for w, s in enumerate(layout.slices):
        acc[(slice(None), *s)] += window_maps[:, w].float() * weight
        norm[s] += weight
    out = acc / norm.clamp_min(1e-12)
    p, (d, h, w_) = layout.pad, layout.image_shape
    return out[:, p[0] : p[0] + d, p[1] : p[1] + h, p[2] : p[2] + w_]


def upsample_cells(values: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """One value per token (B, N) -> per-window maps at window resolution (B, W, r0, r1, r2), trilinear."""
    b = values.shape[0]
    n_win = len(layout.slices)
    cells = values.reshape(b * n_win, 1, *layout.fmap_shape).float()
    up = F.interpolate(cells, size=layout.roi_size, mode="trilinear", align_corners=False)
    return up.reshape(b, n_win, *layout.roi_size)
