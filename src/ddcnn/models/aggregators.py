"""Aggregators: the "coarse problem" of the decomposition, from local probabilities to one prediction.

Every aggregator maps the class probabilities of the ``N`` local CNNs, ``(B, N, K)``, to class scores ``(B, K)``
whose softmax is the aggregated class distribution, so every output can go into cross-entropy and into
:func:`~ddcnn.train.metrics.classification_report` alike:

=========  ===================  ===========================================================================
name       output               rule
=========  ===================  ===========================================================================
dnn        logits               the paper's dense network on the ``N*K`` concatenated probabilities (trained)
linear     logits               one affine map ``N*K -> K``: a learned linear stacker (trained)
attention  logits               a small transformer over the ``N`` subdomain tokens, position-embedded (trained)
mean       log-probabilities    average probability, ``log (1/N) sum_i p_i``
logmean    log-probabilities    average log-probability (geometric mean), renormalised
vote       log-probabilities    majority voting of ``argmax p_i`` (tie rule below)
weighted   log-probabilities    average probability weighted by each local CNN's validation accuracy
=========  ===================  ===========================================================================

*Trained* aggregators (``trainable = True``) are trained by gradient descent on frozen local probabilities (the
aggregation phase, with AdamW at their ``default_lr``) or end to end inside a CNN-DNN (coherent training); the
others have a closed-form :meth:`Aggregator.fit` on held-out probabilities, a no-op for all but ``weighted``
(``fitted = True``).

What the trained ones read is their ``local_output`` (``ModelConfig.local_output``): the local CNNs' probabilities,
as in the papers; their logits, which keep what the softmax removes (how far above the others a class is, and
each local CNN's overall scale); or their pooled features, ``(B, N, D)`` (``input_dim`` D, ``--feature-dim``): what
each local CNN saw before its classifier, averaged over space and down to D channels, parameter-free
(:meth:`~ddcnn.models.LocalCNNs.forward_with_features`). The closed-form rules are defined on probabilities and
always read those. The :class:`~ddcnn.models.cnn_dnn.CNNDNN` and the aggregation phase hand each aggregator what it
reads. ``ddcnn compare --methods`` names a trained aggregator with its input, ``dnn:logits`` (:func:`split_input`,
:func:`check_aggregator_input`); a plain ``dnn`` reads ``--local-output``.

The trained ones are defined here, the closed-form ones in :mod:`ddcnn.models.closed_form`. Registry:
``@register_aggregator("name")`` on an :class:`Aggregator` subclass, ``create_aggregator(name,
num_subdomains, num_classes, **options)``, ``list_aggregators()``; :func:`aggregator_options` reads a class's
options from a :class:`~ddcnn.config.ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ModelConfig
from ..config.options import INPUT_SEPARATOR, LOCAL_OUTPUTS, split_input
from ..errors import ConfigError, InputSizeError, UnknownNameError

# probabilities are clamped here before a log: an underflowed softmax (exactly 0) must not give -inf scores
MIN_PROBABILITY = 1e-12


class Aggregator(nn.Module):
    """Base class: local probabilities ``(B, N, K)`` -> class scores ``(B, K)`` (logits or log-probabilities).

    A trained one may read the local logits ``(B, N, K)`` or pooled features ``(B, N, input_dim)`` instead
    (``local_output``); ``input_dim``, the numbers per subdomain, is ``K`` but for features.
    """

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False  # True: trained by gradient descent on local probabilities
    fitted: ClassVar[bool] = False  # True: fit() learns from held-out local probabilities (closed form)
    # the peak learning rate of AdamW in the aggregation phase, unless --aggregator-lr sets one
    default_lr: ClassVar[float] = 0.01

    def __init__(
        self, num_subdomains: int, num_classes: int, local_output: str = "probabilities", input_dim: int | None = None
    ):
        super().__init__()
        if local_output not in LOCAL_OUTPUTS:
            raise ConfigError(f"local_output must be one of {', '.join(LOCAL_OUTPUTS)}, got {local_output!r}")
        if local_output != "probabilities" and not self.trainable:
            raise ConfigError(f"the {self.name} aggregator combines probabilities; local_output {local_output} is "
                              "for the trained aggregators")
        if local_output == "features" and (input_dim is None or input_dim < 1):
            raise ConfigError(f"the {self.name} aggregator reading features needs their number per subdomain, "
                              f"input_dim, at least 1 (got {input_dim})")
        if local_output != "features" and input_dim not in (None, num_classes):
            raise ConfigError(f"the {self.name} aggregator reads the local {local_output}, {num_classes} per "
                              f"subdomain; input_dim {input_dim} is for local_output features")
        self.num_subdomains, self.num_classes = num_subdomains, num_classes
        self.local_output = local_output  # "probabilities", "logits" or "features" of the local CNNs
        self.input_dim = num_classes if input_dim is None else int(input_dim)  # (B, N, input_dim) in

    @classmethod
    def options_from_config(cls, model: ModelConfig) -> dict[str, Any]:
        """This aggregator's constructor options taken from a model configuration: for a trained one its
        ``local_output`` where it is not the default (so that the specs of earlier checkpoints stay equal)."""
        if cls.trainable and model.local_output != "probabilities":
            return {"local_output": model.local_output}
        return {}

    def fit(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        """Closed-form fit on held-out local probabilities ``(n, N, K)`` and labels ``(n,)``; a no-op by default."""

    def check_input(self, probabilities: torch.Tensor) -> None:
        if probabilities.dim() != 3 or tuple(probabilities.shape[1:]) != (self.num_subdomains, self.input_dim):
            raise InputSizeError(
                f"{type(self).__name__} expects local {self.local_output} (B, {self.num_subdomains}, "
                f"{self.input_dim}), got {tuple(probabilities.shape)}"
            )

    def extra_repr(self) -> str:
        reads = "" if self.local_output == "probabilities" else f", local_output={self.local_output}"
        reads += f", input_dim={self.input_dim}" if self.local_output == "features" else ""
        return f"num_subdomains={self.num_subdomains}, num_classes={self.num_classes}{reads}"


_AGGREGATORS: dict[str, type[Aggregator]] = {}


def register_aggregator(name: str) -> Callable[[type[Aggregator]], type[Aggregator]]:
    """Class decorator: register an :class:`Aggregator` subclass under ``name``."""

    def register(cls: type[Aggregator]) -> type[Aggregator]:
        if name in _AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is registered twice")
        cls.name = name
        _AGGREGATORS[name] = cls
        return cls

    return register


def list_aggregators() -> list[str]:
    """The registered aggregator names, in registration order (trained ones first)."""
    return list(_AGGREGATORS)


def list_dnn_activations() -> list[str]:
    """The activations the DNN aggregator takes (``dnn_activation``)."""
    return list(_ACTIVATIONS)


def aggregator_class(name: str) -> type[Aggregator]:
    if name not in _AGGREGATORS:
        raise UnknownNameError("aggregator", name, _AGGREGATORS)
    return _AGGREGATORS[name]


def check_aggregator_input(method: str) -> tuple[str, str | None]:
    """``(aggregator, input)`` of a method ``dnn:logits`` (input None for a plain ``dnn``); a one-line error for an
    unknown aggregator, an unknown input, or an input given to a closed-form aggregator."""
    base, reads = split_input(method)
    cls = aggregator_class(base)
    if reads is not None and (reads not in LOCAL_OUTPUTS or not cls.trainable):
        why = f"{reads!r} is no input" if reads not in LOCAL_OUTPUTS else f"the {base} aggregator is not trained"
        raise ConfigError(f"method {method!r}: {why}; an aggregator with its input is one of "
                          f"{', '.join(list_aggregator_inputs())}")
    return base, reads


def list_aggregator_inputs() -> list[str]:
    """Every trained aggregator with every input it can read, ``dnn:probabilities``... (``ddcnn compare``)."""
    return [f"{a}{INPUT_SEPARATOR}{o}" for a, cls in _AGGREGATORS.items() if cls.trainable for o in LOCAL_OUTPUTS]


def create_aggregator(name: str, num_subdomains: int, num_classes: int, **options: Any) -> Aggregator:
    """Build aggregator ``name`` (or ``name:input``, :func:`check_aggregator_input`) for ``num_subdomains`` local
    CNNs and ``num_classes`` classes."""
    base, reads = check_aggregator_input(name)
    if reads is not None and options.setdefault("local_output", reads) != reads:
        raise ConfigError(f"aggregator {name} with local_output {options['local_output']}: give one input")
    return aggregator_class(base)(num_subdomains, num_classes, **options)


def aggregator_options(
    name: str, model: ModelConfig, feature_channels: Callable[[], int] | None = None
) -> dict[str, Any]:
    """The options :func:`create_aggregator` needs for ``name`` (or ``name:input``, which reads ``input`` instead of
    ``model.local_output``) under ``model`` (stored in checkpoints). One that reads features gets ``input_dim``:
    ``model.feature_dim``, or unset all ``C`` pooled features of a local CNN, which ``feature_channels()`` gives
    (:func:`~ddcnn.models.local_cnns.feature_channels`; it also refuses a ``feature_dim`` above ``C``)."""
    base, reads = check_aggregator_input(name)
    if reads is not None and reads != model.local_output:
        model = dataclasses.replace(model, local_output=reads)
    options = aggregator_class(base).options_from_config(model)
    if options.get("local_output") == "features":
        options["input_dim"] = feature_input_dim(model.feature_dim, feature_channels)
    return options


def feature_input_dim(feature_dim: int | None, feature_channels: Callable[[], int] | None) -> int:
    """``D``, the pooled features per subdomain an aggregator reads: ``feature_dim``, at most the local CNNs' ``C``
    (``feature_channels()``), or unset all ``C``."""
    channels = None if feature_channels is None else int(feature_channels())
    if channels is None:
        if feature_dim is None:
            raise ValueError("an aggregator reading all the local CNNs' features needs their number (feature_channels)")
        return int(feature_dim)
    if feature_dim is not None and feature_dim > channels:
        raise ConfigError(f"--feature-dim {feature_dim} is more than the {channels} channels of the local CNNs' "
                          f"pooled features; pass at most {channels}, or leave it unset for all of them")
    return channels if feature_dim is None else int(feature_dim)


# -- trained ----------------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


@register_aggregator("dnn")
class DNNAggregator(Aggregator):
    """The paper's DNN: dense layers on the ``N*K`` concatenated local probabilities, returning logits.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]``; the last layer is linear.
    """

    trainable = True

    def __init__(
        self,
        num_subdomains: int,
        num_classes: int,
        hidden: tuple[int, ...] = (128, 128),
        activation: str = "relu",
        dropout: float = 0.1,
        batchnorm: bool = True,
        local_output: str = "probabilities",
        input_dim: int | None = None,
    ):
        super().__init__(num_subdomains, num_classes, local_output, input_dim)
        if activation not in _ACTIVATIONS:
            raise UnknownNameError("DNN activation", activation, _ACTIVATIONS)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dnn_dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        features = num_subdomains * self.input_dim
        for width in hidden:
            layers.append(nn.Linear(features, width, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*layers)

    @classmethod
    def options_from_config(cls, model: ModelConfig) -> dict[str, Any]:
        return {
            "hidden": tuple(model.dnn_hidden),
            "activation": model.dnn_activation,
            "dropout": model.dnn_dropout,
            "batchnorm": model.dnn_batchnorm,
            **super().options_from_config(model),
        }

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        return self.net(probabilities.flatten(1))


@register_aggregator("linear")
class LinearAggregator(Aggregator):
    """A learned linear stacker: one affine map from the ``N*K`` concatenated probabilities to ``K`` logits.

    Its learning rate in the aggregation phase is 10x the dnn's: its logits must grow large to be as sharp as the
    probabilities it combines, and at 0.01 it was still short of them after 10 epochs (1.5% lower test accuracy
    on CIFAR-10 2x2, benchmarks/README.md).
    """

    trainable = True
    default_lr = 0.1

    def __init__(
        self, num_subdomains: int, num_classes: int, local_output: str = "probabilities", input_dim: int | None = None
    ):
        super().__init__(num_subdomains, num_classes, local_output, input_dim)
        self.linear = nn.Linear(num_subdomains * self.input_dim, num_classes)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        return self.linear(probabilities.flatten(1))


@register_aggregator("attention")
class AttentionAggregator(Aggregator):
    """A small transformer encoder over the ``N`` subdomain tokens, returning logits.

    Token ``i`` is a linear embedding of local CNN ``i``'s ``K``-vector (one embedding shared by all subdomains)
    plus a learned position embedding of subdomain ``i``; ``layers`` pre-norm encoder layers (``heads`` heads,
    feed-forward ``2 * dim``, GELU, ``dropout``) let every subdomain's token attend to every other's; the tokens'
    mean, layer-normed, goes through a linear head to ``K`` logits. Attention and mean pooling treat the tokens as
    a set, so the position embeddings are all that tells the subdomains apart: with them zeroed the output is
    invariant under any permutation of the subdomains (the dnn and linear aggregators know a subdomain by its
    place in the concatenation). Its options are recorded in checkpoints, so they rebuild if the defaults change.
    """

    trainable = True
    # AdamW's usual rate for a small transformer: its layer norms keep activations at unit scale, so the dnn's
    # 0.01 (and the linear stacker's 0.1) would be steps too large for its attention weights
    default_lr = 0.003

    def __init__(
        self,
        num_subdomains: int,
        num_classes: int,
        dim: int = 32,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
        local_output: str = "probabilities",
        input_dim: int | None = None,
    ):
        super().__init__(num_subdomains, num_classes, local_output, input_dim)
        if dim < 1 or heads < 1 or dim % heads or layers < 1:
            raise ConfigError(f"attention aggregator: dim {dim} must be a positive multiple of heads {heads}, and "
                              f"layers {layers} at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"attention aggregator: dropout must be in [0, 1), got {dropout}")
        self.embed = nn.Linear(self.input_dim, dim)
        self.position = nn.Parameter(torch.randn(num_subdomains, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # no nested-tensor fast path: the tokens are never padded
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    @classmethod
    def options_from_config(cls, model: ModelConfig) -> dict[str, Any]:
        return {"dim": 32, "heads": 4, "layers": 2, "dropout": 0.1, **super().options_from_config(model)}

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        tokens = self.embed(probabilities) + self.position.to(probabilities.dtype)
        return self.head(self.norm(self.encoder(tokens).mean(1)))
