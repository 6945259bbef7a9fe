"""The N local CNNs of a decomposition as one batched module.

All subdomains run through one grouped backbone (``groups=N``): one convolution call, one batched matrix product
per layer for all local CNNs, forward and backward. The local CNNs share nothing; each can be exported as an
ordinary single backbone (:meth:`LocalCNNs.local_cnn`) and loaded back (:meth:`LocalCNNs.load_local_cnn`), and a
process's share of them in model-parallel training is a :class:`LocalCNNs` of some subdomains
(:meth:`LocalCNNs.subset`). With a ``1x1`` grid the single "local" CNN sees the whole image: that is the global CNN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..decomposition import Decomposition
from ..errors import CheckpointMismatchError
from .backbone import Backbone
from .layers import split_state_dict, stack_state_dicts
from .registry import create_model


class LocalCNNs(nn.Module):
    """``(B, C, *image_shape)`` -> logits ``(B, N, K)``: local CNN ``i`` sees only subimage ``i``."""

    def __init__(
        self,
        backbone: str,
        decomposition: Decomposition,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        subdomains: list[int] | None = None,
    ):
        super().__init__()
        self.backbone_name, self.decomposition, self.width = backbone, decomposition, width
        self.in_channels, self.num_classes = in_channels, num_classes
        # the subdomains this module computes: all of them, or one process's share in model-parallel training
        self.subdomains = list(range(decomposition.num_subdomains)) if subdomains is None else list(subdomains)
        self.net: Backbone = self._create(len(self.subdomains))

    def _create(self, groups: int) -> Backbone:
        return create_model(
            self.backbone_name,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            spatial_dims=self.decomposition.spatial_dims,
            width=self.width,
            groups=groups,
            input_shape=self.decomposition.subimage_shape,
        )

    @property
    def num_local_cnns(self) -> int:
        """How many local CNNs this module holds: all of the decomposition's subdomains, or one process's share."""
        return len(self.subdomains)

    @property
    def is_share(self) -> bool:
        """Whether this module holds only some of the decomposition's local CNNs (one process's share)."""
        return self.num_local_cnns < self.decomposition.num_subdomains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        subimages = self.decomposition.split(x)
        if self.is_share:
            subimages = subimages[:, self.subdomains]
        return self.net(subimages)

    def forward_subimages(self, subimages: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, N, K)`` from already split subimages ``(B, N, C, *subimage_shape)``."""
        return self.net(subimages)

    def local_cnn(self, index: int) -> Backbone:
        """Local CNN ``index`` (position in :attr:`subdomains`) as a standalone backbone: a copy that takes
        subimages ``(B, C, *subimage_shape)``."""
        single = self._create(1).to(next(self.parameters()).device)
        single.load_state_dict(split_state_dict(self.net.state_dict(), self.num_local_cnns, index))
        return single

    def load_local_cnn(self, index: int, local_cnn: Backbone | dict[str, torch.Tensor]) -> None:
        """Copy a standalone local CNN (or its state dict) into position ``index``, checking names and shapes."""
        state = local_cnn.state_dict() if isinstance(local_cnn, nn.Module) else local_cnn
        own = self.net.state_dict()
        expected = split_state_dict(own, self.num_local_cnns, index)
        _check_compatible(expected, state, what=f"local CNN {index}")
        with torch.no_grad():
            for name, value in own.items():
                if value.dim() > 0:
                    value.chunk(self.num_local_cnns)[index].copy_(state[name])

    def subset(self, subdomains: Sequence[int]) -> LocalCNNs:
        """A copy holding only the local CNNs of ``subdomains`` (subdomain indices, each held by this module), in
        that order: one process's share in model-parallel training."""
        missing = [i for i in subdomains if i not in self.subdomains]
        if missing:
            raise ValueError(f"subdomains {missing} are not among this module's {self.subdomains}")
        with torch.random.fork_rng(devices=[]):  # building the copy must not advance the RNG of the run
            part = LocalCNNs(
                self.backbone_name, self.decomposition, self.in_channels, self.num_classes, self.width, list(subdomains)
            )
        state = self.net.state_dict()
        part.net.load_state_dict(
            stack_state_dicts([split_state_dict(state, self.num_local_cnns, self.subdomains.index(i)) for i in subdomains])
        )
        first = next(self.parameters())
        return part.to(first.device, first.dtype)

    @classmethod
    def from_local_cnns(
        cls, local_cnns: list[Backbone], decomposition: Decomposition, backbone: str, width: float = 1.0
    ) -> LocalCNNs:
        """Stack N standalone local CNNs into one batched module."""
        first = local_cnns[0]
        model = cls(backbone, decomposition, first.in_channels, first.num_classes, width)
        stacked = stack_state_dicts([m.state_dict() for m in local_cnns])
        _check_compatible(model.net.state_dict(), stacked, what="stacked local CNNs")
        model.net.load_state_dict(stacked)
        return model


def _check_compatible(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointMismatchError unless ``given`` has exactly the parameter names and shapes of ``expected``."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{what} does not fit: missing {missing[:3]}, unexpected {extra[:3]}; "
            "was it trained with another backbone or grid?"
        )
    for name, value in expected.items():
        if tuple(given[name].shape) != tuple(value.shape):
            raise CheckpointMismatchError(
                f"{what} does not fit: {name} has shape {tuple(given[name].shape)}, expected {tuple(value.shape)}; "
                "was it trained with another backbone, grid, width or number of classes?"
            )
