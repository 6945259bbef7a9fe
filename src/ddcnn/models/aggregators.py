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
as in the papers, or their logits, which keep what the softmax removes (how far above the others a class is, and
each local CNN's overall scale). The closed-form rules are defined on probabilities and always read those. The
:class:`~ddcnn.models.cnn_dnn.CNNDNN` and the aggregation phase hand each aggregator what it reads.

Registry: ``@register_aggregator("name")`` on an :class:`Aggregator` subclass, ``create_aggregator(name,
num_subdomains, num_classes, **options)``, ``list_aggregators()``; :func:`aggregator_options` reads a class's
options from a :class:`~ddcnn.config.ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..config.options import LOCAL_OUTPUTS
from ..errors import ConfigError, InputSizeError, UnknownNameError

# probabilities are clamped here before a log: an underflowed softmax (exactly 0) must not give -inf scores
MIN_PROBABILITY = 1e-12


class Aggregator(nn.Module):
    """Base class: local probabilities ``(B, N, K)`` -> class scores ``(B, K)`` (logits or log-probabilities)."""

    name: ClassVar[str] = ""
    trainable: ClassVar[bool] = False  # True: trained by gradient descent on local probabilities
    fitted: ClassVar[bool] = False  # True: fit() learns from held-out local probabilities (closed form)
    # the peak learning rate of AdamW in the aggregation phase, unless --aggregator-lr sets one
    default_lr: ClassVar[float] = 0.01

    def __init__(self, num_subdomains: int, num_classes: int, local_output: str = "probabilities"):
        super().__init__()
        if local_output not in LOCAL_OUTPUTS:
            raise ConfigError(f"local_output must be one of {', '.join(LOCAL_OUTPUTS)}, got {local_output!r}")
        if local_output != "probabilities" and not self.trainable:
            raise ConfigError(f"the {self.name} aggregator combines probabilities; local_output {local_output} is "
                              "for the trained aggregators")
        self.num_subdomains, self.num_classes = num_subdomains, num_classes
        self.local_output = local_output  # "probabilities" or "logits" of the local CNNs, (B, N, K) either way

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
        if probabilities.dim() != 3 or tuple(probabilities.shape[1:]) != (self.num_subdomains, self.num_classes):
            raise InputSizeError(
                f"{type(self).__name__} expects local {self.local_output} (B, {self.num_subdomains}, "
                f"{self.num_classes}), got {tuple(probabilities.shape)}"
            )

    def extra_repr(self) -> str:
        reads = "" if self.local_output == "probabilities" else f", local_output={self.local_output}"
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


def create_aggregator(name: str, num_subdomains: int, num_classes: int, **options: Any) -> Aggregator:
    """Build aggregator ``name`` for ``num_subdomains`` local CNNs and ``num_classes`` classes."""
    return aggregator_class(name)(num_subdomains, num_classes, **options)


def aggregator_options(name: str, model: ModelConfig) -> dict[str, Any]:
    """The options :func:`create_aggregator` needs for ``name`` under ``model`` (stored in checkpoints)."""
    return aggregator_class(name).options_from_config(model)


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
    ):
        super().__init__(num_subdomains, num_classes, local_output)
        if activation not in _ACTIVATIONS:
            raise UnknownNameError("DNN activation", activation, _ACTIVATIONS)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dnn_dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        features = num_subdomains * num_classes
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

    def __init__(self, num_subdomains: int, num_classes: int, local_output: str = "probabilities"):
        super().__init__(num_subdomains, num_classes, local_output)
        self.linear = nn.Linear(num_subdomains * num_classes, num_classes)

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
    ):
        super().__init__(num_subdomains, num_classes, local_output)
        if dim < 1 or heads < 1 or dim % heads or layers < 1:
            raise ConfigError(f"attention aggregator: dim {dim} must be a positive multiple of heads {heads}, and "
                              f"layers {layers} at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"attention aggregator: dropout must be in [0, 1), got {dropout}")
        self.embed = nn.Linear(num_classes, dim)
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


# -- closed form ------------------------------------------------------------------------------------------------


@register_aggregator("mean")
class MeanAggregator(Aggregator):
    """Average probability: ``log (1/N) sum_i p_i``; the prediction is its argmax."""

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        return probabilities.mean(1).clamp_min(MIN_PROBABILITY).log()


@register_aggregator("logmean")
class LogMeanAggregator(Aggregator):
    """Average log-probability ``(1/N) sum_i log p_i`` (the geometric mean), renormalised to log-probabilities.

    Probabilities are clamped at ``MIN_PROBABILITY`` first, so one local CNN certain that a class is impossible
    lowers that class by a bounded amount instead of vetoing it.
    """

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        return probabilities.clamp_min(MIN_PROBABILITY).log().mean(1).log_softmax(-1)


@register_aggregator("vote")
class VoteAggregator(Aggregator):
    """Majority voting of the local predictions ``argmax_k p_i[k]``.

    Tie rule: among the classes with the most votes, the one with the highest summed probability
    ``s[k] = sum_i p_i[k]`` wins (if that ties too, the lowest class index). The output is the log of the
    distribution ``q[k] = (votes[k] + s[k] / (N + 1)) / (N + N / (N + 1))``: since ``s[k] <= N < N + 1``, one
    vote more always outweighs any probability sum, so ``argmax q`` is exactly the rule above, and ``q > 0``.
    """

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        n = self.num_subdomains
        votes = F.one_hot(probabilities.argmax(-1), self.num_classes).sum(1).to(probabilities.dtype)
        score = votes + probabilities.sum(1) / (n + 1)
        return (score / (n + n / (n + 1))).clamp_min(MIN_PROBABILITY).log()


@register_aggregator("weighted")
class WeightedAggregator(Aggregator):
    """Average probability with each local CNN weighted by its skill on validation data.

    :meth:`fit` sets ``w_i = max(acc_i - 1/K, 0)``, local CNN ``i``'s validation accuracy above chance (a local
    CNN that sees only background gets no say), normalised to sum to 1; uniform when every local CNN is at
    chance. Output ``log sum_i w_i p_i``. No gradient training: the weights are a buffer.
    """

    fitted = True

    def __init__(self, num_subdomains: int, num_classes: int):
        super().__init__(num_subdomains, num_classes)
        self.register_buffer("weights", torch.full((num_subdomains,), 1.0 / num_subdomains))
        self.register_buffer("accuracies", torch.full((num_subdomains,), float("nan")))

    def fit(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        self.check_input(probabilities)
        labels = labels.to(probabilities.device)
        accuracies = (probabilities.argmax(-1) == labels[:, None]).float().mean(0)
        skill = (accuracies - 1.0 / self.num_classes).clamp_min(0.0)
        weights = skill / skill.sum() if skill.sum() > 0 else torch.full_like(skill, 1.0 / self.num_subdomains)
        self.accuracies.copy_(accuracies)
        self.weights.copy_(weights)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        self.check_input(probabilities)
        mixed = torch.einsum("bnk,n->bk", probabilities, self.weights.to(probabilities.dtype))
        return mixed.clamp_min(MIN_PROBABILITY).log()
