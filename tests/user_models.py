"""Backbone factories as a user writes them, for tests/test_factory.py: ``--backbone user_models:make_cnn`` (the
tests folder is on the path of pytest and of the subprocesses the tests start).

``make_cnn`` is a small VGG-like CNN of ordinary torch layers (conv, batch norm, ReLU, max-pooling, dense layers),
2D or 3D, that takes every keyword ddcnn passes and ``width``. The others are the shapes of factory that
docs/backbones.md describes: MONAI's DenseNet121 through a thin adapter (MONAI names the classes ``out_channels``),
a torchvision-like ``**kwargs`` factory without ``in_channels``, and broken ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVGPOOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def make_cnn(
    in_channels: int,
    num_classes: int,
    spatial_dims: int,
    image_shape: tuple[int, ...],
    width: float = 1.0,
    stages: tuple[int | str, ...] = (8, "M", 16, "M"),
    hidden: int = 16,
) -> nn.Module:
    """conv-BN-ReLU stages (``"M"``: max-pooling while the map stays 2 pixels wide), adaptive pooling to at most 2
    pixels per axis, a hidden dense layer and the classifier."""
    layers: list[nn.Module] = []
    channels, size = in_channels, list(image_shape)
    for stage in stages:
        if stage == "M":
            if min(size) >= 4:
                layers.append(POOL[spatial_dims](2))
                size = [s // 2 for s in size]
            continue
        out = max(2, round(int(stage) * width))
        layers += [CONV[spatial_dims](channels, out, 3, padding=1), NORM[spatial_dims](out), nn.ReLU()]
        channels = out
    pooled = [min(s, 2) for s in size]
    layers += [AVGPOOL[spatial_dims](tuple(pooled)), nn.Flatten()]
    features = channels * math.prod(pooled)
    if hidden:
        layers += [nn.Linear(features, max(2, round(hidden * width))), nn.ReLU()]
        features = max(2, round(hidden * width))
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def make_vgg3(
    in_channels: int, num_classes: int, spatial_dims: int, image_shape: tuple[int, ...], width: float = 1.0
) -> nn.Module:
    """The layers of ddcnn's built-in vgg3 (32 and 64 channels, no hidden dense layer) as ordinary torch layers
    (its pooling to 4 pixels per axis aside)."""
    return make_cnn(in_channels, num_classes, spatial_dims, image_shape, width, stages=(32, "M", 64, "M"), hidden=0)


def monai_densenet121(in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    """MONAI's DenseNet121 (its own keywords: ``out_channels`` for the classes), at a tiny size for tests: a real
    model would keep MONAI's defaults (64 features, growth 32, blocks 6-12-24-16)."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        init_features=8,
        growth_rate=4,
        block_config=(2, 2),
    )


class ThreeChannelNet(nn.Module):
    """Like a torchvision model: ``num_classes`` but no ``in_channels``; its first conv expects RGB."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def torchvision_like(**kwargs) -> nn.Module:
    """A ``**kwargs`` factory that passes everything on to a class without ``in_channels``, as
    ``torchvision.models.resnet18(weights=None, **kwargs)`` does."""
    return ThreeChannelNet(**kwargs)


def fixed_classes(in_channels: int) -> nn.Module:
    """Takes no num_classes: always 7 logits."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, 7))


def no_module(in_channels: int, num_classes: int):
    return "not a module"


def failing(in_channels: int, num_classes: int) -> nn.Module:
    raise RuntimeError("the factory's own bug")


class InPlaceScale(nn.Module):
    """A module vmap cannot batch: an in-place update of a parameter-free buffer by the input's statistics."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.copy_(x.detach().abs().max().item())  # .item(): data-dependent Python, which vmap refuses
        return self.fc(x.flatten(2).mean(-1))


NOT_CALLABLE = 3


class TimmStyle(nn.Module):
    """timm's interface: ``forward_features`` (a feature map, or with ``flat`` the flattened features ``(B, C)``)
    and ``forward_head``, with ``forward(x) == forward_head(forward_features(x))``; for ``--local-output features``
    (tests/test_aggregator_inputs.py)."""

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int, flat: bool = False):
        super().__init__()
        self.flat = flat
        self.conv = CONV[spatial_dims](in_channels, 6, 3, padding=1)
        self.norm = NORM[spatial_dims](6)
        self.fc = nn.Linear(6, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.norm(self.conv(x)))
        return features.flatten(2).mean(-1) if self.flat else features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features if self.flat else features.flatten(2).mean(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def timm_style(in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    return TimmStyle(in_channels, num_classes, spatial_dims)


def timm_style_flat(in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    return TimmStyle(in_channels, num_classes, spatial_dims, flat=True)
