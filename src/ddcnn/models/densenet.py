"""DenseNet-BC backbones (Huang et al. 2017), 2D and 3D: DenseNet-121 and DenseNet-169.

As torchvision's: a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool, dense blocks of bottleneck layers
(BN-ReLU-1x1 conv to ``bn_size * growth_rate`` channels, BN-ReLU-3x3 conv to ``growth_rate``), each layer reading
the concatenation of all earlier feature maps of its block, and transitions (BN-ReLU-1x1 conv halving the
channels, 2x2 average pooling) between the blocks; then BN-ReLU, global average pooling and one dense layer. At
width 1 the parameters are exactly torchvision's (7,978,856 for DenseNet-121 on ImageNet).

With ``groups=N`` the concatenation is per local CNN (:func:`~ddcnn.models.layers.grouped_cat`): group ``g`` of a
layer's input is the features of group ``g`` only. The transitions halve the map rounding up
(:class:`~ddcnn.models.layers.HalvingAvgPool`), so that a 1-pixel map stays 1 pixel and a subimage of 16x16 runs
through all blocks; on even map sizes (ImageNet's 224x224 down to 7x7) this is torchvision's pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbone import Backbone, scale
from .layers import GroupedLinear, adaptive_avgpool, batchnorm, conv, grouped_cat, halving_avgpool, maxpool
from .registry import register_model


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * growth`` channels), BN-ReLU-3x3 conv: ``growth`` new channels per group."""

    def __init__(self, dims: int, cin: int, growth: int, bn_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.norm1 = batchnorm(dims, cin, groups)
        self.conv1 = conv(dims, cin, bn_size * growth, 1, groups)
        self.norm2 = batchnorm(dims, bn_size * growth, groups)
        self.conv2 = conv(dims, bn_size * growth, growth, 3, groups)
        self.relu = nn.ReLU()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = grouped_cat(features, self.groups)
        x = self.conv1(self.relu(self.norm1(x)))
        return self.conv2(self.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    """``layers`` dense layers; the output is the per-group concatenation of the input and every new map."""

    def __init__(self, dims: int, cin: int, layers: int, growth: int, bn_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.layers = nn.ModuleList(
            DenseLayer(dims, cin + i * growth, growth, bn_size, groups) for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return grouped_cat(features, self.groups)


def transition(dims: int, cin: int, cout: int, groups: int) -> nn.Sequential:
    """BN-ReLU-1x1 conv, then 2x2 average pooling (rounding up: a 1-pixel map stays 1 pixel)."""
    return nn.Sequential(
        batchnorm(dims, cin, groups), nn.ReLU(), conv(dims, cin, cout, 1, groups), halving_avgpool(dims)
    )


class DenseNet(Backbone):
    min_input_size = 16  # the ImageNet stem divides by 4, the transitions by 8 more (down to 1 pixel)

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        in_channels: int = 3,
        num_classes: int = 10,
        spatial_dims: int = 2,
        width: float = 1.0,
        groups: int = 1,
        input_shape: Sequence[int] | None = None,
    ):
        super().__init__(in_channels, num_classes, spatial_dims, groups)
        self.check_input_shape(tuple(input_shape) if input_shape is not None else (32,) * spatial_dims)
        d = spatial_dims
        growth, channels = scale(growth_rate, width), scale(num_init_features, width)
        layers: list[nn.Module] = [  # the ImageNet stem: 7x7 stride-2 convolution and a stride-2 max-pool
            conv(d, in_channels, channels, 7, groups, stride=2),
            batchnorm(d, channels, groups),
            nn.ReLU(),
            maxpool(d, 3, stride=2, padding=1),
        ]
        for i, n in enumerate(block_config):
            layers.append(DenseBlock(d, channels, n, growth, bn_size, groups))
            channels += n * growth
            if i != len(block_config) - 1:
                out = int(channels * compression)
                layers.append(transition(d, channels, out, groups))
                channels = out
        layers += [batchnorm(d, channels, groups), nn.ReLU(), adaptive_avgpool(d, 1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(GroupedLinear(channels, num_classes, groups))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight)


@register_model
def densenet121(growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16), **kwargs) -> DenseNet:
    """DenseNet-BC-121: growth rate 32, dense blocks of 6-12-24-16 layers, 64 initial features."""
    return DenseNet(growth_rate, block_config, **kwargs)


@register_model
def densenet169(growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 32, 32), **kwargs) -> DenseNet:
    """DenseNet-BC-169: growth rate 32, dense blocks of 6-12-32-32 layers, 64 initial features."""
    return DenseNet(growth_rate, block_config, **kwargs)
