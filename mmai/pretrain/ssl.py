"""Self-supervised objective of ``mmai pretrain``: masked-volume inpainting + contrastive views.

The recipe of MONAI's self-supervised tutorial (two augmented views, random cuboids cut out,
L1 reconstruction of the uncut view, and a contrastive (NT-Xent) loss pulling the two views of
a volume together and pushing other volumes away), adapted to mmai's 3D CNN encoders:

    v1, v2 = augment(x), augment(x)                    # flips, intensity scale/shift, noise
    m1, m2 = cut_cuboids(v1), cut_cuboids(v2)          # mask_fraction of the voxels hidden
    f      = encoder.forward_features([m1; m2])        # (2B, C, d, h, w)
    r      = decoder(f)                                # (2B, C_in, D, H, W) (convs to D/2, then upsampled)
    z      = projection(mean_dhw(f))                   # (2B, 64)
    loss   = L1(r, [v1; v2]) + contrastive_weight * NT-Xent(z[:B], z[B:])   # weight 0 by default

Only the encoder is kept (``encoder.safetensors``); the decoder and projection are thrown away.
All randomness comes from torch's global generator (saved in every checkpoint), so a resumed
run draws the same views and masks as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.losses import ContrastiveLoss
from torch import nn
from torch.nn import functional as F

from mmai.models.image_encoders import ImageEncoder


class _UpBlock(nn.Module):
    """Trilinear upsampling to a given size, then conv 3x3x3 + BatchNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out),
                                  nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=False)  # (B, c_in, *size)
        return self.conv(x)  # (B, c_out, *size)


class SSLModel(nn.Module):
    """Encoder + light decoder (inpainting) + projection head (contrastive).

    Args:
        encoder: an :class:`~mmai.models.image_encoders.ImageEncoder`.
        in_channels: image channels C_in (the decoder's output).
        widths: decoder channels, coarse to fine (e.g. the encoder widths reversed, minus the last).
        stages: upsampling stages to half resolution (log2 of the encoder's reduction minus 1: 3 for
            ``resnet``, 4 for ``resnet10``..).
        proj_dim: width of the contrastive embedding.
    """

    def __init__(self, encoder: ImageEncoder, in_channels: int, widths: Sequence[int], stages: int,
                 proj_dim: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        c = int(encoder.num_features)
        chans = [int(w) for w in widths][:stages]
        chans += [chans[-1]] * (stages - len(chans))
        blocks, prev = [], c
        for w in chans:
            blocks.append(_UpBlock(prev, w))
            prev = w
        self.up = nn.ModuleList(blocks)
        self.out = nn.Conv3d(prev, in_channels, 1)
        hidden = max(64, c)
        self.proj = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C_in, D, H, W) -> reconstruction (N, C_in, D, H, W) and embedding (N, proj_dim).

        The decoder's convolutions stop at half resolution (a full-resolution 3x3x3 stage would
        cost three encoders on CPU); the last step is a 1x1x1 convolution and trilinear upsampling."""
        f = self.encoder.forward_features(x)  # (N, C, d, h, w)
        full = torch.tensor(x.shape[2:], dtype=torch.float64)
        n = len(self.up)
        r = f
        for i, block in enumerate(self.up):
            size = [max(1, int(s)) for s in torch.ceil(full / 2 ** (n - i)).tolist()]
            r = block(r, size)  # (N, w_i, D / 2^(n-i), ...)
        r = F.interpolate(self.out(r), size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        return r, self.proj(f.mean(dim=(2, 3, 4)))  # (N, C_in, D, H, W), (N, proj_dim)


def build_ssl_model(encoder: ImageEncoder, in_channels: int, widths: Sequence[int]) -> SSLModel:
    """An :class:`SSLModel` whose decoder undoes the encoder's measured reduction."""
    probe = torch.zeros(2, in_channels, 32, 32, 32)
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        d = int(encoder.forward_features(probe).shape[2])
    encoder.train(was)
    stages = max(1, round(math.log2(32 / max(1, d))) - 1)  # up to half resolution
    return SSLModel(encoder, in_channels, list(reversed([int(w) for w in widths]))[1:] or [int(widths[0])], stages)


# ----------------------------------------------------------------------------- views and masks


def augment_view(x: torch.Tensor) -> torch.Tensor:
    """One random view of each volume (B, C, D, H, W): flips per axis, intensity scale and shift
    (relative to the volume's spread) and Gaussian noise; random numbers from torch's CPU generator."""
    b = x.shape[0]
    out = x.clone()
    flips = torch.rand(b, 3) < 0.5
    for i in range(b):
        dims = [2 + a for a in range(3) if bool(flips[i, a])]
        if dims:
            out[i] = torch.flip(out[i : i + 1], dims=dims)[0]
    spread = out.flatten(1).std(dim=1).clamp_min(1e-3).view(b, 1, 1, 1, 1)
    scale = (0.9 + 0.2 * torch.rand(b)).view(b, 1, 1, 1, 1).to(out)
    shift = ((torch.rand(b) - 0.5) * 0.2).view(b, 1, 1, 1, 1).to(out)
    noise = torch.randn(out.shape).to(out)
    return out * scale + (shift + 0.05 * noise) * spread


def cut_cuboids(x: torch.Tensor, fraction: float, size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hide random cuboids (edges ``size`` x each axis) until ``fraction`` of each volume's voxels
    are covered; hidden voxels get noise around the volume's mean. Returns (masked x, mask (B, 1, D, H, W))."""
    b, _, *shape = x.shape
    edge = [max(1, int(round(s * size))) for s in shape]
    mask = torch.zeros(b, 1, *shape, dtype=torch.bool)
    per_box = min(0.999, math.prod(edge) / math.prod(shape))
    # boxes fall independently: k boxes cover about 1 - (1 - per_box)^k; stamp that many, then top up
    first = max(1, math.ceil(math.log(1 - fraction) / math.log(1 - per_box)))
    n_boxes = first * 3
    starts = [torch.randint(0, max(1, s - e + 1), (b, n_boxes)) for s, e in zip(shape, edge, strict=True)]
    for i in range(b):
        for k in range(n_boxes):
            if k >= first and mask[i].float().mean() >= fraction:
                break
            z, y, w = (int(st[i, k]) for st in starts)
            mask[i, :, z : z + edge[0], y : y + edge[1], w : w + edge[2]] = True
    mask = mask.to(x.device)
    flat = x.flatten(1)
    fill = (flat.mean(dim=1).view(b, 1, 1, 1, 1) + flat.std(dim=1).view(b, 1, 1, 1, 1)
            * torch.randn(x.shape).to(x) * 0.5)
    return torch.where(mask, fill, x), mask


def random_crop(x: torch.Tensor, roi: Sequence[int], background: float) -> torch.Tensor:
    """One random window of ``roi`` voxels per volume (padded with ``background`` where smaller):
    sliding-window pipelines pretrain on the windows their encoder will see."""
    pad: list[int] = []
    for s, r in zip(reversed(x.shape[2:]), reversed(list(roi)), strict=True):
        extra = max(0, int(r) - int(s))
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        x = F.pad(x, pad, value=background)
    b = x.shape[0]
    out = []
    for i in range(b):
        st = [int(torch.randint(0, int(s) - int(r) + 1, (1,))) for s, r in zip(x.shape[2:], roi, strict=True)]
        out.append(x[i, :, st[0] : st[0] + roi[0], st[1] : st[1] + roi[1], st[2] : st[2] + roi[2]])
    return torch.stack(out)  # (B, C, *roi)


def ssl_loss(model: nn.Module, x: torch.Tensor, *, mask_fraction: float, mask_size: float,
             contrastive_weight: float, temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss of a batch (B, C, D, H, W) and its parts ``inpaint`` / ``contrastive`` (detached)."""
    b = x.shape[0]
    cpu = x.detach().float().cpu()
    v = torch.cat([augment_view(cpu), augment_view(cpu)])  # (2B, C, D, H, W)
    masked, _ = cut_cuboids(v, mask_fraction, mask_size)
    dev = x.device
    recon, z = model(masked.to(dev).contiguous(memory_format=torch.channels_last_3d))  # (2B, C, ...), (2B, E)
    inpaint = F.l1_loss(recon.float(), v.to(dev))
    if b >= 2 and contrastive_weight > 0:
        con = ContrastiveLoss(temperature=temperature)(z[:b].float(), z[b:].float())
    else:  # keeps the projection in the graph (DDP) without a contrastive signal
        con = 0.0 * z.float().sum()
    total = inpaint + contrastive_weight * con
    return total, {"inpaint": inpaint.detach(), "contrastive": con.detach()}
