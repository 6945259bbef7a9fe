"""The interface every backbone implements, for one CNN (``groups=1``) or N local CNNs at once."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, InputSizeError
from .layers import CHANNELS_LAST, GroupedLinear, grouped_flatten, split_state_dict, stack_state_dicts


def scale(channels: int, width: float) -> int:
    """Channels after the width multiplier (at least 4)."""
    return max(4, int(round(channels * width)))


def spatial_mean(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, C)``: global average pooling over the spatial axes."""
    return feature_map.mean(dim=tuple(range(2, feature_map.dim())))


def channel_bins(channels: int, dim: int) -> torch.Tensor:
    """The ``(C, D)`` matrix that averages ``C`` channels down to ``D``: column ``j`` is the mean of channels
    ``floor(j C / D)`` to ``ceil((j + 1) C / D) - 1``, the bins of ``adaptive_avg_pool1d`` (a matrix product, so
    that ONNX and TorchScript export it for any ``C`` and ``D``)."""
    bins = torch.zeros(channels, dim, dtype=torch.float64)
    for j in range(dim):
        start, end = (j * channels) // dim, -(-((j + 1) * channels) // dim)
        bins[start:end, j] = 1.0 / (end - start)
    return bins


def reduce_features(pooled: torch.Tensor, dim: int | None, where: str = "the local CNNs") -> torch.Tensor:
    """Pooled features ``(..., C)`` -> ``(..., D)``: adjacent channels averaged (:func:`channel_bins`); all ``C``
    where ``dim`` is None or ``C``. No parameters: the local CNNs' features, reduced, are what an aggregator reads."""
    channels = pooled.shape[-1]
    if dim is None or dim == channels:
        return pooled
    if dim > channels:
        raise ConfigError(f"--feature-dim {dim} is more than the {channels} channels of {where}' pooled features; "
                          f"pass at most {channels}, or leave it unset for all of them")
    return pooled @ channel_bins(channels, dim).to(pooled.device, pooled.dtype)


class Backbone(nn.Module):
    """Base class: ``features`` (convolutions) then ``head`` (dense layers), timm-style.

    ``forward`` takes ``(B, C, *spatial)`` when ``groups == 1`` and returns ``(B, K)``, or takes
    ``(B, G, C, *spatial)`` and returns ``(B, G, K)``: the logits of each of the ``G`` local CNNs.

    ``channels_last`` (default on) runs the convolutional part in the channels-last memory format, whatever
    the input's format, for batches of at least :attr:`channels_last_min_batch` samples: on CPU batch norm is
    vectorised over channels only in that format, 1.5x (8x8 maps) to 6x (2x2 maps) faster, and a training step
    1.15x to 1.4x (see benchmarks/README.md). Small batches (unit tests, single images) stay as they come: there
    the conversion gains nothing, and the channels-last batch norm starts a thread team even for a handful of
    values, which on an oversubscribed machine can cost a scheduler time slice per call. It changes no result
    and no parameter.
    """

    channels_last_min_batch: int = 32

    min_input_size: int = 4

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int, groups: int):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InputSizeError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims}")
        self.in_channels, self.num_classes, self.spatial_dims, self.groups = (
            in_channels,
            num_classes,
            spatial_dims,
            groups,
        )
        self.channels_last = True

    def check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        """Raise InputSizeError when an input of this spatial shape is too small for the backbone."""
        name = type(self).__name__
        if len(input_shape) != self.spatial_dims:
            raise InputSizeError(
                f"{name} was built for {self.spatial_dims}D inputs but got a {len(input_shape)}D shape {input_shape}"
            )
        if min(input_shape) < self.min_input_size:
            side = "x".join([str(self.min_input_size)] * self.spatial_dims)
            raise InputSizeError(
                f"inputs of {'x'.join(map(str, input_shape))} pixels are smaller than the {side} that "
                f"{name} needs; use a coarser grid, larger images or another backbone"
            )

    # -- the timm-style split ---------------------------------------------------------------------------------
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, G*C_in, *spatial)`` -> the last feature map ``(B, G*C, *spatial')`` (what ``features`` ends with:
        vgg's average pooling to at most 4 pixels a side, resnet's and densenet's global average pooling)."""
        if self.channels_last and x.shape[0] >= self.channels_last_min_batch:
            x = x.contiguous(memory_format=CHANNELS_LAST[self.spatial_dims])
        return self.features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, G*C, *spatial)`` -> ``(B, G, F)`` pooled/flattened features of each group."""
        return grouped_flatten(self.feature_map(x), self.groups)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, G, F)`` -> ``(B, G, K)``."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, grouped_input = self._grouped(x)
        logits = self.forward_head(self.forward_features(x))
        return logits if grouped_input else logits[:, 0]

    def forward_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``(B, G, K)`` and the pooled features ``(B, G, C)`` of each group, from one pass of the
        convolutional part: its last feature map averaged over the spatial axes (:func:`spatial_mean`). Inputs as
        :meth:`forward` takes them; for ungrouped ones ``(B, K)`` and ``(B, C)``."""
        x, grouped_input = self._grouped(x)
        feature_map = self.feature_map(x)
        logits = self.forward_head(grouped_flatten(feature_map, self.groups))
        pooled = spatial_mean(feature_map).reshape(x.shape[0], self.groups, -1)
        return (logits, pooled) if grouped_input else (logits[:, 0], pooled[:, 0])

    def _grouped(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``x`` as the grouped convolutions take it, ``(B, G*C, *spatial)``, and whether it came grouped,
        ``(B, G, C, *spatial)``, rather than as one CNN's ``(B, C, *spatial)``."""
        grouped_input = x.dim() == self.spatial_dims + 3
        if grouped_input:
            if x.shape[1] != self.groups or x.shape[2] != self.in_channels:
                raise InputSizeError(
                    f"expected input (B, {self.groups}, {self.in_channels}, ...), got {tuple(x.shape)}"
                )
            return x.flatten(1, 2), True
        if self.groups != 1 or x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise InputSizeError(
                f"expected input (B, {self.in_channels}, {', '.join('*' * self.spatial_dims)}) "
                f"for this {self.spatial_dims}D backbone with {self.groups} group(s), got {tuple(x.shape)}"
            )
        return x, False

    # -- the groups' state dicts (the same three methods as models.stacked.StackedModules) ------------------------
    def split_state(self, state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """Group ``index``'s state dict, as the ``groups=1`` backbone has it, from a state dict of this one."""
        return split_state_dict(state, self.groups, index)

    def stack_states(self, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`split_state`: the state dict of ``len(states)`` groups from their own."""
        return stack_state_dicts(list(states))

    def load_copy_state(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Copy a ``groups=1`` backbone's state dict into group ``index``, in place."""
        with torch.no_grad():
            for name, value in self.state_dict().items():
                if value.dim() > 0:
                    value.chunk(self.groups)[index].copy_(state[name])

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last dense layer by a fresh one with ``num_classes`` outputs."""
        last: GroupedLinear = self.head[-1]
        self.head[-1] = GroupedLinear(last.in_features, num_classes, self.groups)
        self.num_classes = num_classes
