"""The interface every backbone implements, for one CNN (``groups=1``) or N local CNNs at once."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputSizeError
from .layers import CHANNELS_LAST, GroupedLinear, grouped_flatten, split_state_dict, stack_state_dicts


def scale(channels: int, width: float) -> int:
    """Channels after the width multiplier (at least 4)."""
    return max(4, int(round(channels * width)))


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
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, G*C, *spatial)`` -> ``(B, G, F)`` pooled/flattened features of each group."""
        if self.channels_last and x.shape[0] >= self.channels_last_min_batch:
            x = x.contiguous(memory_format=CHANNELS_LAST[self.spatial_dims])
        return grouped_flatten(self.features(x), self.groups)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, G, F)`` -> ``(B, G, K)``."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouped_input = x.dim() == self.spatial_dims + 3
        if grouped_input:
            if x.shape[1] != self.groups or x.shape[2] != self.in_channels:
                raise InputSizeError(
                    f"expected input (B, {self.groups}, {self.in_channels}, ...), got {tuple(x.shape)}"
                )
            x = x.flatten(1, 2)
        elif self.groups != 1 or x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise InputSizeError(
                f"expected input (B, {self.in_channels}, {', '.join('*' * self.spatial_dims)}) "
                f"for this {self.spatial_dims}D backbone with {self.groups} group(s), got {tuple(x.shape)}"
            )
        logits = self.forward_head(self.forward_features(x))
        return logits if grouped_input else logits[:, 0]

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
