"""ResNet-type backbones, 2D and 3D: the CIFAR-style ResNet-20 and the ImageNet-style ResNet-18 and ResNet-50.

The stem goes with the architecture, as in the papers: ResNet-20 starts with one 3x3 convolution at full
resolution (CIFAR), ResNet-18 and ResNet-50 with torchvision's 7x7 stride-2 convolution and 3x3 stride-2 max-pool
(ImageNet), which needs inputs of at least 16x16. At width 1 the ImageNet ones have exactly torchvision's
parameters (11,689,512 and 25,557,032 for 1000 classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbone import Backbone, scale
from .layers import GroupedLinear, adaptive_avgpool, batchnorm, conv, maxpool
from .registry import register_model


def _shortcut(dims: int, cin: int, cout: int, stride: int, groups: int) -> nn.Module:
    """A residual block's shortcut: the identity, or a strided 1x1 projection where the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv(dims, cin, cout, 1, groups, stride=stride), batchnorm(dims, cout, groups))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection where the shape changes)."""

    expansion = 1

    def __init__(self, dims: int, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = conv(dims, cin, cout, 3, groups, stride=stride)
        self.bn1 = batchnorm(dims, cout, groups)
        self.conv2 = conv(dims, cout, cout, 3, groups)
        self.bn2 = batchnorm(dims, cout, groups)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(dims, cin, cout, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 convolution down to ``width`` channels, 3x3 (with the stride, as torchvision's ResNet v1.5), 1x1 up to
    ``expansion * width``, with a residual connection (1x1 projection where the shape changes)."""

    expansion = 4

    def __init__(self, dims: int, cin: int, width: int, stride: int, groups: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv(dims, cin, width, 1, groups)
        self.bn1 = batchnorm(dims, width, groups)
        self.conv2 = conv(dims, width, width, 3, groups, stride=stride)
        self.bn2 = batchnorm(dims, width, groups)
        self.conv3 = conv(dims, width, cout, 1, groups)
        self.bn3 = batchnorm(dims, cout, groups)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(dims, cin, cout, stride, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(Backbone):
    def __init__(
        self,
        stem: str,
        widths: Sequence[int],
        blocks: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        spatial_dims: int = 2,
        width: float = 1.0,
        groups: int = 1,
        input_shape: Sequence[int] | None = None,
        block: type[BasicBlock | Bottleneck] = BasicBlock,
    ):
        super().__init__(in_channels, num_classes, spatial_dims, groups)
        self.min_input_size = 16 if stem == "imagenet" else 4
        self.check_input_shape(tuple(input_shape) if input_shape is not None else (32,) * spatial_dims)
        widths = [scale(w, width) for w in widths]
        d = spatial_dims
        if stem == "imagenet":  # 7x7 stride-2 convolution and a stride-2 max-pool
            layers: list[nn.Module] = [
                conv(d, in_channels, widths[0], 7, groups, stride=2),
                batchnorm(d, widths[0], groups),
                nn.ReLU(),
                maxpool(d, 3, stride=2, padding=1),
            ]
        else:  # CIFAR: one 3x3 convolution at full resolution
            layers = [conv(d, in_channels, widths[0], 3, groups), batchnorm(d, widths[0], groups), nn.ReLU()]
        channels = widths[0]
        for stage, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                layers.append(block(d, channels, w, 2 if (stage > 0 and b == 0) else 1, groups))
                channels = w * block.expansion
        layers.append(adaptive_avgpool(d, 1))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(GroupedLinear(channels, num_classes, groups))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@register_model
def resnet20(**kwargs) -> ResNet:
    """CIFAR-style ResNet-20: 3 stages of 3 basic blocks, 16-32-64 channels."""
    return ResNet("cifar", [16, 32, 64], [3, 3, 3], **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ImageNet-style ResNet-18: 7x7 stem, 4 stages of 2 basic blocks, 64-512 channels."""
    return ResNet("imagenet", [64, 128, 256, 512], [2, 2, 2, 2], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ImageNet-style ResNet-50: 7x7 stem, 4 stages of 3-4-6-3 bottleneck blocks, 256-2048 channels."""
    return ResNet("imagenet", [64, 128, 256, 512], [3, 4, 6, 3], block=Bottleneck, **kwargs)
