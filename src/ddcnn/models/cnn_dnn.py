"""The CNN-DNN: the local CNNs of a decomposition composed with an aggregator, ``g(f_1(x_1), ..., f_N(x_N))``.

The local CNNs' logits become probabilities (softmax, in float32) and the aggregator maps them to class scores (an
aggregator with ``local_output`` logits gets the float32 logits themselves, one with ``features`` the local CNNs'
pooled features, :meth:`~ddcnn.models.LocalCNNs.forward_with_features`), so the composition is one differentiable
model: frozen local CNNs for the aggregation phase, trained end to end for
coherent training and transfer learning. :meth:`CNNDNN.from_pretrained` starts it from a local-phase (or CNN-DNN)
checkpoint, asserting that the backbone, grid and classes of the checkpoint's spec (:mod:`ddcnn.models.spec`) and
every parameter name and shape fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..errors import CheckpointMismatchError
from .aggregators import Aggregator
from .local_cnns import LocalCNNs, _check_compatible
from .spec import LOCAL_CNNS_FIELDS, ModelSpec, spec_of

LOCAL_PREFIX = "local_cnns."
AGGREGATOR_PREFIX = "aggregator."


class CNNDNN(nn.Module):
    """``(B, C, *image_shape)`` -> class scores ``(B, K)`` of ``aggregator`` on the local CNNs' probabilities.

    In model-parallel training ``local_cnns`` is one process's share of the local CNNs and ``gather`` maps their
    probabilities ``(B, n, K)`` to all subdomains' ``(B, N, K)``, differentiably
    (:meth:`ddcnn.distributed.Parallel.subdomain_gather`); every process holds the same aggregator.
    """

    def __init__(
        self,
        local_cnns: LocalCNNs,
        aggregator: Aggregator,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        n, k = local_cnns.decomposition.num_subdomains, local_cnns.num_classes
        if local_cnns.num_local_cnns != n and gather is None:
            raise ValueError("a CNN-DNN needs the local CNNs of all subdomains, or a gather of their probabilities")
        if (aggregator.num_subdomains, aggregator.num_classes) != (n, k):
            raise ValueError(
                f"aggregator for {aggregator.num_subdomains} subdomains and {aggregator.num_classes} classes "
                f"does not fit {n} local CNNs of {k} classes"
            )
        self.local_cnns, self.aggregator, self.gather = local_cnns, aggregator, gather
        # an aggregator of features: the local CNNs' classifier heads do not reach the output; they are not trained
        self.frozen = local_cnns.frozen_head() if aggregator.local_output == "features" else []

    @property
    def reads_features(self) -> bool:
        return self.aggregator.local_output == "features"

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """What the aggregator reads (its ``local_output``): the local CNNs' probabilities ``(B, N, K)``, their
        logits, or their pooled features ``(B, N, D)``. Gathered in model-parallel training."""
        if self.reads_features:
            features = self.local_cnns.forward_with_features(x, self.aggregator.input_dim)[1]
            local = features.to(torch.promote_types(features.dtype, torch.float32))  # as the logits, float32 at least
        else:
            local = _probabilities(self.local_cnns(x), self.aggregator.local_output)
        return local if self.gather is None else self.gather(local)

    def forward_with_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class scores ``(B, K)`` and the local probabilities ``(B, N, K)`` (the softmax of the local CNNs' logits),
        in one pass of the local CNNs, whatever the aggregator reads."""
        if not self.reads_features:
            local = self.forward_local(x)
            probabilities = local.softmax(-1) if self.aggregator.local_output == "logits" else local
            return self.aggregator(local), probabilities
        logits, features = self.local_cnns.forward_with_features(x, self.aggregator.input_dim)
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        probabilities = _probabilities(logits, "probabilities")
        if self.gather is not None:
            features, probabilities = self.gather(features), self.gather(probabilities)
        return self.aggregator(features), probabilities

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.forward_local(x))

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | Path | dict[str, Any],
        local_cnns: LocalCNNs,
        aggregator: Aggregator,
        *,
        with_aggregator: bool = False,
    ) -> CNNDNN:
        """A CNN-DNN of (freshly built) ``local_cnns`` and ``aggregator``, its local CNNs copied from a checkpoint.

        ``checkpoint`` (a path, or a loaded checkpoint, named in errors by its ``"path"`` entry if it has one) is
        one of the local phase or of a CNN-DNN; with
        ``with_aggregator`` the aggregator is copied too, from a CNN-DNN checkpoint with the same aggregator. See
        :func:`load_pretrained_local_cnns` and :func:`load_pretrained_aggregator` for what is checked.
        """
        state = load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
        source = str(checkpoint) if not isinstance(checkpoint, dict) else str(state.get("path", "(loaded)"))
        load_pretrained_local_cnns(state, local_cnns, source)
        if with_aggregator:
            load_pretrained_aggregator(state, aggregator, source)
        return cls(local_cnns, aggregator)


def _probabilities(logits: torch.Tensor, local_output: str) -> torch.Tensor:
    """The local CNNs' logits in float32 at least (autocast's bf16 is too coarse for probabilities), as
    probabilities unless ``local_output`` is logits."""
    local = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return local if local_output == "logits" else local.softmax(-1)


def load_pretrained_local_cnns(state: dict[str, Any], local_cnns: LocalCNNs, source: str) -> LocalCNNs:
    """Copy the local CNNs of checkpoint ``state`` (of the local phase, or of a CNN-DNN) into ``local_cnns``.

    Raises :class:`CheckpointMismatchError` naming ``source`` when the checkpoint's spec (:func:`spec_of`) has
    another backbone, width, grid, overlap, image shape, channels or number of classes, or when any parameter name
    or shape differs.
    """
    spec = spec_of(state, source)
    spec.check_compatible(ModelSpec.of(local_cnns), source, keys=LOCAL_CNNS_FIELDS)
    weights = state["model"] if spec.kind == "local_cnns" else _strip(state["model"], LOCAL_PREFIX)
    _check_compatible(local_cnns.state_dict(), weights, what=f"the local CNNs of {source}")
    local_cnns.load_state_dict(weights)
    return local_cnns


def load_pretrained_aggregator(state: dict[str, Any], aggregator: Aggregator, source: str) -> Aggregator:
    """Copy the aggregator of CNN-DNN checkpoint ``state`` into ``aggregator`` (same name, names and shapes)."""
    spec = spec_of(state, source)
    if spec.kind != "cnn_dnn":
        raise CheckpointMismatchError(
            f"checkpoint {source} holds no trained aggregator (it is a {spec.kind!r} checkpoint); pass a "
            "CNN-DNN checkpoint such as dnn.pt"
        )
    spec.check_compatible({"aggregator": aggregator.name}, source)
    reads = spec.aggregator_options.get("local_output", "probabilities")
    if reads != aggregator.local_output:  # the same weights, but trained on other numbers
        raise CheckpointMismatchError(
            f"checkpoint {source} has a {aggregator.name} aggregator that reads the local {reads}, but this run's "
            f"reads the local {aggregator.local_output}; use a checkpoint trained with --local-output "
            f"{aggregator.local_output} or change --local-output"
        )
    weights = _strip(state["model"], AGGREGATOR_PREFIX)
    _check_compatible(aggregator.state_dict(), weights, what=f"the {aggregator.name} aggregator of {source}")
    aggregator.load_state_dict(weights)
    return aggregator


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
