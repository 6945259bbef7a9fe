"""The N local CNNs of a decomposition as one batched module.

A registered backbone runs all subdomains as one grouped network (``groups=N``): one convolution call, one batched
matrix product per layer for all local CNNs, forward and backward. A backbone factory the user brings
(``package.module:function``, :mod:`ddcnn.models.factory`) runs as N copies of the user's module stored as one
(:class:`~ddcnn.models.stacked.StackedModules`: batched by ``torch.func.vmap`` where that works, else a loop). Either
way every tensor of the local CNNs is the dim-0 concatenation of the N local CNNs' tensors, the layout that
optimizers, checkpoints and model-parallel training rely on.

The local CNNs share nothing; each can be exported as an ordinary single module (:meth:`LocalCNNs.local_cnn`: a
``groups=1`` backbone, or a module of the user's class) and loaded back (:meth:`LocalCNNs.load_local_cnn`), and a
process's share of them in model-parallel training is a :class:`LocalCNNs` of some subdomains
(:meth:`LocalCNNs.subset`). With a ``1x1`` grid the single "local" CNN sees the whole image: that is the global CNN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..decomposition import Decomposition
from ..errors import CheckpointMismatchError
from .backbone import Backbone, reduce_features
from .factory import build_factory_module, factory_name, is_factory_name, resolve_factory
from .registry import create_model
from .stacked import BATCHING, StackedModules


class LocalCNNs(nn.Module):
    """``(B, C, *image_shape)`` -> logits ``(B, N, K)``: local CNN ``i`` sees only subimage ``i``.

    ``backbone`` is a registered backbone (:func:`~ddcnn.models.list_models`) or a factory
    ``package.module:function`` (see :meth:`from_factory`); ``batching`` (``auto``, ``vmap`` or ``loop``) is how a
    factory's copies run (:mod:`ddcnn.models.stacked`), for factories only.
    """

    def __init__(
        self,
        backbone: str,
        decomposition: Decomposition,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        subdomains: list[int] | None = None,
        batching: str = "auto",
    ):
        super().__init__()
        self.backbone_name, self.decomposition, self.width = backbone, decomposition, width
        self.in_channels, self.num_classes = in_channels, num_classes
        if batching not in BATCHING:
            raise ValueError(f"batching {batching!r} is not one of {', '.join(BATCHING)}")
        if batching != "auto" and not self.is_factory:
            raise ValueError(f"batching={batching!r} is for backbone factories; {backbone} runs as one grouped module")
        self._batching = batching
        # the subdomains this module computes: all of them, or one process's share in model-parallel training
        self.subdomains = list(range(decomposition.num_subdomains)) if subdomains is None else list(subdomains)
        self.net: Backbone | StackedModules = self._create(len(self.subdomains))

    @property
    def is_factory(self) -> bool:
        """Whether the backbone is a factory the user brings (not a registered, grouped one)."""
        return is_factory_name(self.backbone_name)

    def _create(self, copies: int) -> Backbone | StackedModules:
        if not self.is_factory:
            return create_model(
                self.backbone_name,
                in_channels=self.in_channels,
                num_classes=self.num_classes,
                spatial_dims=self.decomposition.spatial_dims,
                width=self.width,
                groups=copies,
                input_shape=self.decomposition.subimage_shape,
            )
        modules = [self._factory_module(check=i == 0) for i in range(copies)]  # the first checked on a forward
        input_shape = (self.in_channels, *self.decomposition.subimage_shape)
        return StackedModules(modules, input_shape, self._batching, name=self.backbone_name)

    def _factory_module(self, check: bool = True) -> nn.Module:
        """One fresh local CNN from the factory (checked on a probe forward)."""
        return build_factory_module(
            self.backbone_name,
            resolve_factory(self.backbone_name),
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            image_shape=self.decomposition.subimage_shape,
            width=self.width,
            check=check,
        )

    @property
    def num_local_cnns(self) -> int:
        """How many local CNNs this module holds: all of the decomposition's subdomains, or one process's share."""
        return len(self.subdomains)

    @property
    def is_share(self) -> bool:
        """Whether this module holds only some of the decomposition's local CNNs (one process's share)."""
        return self.num_local_cnns < self.decomposition.num_subdomains

    @property
    def batching(self) -> str:
        """How the local CNNs run: ``grouped`` (a registered backbone), or ``vmap`` or ``loop`` (a factory's)."""
        return self.net.batching if isinstance(self.net, StackedModules) else "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n, K)`` of this module's local CNNs from whole images ``(B, C, *image_shape)``, or from their
        subimages already cut, ``(B, n, C, *subimage_shape)`` (a loader of a process's own subimages yields those,
        :mod:`ddcnn.data.subimages`)."""
        if x.dim() == 3 + self.decomposition.spatial_dims:
            return self.forward_subimages(x)
        subimages = self.decomposition.split(x)
        if self.is_share:
            subimages = subimages[:, self.subdomains]
        return self.net(subimages)

    def forward_subimages(self, subimages: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, N, K)`` from already split subimages ``(B, N, C, *subimage_shape)``."""
        return self.net(subimages)

    def forward_with_features(self, x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``(B, n, K)`` and the pooled features ``(B, n, D)`` of this module's local CNNs, from one pass
        of their convolutional part; inputs as :meth:`forward` takes them. A local CNN's pooled features: its last
        feature map averaged over the spatial axes to its ``C`` channels, then to ``dim`` (``D``) by averaging
        adjacent channels (:func:`~ddcnn.models.backbone.reduce_features`; unset: all ``C``). No parameters, so the
        frozen local CNNs' features are computed once in the aggregation phase, as their probabilities are. A
        factory's module needs timm's ``forward_features`` and ``forward_head`` (:mod:`ddcnn.models.factory`)."""
        if x.dim() != 3 + self.decomposition.spatial_dims:
            x = self.decomposition.split(x)
            if self.is_share:
                x = x[:, self.subdomains]
        logits, pooled = self.net.forward_pooled(x)
        return logits, reduce_features(pooled, dim, f"the {self.backbone_name} local CNNs")

    def frozen_head(self) -> list[str]:
        """Stop the gradients of the parameters the pooled features do not depend on (the classifier heads), for a
        CNN-DNN whose aggregator reads the features: its output does not depend on them, and an optimizer or DDP
        must not wait for their gradients. Returns their names. Found by one backward of a probe (two zero
        subimages, on a forked RNG, in eval mode: no statistic moves)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        first = params[0]
        probe = torch.zeros(2, self.num_local_cnns, self.in_channels, *self.decomposition.subimage_shape,
                            device=first.device, dtype=first.dtype)
        training = self.training
        try:
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
                self.eval()
                features = self.forward_with_features(probe)[1]
                grads = torch.autograd.grad(features.sum(), params, allow_unused=True)
        finally:
            self.train(training)
        unused = {id(p) for p, g in zip(params, grads) if g is None}
        names = [name for name, p in self.named_parameters() if id(p) in unused]
        for p in params:
            if id(p) in unused:
                p.requires_grad_(False)
        return names

    def local_cnn(self, index: int) -> nn.Module:
        """Local CNN ``index`` (position in :attr:`subdomains`) as a standalone module that takes subimages
        ``(B, C, *subimage_shape)``: a ``groups=1`` backbone, or a module of the factory's own class; a copy, on this
        module's device and dtype, in training mode."""
        with torch.random.fork_rng(devices=[]):  # building the copy must not advance the RNG of the run
            single = self._factory_module() if self.is_factory else self._create(1)
        first = next(self.parameters())
        single = single.to(first.device, first.dtype)
        single.load_state_dict(self.net.split_state(self.net.state_dict(), index))
        return single

    def load_local_cnn(self, index: int, local_cnn: nn.Module | dict[str, torch.Tensor]) -> None:
        """Copy a standalone local CNN (or its state dict) into position ``index``, checking names and shapes."""
        state = local_cnn.state_dict() if isinstance(local_cnn, nn.Module) else local_cnn
        expected = self.net.split_state(self.net.state_dict(), index)
        _check_compatible(expected, state, what=f"local CNN {index}")
        self.net.load_copy_state(index, state)

    def subset(self, subdomains: Sequence[int]) -> LocalCNNs:
        """A copy holding only the local CNNs of ``subdomains`` (subdomain indices, each held by this module), in
        that order: one process's share in model-parallel training."""
        missing = [i for i in subdomains if i not in self.subdomains]
        if missing:
            raise ValueError(f"subdomains {missing} are not among this module's {self.subdomains}")
        batching = self.batching if self.is_factory else "auto"  # as probed here: no second probe
        with torch.random.fork_rng(devices=[]):  # building the copy must not advance the RNG of the run
            part = LocalCNNs(
                self.backbone_name, self.decomposition, self.in_channels, self.num_classes, self.width,
                list(subdomains), batching,
            )
        state = self.net.state_dict()
        parts = [self.net.split_state(state, self.subdomains.index(i)) for i in subdomains]
        part.net.load_state_dict(part.net.stack_states(parts))
        first = next(self.parameters())
        return part.to(first.device, first.dtype)

    @classmethod
    def from_local_cnns(
        cls,
        local_cnns: list[nn.Module],
        decomposition: Decomposition,
        backbone: str,
        width: float = 1.0,
        in_channels: int | None = None,
        num_classes: int | None = None,
    ) -> LocalCNNs:
        """Stack N standalone local CNNs (one per subdomain) into one batched module; ``in_channels`` and
        ``num_classes`` default to the first one's attributes of those names (a built-in backbone has them)."""
        first = local_cnns[0]
        in_channels = first.in_channels if in_channels is None else in_channels
        num_classes = first.num_classes if num_classes is None else num_classes
        model = cls(backbone, decomposition, in_channels, num_classes, width)
        stacked = model.net.stack_states([m.state_dict() for m in local_cnns])
        _check_compatible(model.net.state_dict(), stacked, what="stacked local CNNs")
        model.net.load_state_dict(stacked)
        return model

    @classmethod
    def from_factory(
        cls,
        factory: str | Callable[..., nn.Module],
        decomposition: Decomposition | Sequence[int],
        in_channels: int,
        num_classes: int,
        image_shape: Sequence[int] | None = None,
        width: float = 1.0,
        batching: str = "auto",
        subdomains: list[int] | None = None,
    ) -> LocalCNNs:
        """The local CNNs of ``decomposition`` (or of the grid ``decomposition`` over images of ``image_shape``),
        each a module ``factory`` builds for its subimages.

        ``factory`` is a ``package.module:function`` name or the function (or class) itself, defined at the top
        level of an importable module so that checkpoints can name it. It is called with the keyword arguments it
        accepts of ``in_channels``, ``num_classes``, ``spatial_dims``, ``image_shape`` (the subimage's) and, if it
        takes it, ``width``; it returns an ``nn.Module`` mapping ``(B, in_channels, *image_shape)`` to
        ``(B, num_classes)`` (see :mod:`ddcnn.models.factory` and docs/backbones.md).
        """
        name = factory if isinstance(factory, str) else factory_name(factory)
        if not is_factory_name(name):
            raise ValueError(f"{name!r} is no factory name package.module:function; for a registered backbone use "
                             "LocalCNNs(name, ...)")
        if not isinstance(decomposition, Decomposition):
            if image_shape is None:
                raise ValueError("a grid needs the image_shape it decomposes; or pass a Decomposition")
            decomposition = Decomposition(tuple(decomposition), tuple(image_shape))
        elif image_shape is not None and tuple(image_shape) != decomposition.image_shape:
            raise ValueError(f"image_shape {tuple(image_shape)} is not the decomposition's {decomposition.image_shape}")
        return cls(name, decomposition, in_channels, num_classes, width, subdomains, batching)


@functools.lru_cache(maxsize=64)
def _feature_channels(
    backbone: str, subimage_shape: tuple[int, ...], in_channels: int, num_classes: int, width: float
) -> int:
    spatial_dims = len(subimage_shape)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the probe must not advance the RNG of the run
        one = LocalCNNs(backbone, Decomposition((1,) * spatial_dims, subimage_shape), in_channels, num_classes, width)
        probe = torch.zeros(2, 1, in_channels, *subimage_shape)
        return int(one.eval().forward_with_features(probe)[1].shape[-1])


def feature_channels(backbone: str, decomposition: Decomposition, in_channels: int, num_classes: int,
                     width: float = 1.0) -> int:
    """``C``: how many pooled features each local CNN of ``decomposition`` has (:meth:`LocalCNNs.forward_with_features`
    with all of them), from a probe of one local CNN, built once per backbone, subimage shape and width."""
    return _feature_channels(backbone, tuple(decomposition.subimage_shape), int(in_channels), int(num_classes),
                             float(width))


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
