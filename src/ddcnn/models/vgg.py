"""VGG-type backbones (conv-BN-ReLU stacks with max-pooling, then dense layers), 2D and 3D.

Max-pooling stops where it would shrink the feature map below 2 pixels, so the same family runs on a 32x32 image
and on its 8x8 subimages; the feature map is then average-pooled to at most 4 pixels per axis before the dense
layers. The dense part thus shrinks with the subimage, as in the papers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .backbone import Backbone, scale
from .layers import GroupedLinear, adaptive_avgpool, batchnorm, conv, maxpool
from .registry import register_model

POOL = "M"
MAX_FEATURE_SIDE = 4


class VGG(Backbone):
    def __init__(
        self,
        stages: Sequence[int | str],
        hidden: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        spatial_dims: int = 2,
        width: float = 1.0,
        groups: int = 1,
        input_shape: Sequence[int] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__(in_channels, num_classes, spatial_dims, groups)
        size = list(input_shape) if input_shape is not None else [32] * spatial_dims
        self.check_input_shape(tuple(size))
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in stages:
            if stage == POOL:
                if min(size) >= 4:  # pool only while the map stays at least 2 pixels wide
                    layers.append(maxpool(spatial_dims))
                    size = [s // 2 for s in size]
                continue
            out = scale(int(stage), width)
            layers += [conv(spatial_dims, channels, out, 3, groups), batchnorm(spatial_dims, out, groups), nn.ReLU()]
            channels = out
        pooled = [min(s, MAX_FEATURE_SIDE) for s in size]
        layers.append(adaptive_avgpool(spatial_dims, tuple(pooled)))
        self.features = nn.Sequential(*layers)

        head: list[nn.Module] = []
        features = channels
        for s in pooled:
            features *= s
        for h in hidden:
            h = scale(h, width)
            head += [GroupedLinear(features, h, groups), nn.ReLU()]
            if dropout:
                head.append(nn.Dropout(dropout))
            features = h
        head.append(GroupedLinear(features, num_classes, groups))
        self.head = nn.Sequential(*head)


@register_model
def vgg3(**kwargs) -> VGG:
    """2 conv layers + 1 dense layer: the small VGG-3 of the papers' CIFAR experiments, for quick runs."""
    return VGG([32, POOL, 64, POOL], hidden=[], **kwargs)


@register_model
def vgg9(**kwargs) -> VGG:
    """7 conv layers (32-64-128 channels) + 2 dense layers."""
    return VGG([32, 32, POOL, 64, 64, POOL, 128, 128, 128, POOL], hidden=[256], **kwargs)


@register_model
def vgg16(**kwargs) -> VGG:
    """The 13 conv layers of VGG-16 (64-512 channels) + 3 dense layers."""
    stages = [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL]
    return VGG(stages, hidden=[512, 512], **kwargs)
