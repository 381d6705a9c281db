"""Image tokens for the cross-attention fusion: sliding windows with positions in millimetres,
and the reverse cross-attention block (image tokens attend to the clinical tokens).

:class:`WindowTokenizer` turns a volume of any size ``(B, C, D, H, W)`` into tokens:

1. the volume is padded to at least ``roi_size`` and tiled into windows (MONAI's slicing, see
   :mod:`mmai.models.windows`);
2. windows are encoded ``batch`` at a time by the SAME encoder (``forward_features``), optionally
   under activation checkpointing when gradients are needed (memory: one window batch of
   activations, plus the window inputs and the tokens);
3. each window's feature map ``(C, d, h, w)`` becomes ``d*h*w`` tokens, projected to ``dim``,
   plus a Fourier embedding of the feature cell's centre in millimetres (RAS), computed from the
   image affine ``(B, 4, 4)`` (fallback: the voxel-index grid at 1 mm, i.e. the identity affine);
4. in training, ``train_windows = K`` encodes K windows per step sampled at random (the same K for
   every volume of the batch); in evaluation all windows are encoded.

The encoder, the token projection and the tokenizer's own position embedding are the model's;
the tokenizer gets the encoder and projection as arguments so their weights are stored once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmai.models.attention import CrossAttentionBlock
from mmai.models.windows import (
    WindowLayout,
    cell_centres_voxel,
    default_affine,
    pad_volume,
    voxel_to_mm,
    window_slices,
)


class MillimetrePosition(nn.Module):
    """Positions in millimetres (..., 3) -> embeddings (..., dim): Fourier features + linear.

    Wavelengths run geometrically from ``max_wavelength`` down to ``min_wavelength`` mm, so the
    embedding separates points a few millimetres apart and still varies smoothly across a body.
    """

    def __init__(self, dim: int, n_freq: int = 8, min_wavelength: float = 8.0, max_wavelength: float = 1024.0) -> None:
        super().__init__()
        wl = torch.logspace(math.log10(max_wavelength), math.log10(min_wavelength), n_freq, dtype=torch.float64)
        self.freqs: torch.Tensor
        self.register_buffer("freqs", 2 * math.pi / wl, persistent=False)
        self.proj = nn.Linear(3 * 2 * n_freq, dim)

    def forward(self, mm: torch.Tensor) -> torch.Tensor:
        x = mm.to(torch.float64)[..., None] * self.freqs  # (..., 3, n_freq) in float64: mm can be large
        feats = torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2).to(self.proj.weight.dtype)  # (..., 6 n_freq)
        return self.proj(feats)  # (..., dim)


class WindowTokenizer(nn.Module):
    """Sliding-window image tokens with millimetre positions (see the module docstring).

    Args:
        dim: token width (the projection ``proj`` passed to :meth:`forward` outputs ``dim``).
        roi_size: window size in voxels (i, j, k).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch: windows per encoder call (over all volumes of the batch); bounds memory.
        train_windows: ``"all"`` or K >= 1 windows sampled per volume per training step.
        checkpoint: recompute window activations in the backward pass (training memory).
        pad_value: value of the padding added to volumes smaller than a window.
    """

    def __init__(self, dim: int, *, roi_size: Sequence[int] = (64, 64, 64), overlap: float = 0.25, batch: int = 4,
                 train_windows: int | str = "all", checkpoint: bool = False, pad_value: float = 0.0) -> None:
        super().__init__()
        roi = tuple(int(r) for r in roi_size)
        if len(roi) != 3 or min(roi) < 1:
            raise ValueError(f"model.windows.roi_size must be 3 positive integers, got {tuple(roi_size)}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"model.windows.overlap must be in [0, 1), got {overlap!r}")
        if int(batch) < 1:
            raise ValueError(f"model.windows.batch must be >= 1, got {batch!r}")
        if train_windows != "all" and (isinstance(train_windows, bool) or not isinstance(train_windows, int)
                                       or train_windows < 1):
            raise ValueError(f"model.windows.train_windows must be 'all' or an integer >= 1, got {train_windows!r}")
        self.roi_size: tuple[int, int, int] = (roi[0], roi[1], roi[2])
        self.overlap = float(overlap)
        self.batch = int(batch)
        self.train_windows = train_windows
        self.checkpoint = bool(checkpoint)
        self.pad_value = float(pad_value)
        self.pos = MillimetrePosition(dim)
        # explanations: when a list, each encoded window batch is appended as (leaf input, [(window, case)])
        self.capture: list[tuple[torch.Tensor, list[tuple[int, int]]]] | None = None
        # explanations: when a dict, no-grad results are reused for the same (image, affine) objects
        self.reuse: dict[tuple[int, int], tuple[torch.Tensor, WindowLayout]] | None = None

    def extra_repr(self) -> str:
        return (f"roi_size={self.roi_size}, overlap={self.overlap}, batch={self.batch}, "
                f"train_windows={self.train_windows}, checkpoint={self.checkpoint}")

    def _features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(n, C_in, r0, r1, r2) -> feature maps (n, C, d, h, w), checkpointed when asked and useful.

        3D convolutions run about a fifth faster on CPU with channels-last weights and inputs, so
        the encoder's 5-D weights are put in that layout on first use (values unchanged)."""
        cl = torch.channels_last_3d
        if any(p.dim() == 5 and p.shape[1] > 1 and not p.is_contiguous(memory_format=cl) for p in encoder.parameters()):
            encoder.to(memory_format=cl)  # type: ignore[call-overload]  # once; as the trainer does
        fn: Any = encoder.forward_features
        if (self.checkpoint or self.capture is not None) and torch.is_grad_enabled():
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def forward(self, encoder: nn.Module, proj: nn.Module, image: torch.Tensor, affine: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, WindowLayout]:
        """(B, C, D, H, W) [+ affine (B, 4, 4)] -> tokens (B, W * d*h*w, dim) and their :class:`WindowLayout`."""
        key = (id(image), id(affine))
        if self.reuse is not None and not torch.is_grad_enabled() and key in self.reuse:
            return self.reuse[key]
        out = self._tokens(encoder, proj, image, affine)
        if self.reuse is not None and not torch.is_grad_enabled():
            self.reuse[key] = out
        return out

    def _tokens(self, encoder: nn.Module, proj: nn.Module, image: torch.Tensor, affine: torch.Tensor | None
                ) -> tuple[torch.Tensor, WindowLayout]:
        b = image.shape[0]
        padded, pad = pad_volume(image, self.roi_size, self.pad_value)  # (B, C, D', H', W')
        slices = window_slices(image.shape[2:], self.roi_size, self.overlap)
        if self.training and self.train_windows != "all" and int(self.train_windows) < len(slices):
            pick = torch.randperm(len(slices))[: int(self.train_windows)].sort().values.tolist()
            slices = [slices[i] for i in pick]
        pairs = [(w, i) for w in range(len(slices)) for i in range(b)]  # window-major token order
        chunks: list[torch.Tensor] = []
        fmap_shape: tuple[int, int, int] = (1, 1, 1)
        grad = torch.is_grad_enabled()
        for start, stop in _chunks(len(pairs), self.batch):
            part = pairs[start:stop]
            if grad:
                x = torch.stack([padded[(i, slice(None), *slices[w])] for w, i in part])  # (n, C, r0, r1, r2)
                x = x.contiguous(memory_format=torch.channels_last_3d)
            else:  # straight into a channels-last batch: one copy per window, no stacked intermediate
                x = _window_batch(padded, [(i, slices[w]) for w, i in part], self.roi_size)
            if self.capture is not None:
                x = x.detach().requires_grad_(True)
                self.capture.append((x, part))
            fmap = self._features(encoder, x)  # (n, C, d, h, w)
            fmap_shape = (int(fmap.shape[2]), int(fmap.shape[3]), int(fmap.shape[4]))
            chunks.append(proj(fmap.flatten(2).transpose(1, 2)))  # (n, d*h*w, dim)
        n_win, n_cell = len(slices), chunks[0].shape[1]
        tok = torch.cat(chunks).reshape(n_win, b, n_cell, -1).transpose(0, 1).reshape(b, n_win * n_cell, -1)
        ijk = cell_centres_voxel(slices, self.roi_size, fmap_shape, pad, device=image.device)  # (N, 3)
        aff = affine if affine is not None else default_affine(b, image.device)
        mm = voxel_to_mm(aff, ijk)  # (B, N, 3) float64
        d, h, w = image.shape[2:]
        pd_, ph, pw = padded.shape[2:]
        layout = WindowLayout(image_shape=(d, h, w), pad=pad, padded_shape=(pd_, ph, pw),
                              roi_size=self.roi_size, slices=tuple(slices), fmap_shape=fmap_shape,
                              centres_mm=mm.detach())
        return tok + self.pos(mm), layout  # (B, N, dim)


def _window_batch(volume: torch.Tensor, where: list[tuple[int, tuple[slice, slice, slice]]],
                  roi: tuple[int, int, int]) -> torch.Tensor:
    """Windows of a (B, C, D, H, W) volume -> (n, C, r0, r1, r2) channels-last, one copy each (no grad)."""
    out = torch.empty((len(where), volume.shape[1], *roi), dtype=volume.dtype, device=volume.device,
                      memory_format=torch.channels_last_3d)
    for j, (i, s) in enumerate(where):
        out[j].copy_(volume[(i, slice(None), *s)])
    return out


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of ``size`` items; a last chunk of one item joins the one
    before it (BatchNorm in training cannot normalise a single window with a 1x1x1 feature map)."""
    bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class ImageToClinical(CrossAttentionBlock):
    """The reverse direction of the cross-attention: image tokens (queries) attend to the
    [CLS; clinical] tokens (keys/values), pre-norm, then a feed-forward layer, both residual.

    The attention output and the last feed-forward layer start at zero, so at initialisation
    the block is the identity and a bidirectional model starts as the one-way model.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__(dim, heads, dropout, zero_init=True)

    def forward(self, img: torch.Tensor, clin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Image tokens (B, N, D) attend to clinical tokens (B, Q, D) -> updated image tokens (B, N, D)."""
        return super().forward(img, clin, need_weights=False)[0]
