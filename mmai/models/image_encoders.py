"""MONAI 3D CNNs behind one contract.

Every encoder is an ``nn.Module`` with

- ``num_features``: the channel count C of its feature map, and
- ``forward_features(x)``: ``(B, C_in, D, H, W) -> (B, C, d, h, w)``, the last feature map
  before any pooling (fusion models turn it into ``d * h * w`` tokens),
- ``forward(x)``: ``(B, C_in, D, H, W) -> (B, C)``, global average pooled.

Create them by name with :func:`create_encoder` (timm style). ``resnet10`` / ``resnet18`` /
``resnet34`` / ``resnet50`` are MONAI's ResNets in the MedicalNet layout (7x7x7 stride-2 stem,
max-pool, the MedicalNet shortcut types), so MedicalNet checkpoints load onto them
(:mod:`mmai.models.pretrained`); with ``widths: [64, 128, 256, 512]`` they match MedicalNet's
published weights key for key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.networks.nets import DenseNet121, ResNet
from monai.networks.nets.resnet import resnet_params
from monai.utils import look_up_option
from torch import nn


class ImageEncoder(nn.Module):
    """Base class: subclasses implement ``forward_features`` and set ``num_features``."""

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3, 4))  # (B, C)


class ResNetEncoder(ImageEncoder):
    """MONAI's 3D ResNet (basic blocks), without max-pool and classifier.

    Args:
        in_channels: input channels C_in.
        widths: channels of the four stages; the feature map has ``widths[-1]`` channels and
            1/16 of the input size (stride 2 stem, stride 2 in stages 2-4).
        layers: residual blocks per stage.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128),
                 layers: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        if len(widths) != 4 or len(layers) != 4:
            raise ValueError(f"ResNetEncoder needs 4 widths and 4 layer counts, got {widths} / {layers}")
        self.net = ResNet(block="basic", layers=list(layers), block_inplanes=list(widths), spatial_dims=3,
                          n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=2,
                          no_max_pool=True, feed_forward=False)
        self.num_features = int(widths[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))  # (B, w0, D/2, H/2, W/2)
        x = n.layer1(x)
        x = n.layer2(x)  # (B, w1, D/4, ...)
        x = n.layer3(x)  # (B, w2, D/8, ...)
        return n.layer4(x)  # (B, w3, D/16, ...)


class DenseNetEncoder(ImageEncoder):
    """MONAI's DenseNet121 feature trunk (heavier; for GPUs)."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128),
                 layers: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        net = DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=1, init_features=int(widths[0]),
                          growth_rate=max(8, int(widths[0]) // 2))
        self.features = net.features
        out_layer: Any = net.class_layers.out
        self.num_features = int(out_layer.in_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x))  # (B, C, D/32, H/32, W/32)


class MedicalNetResNetEncoder(ImageEncoder):
    """MONAI's ResNet-``depth`` in the MedicalNet layout, without classifier.

    Stem: 7x7x7 convolution, stride 2, then a stride-2 max-pool; stages 2-4 stride 2, so the
    feature map has 1/32 of the input size and ``widths[-1]`` (basic blocks: depth 10, 18, 34) or
    ``4 * widths[-1]`` (bottleneck: depth 50) channels. Shortcut type and downsample bias follow
    MedicalNet (as MONAI's ``resnet_params`` records them), so the
    parameter names and shapes equal a MedicalNet checkpoint's after ``module.`` is removed.

    Args:
        depth: 10, 18, 34 or 50.
        in_channels: input channels C_in.
        widths: channels of the four stages (MedicalNet: 64, 128, 256, 512).
    """

    def __init__(self, depth: int, in_channels: int = 1, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"resnet{depth} needs 4 widths, got {tuple(widths)}")
        block, stage_layers, shortcut, bias_downsample, _ = resnet_params[f"resnet{depth}"]
        self.depth = int(depth)
        self.net = ResNet(block=block, layers=list(stage_layers), block_inplanes=list(widths), spatial_dims=3,
                          n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, no_max_pool=False,
                          shortcut_type=shortcut, bias_downsample=bias_downsample, feed_forward=False)
        self.num_features = int(widths[-1]) * (4 if block == "bottleneck" else 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))  # (B, w0, D/2, H/2, W/2)
        x = n.maxpool(x)  # (B, w0, D/4, ...)
        x = n.layer1(x)
        x = n.layer2(x)  # (B, w1 [x4], D/8, ...)
        x = n.layer3(x)  # (B, w2 [x4], D/16, ...)
        return n.layer4(x)  # (B, w3 [x4], D/32, ...)


def _medicalnet(depth: int) -> Callable[..., ImageEncoder]:
    def make(in_channels: int = 1, widths: Sequence[int] = (64, 128, 256, 512),
             layers: Sequence[int] | None = None) -> ImageEncoder:  # layers: fixed by the depth
        return MedicalNetResNetEncoder(depth, in_channels=in_channels, widths=widths)

    make.__name__ = f"resnet{depth}"
    return make


ENCODERS: dict[str, Callable[..., ImageEncoder]] = {
    "resnet": ResNetEncoder,
    "densenet": DenseNetEncoder,
    **{f"resnet{d}": _medicalnet(d) for d in (10, 18, 34, 50)},
}


def create_encoder(name: str, *, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128),
                   layers: Sequence[int] = (1, 1, 1, 1)) -> ImageEncoder:
    """Build an image encoder by name (``resnet``, ``densenet``, ``resnet10`` / ``18`` / ``34`` / ``50``)."""
    cls = look_up_option(name, ENCODERS)
    return cls(in_channels=in_channels, widths=widths, layers=layers)
