"""What moves between the processes: the bytes each kind of collective moved (:class:`Communication`), and the
volumes of the whole model that the comparisons quote (docs/distributed.md, "Communication")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..models.local_cnns import LocalCNNs


@dataclass
class Communication:
    """Bytes moved by collectives, by kind: ``subdomain_gather``, ``gradients``, ``gradient_norm``, ``buffers``,
    ``metrics``, ``checkpoint``.

    A collective's volume is the size of what it delivers (an all-gather: the gathered tensor, an all-reduce: the
    reduced tensor), whatever algorithm the backend uses; a ring all-reduce, for example, sends about twice that
    through each rank's link. Every rank counts the volume of the whole job (the averaging in all data-parallel
    groups; a checkpoint's gather only on rank 0, which receives it), so rank 0's log tells it. One process moves
    nothing.
    """

    bytes: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] += nbytes

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def sum_over_whole_model(model: nn.Module, value: Callable[[nn.Parameter], int]) -> int:
    """The sum of ``value(p)`` over the parameters of the whole model, where ``model`` may be one process's share
    of it: the local CNNs it lacks are counted as copies of those it holds (all local CNNs are alike)."""
    total = sum(value(p) for p in model.parameters())
    for module in model.modules():
        if isinstance(module, LocalCNNs) and module.is_share:
            share = sum(value(p) for p in module.parameters())
            total += share // module.num_local_cnns * (module.decomposition.num_subdomains - module.num_local_cnns)
    return total


def data_parallel_bytes_per_step(model: nn.Module) -> int:
    """What data-parallel training of ``model`` (the whole model, where it is one process's share) all-reduces every
    step: the bytes of its trainable parameters."""
    return sum_over_whole_model(model, lambda p: p.numel() * p.element_size() if p.requires_grad else 0)


def subdomain_gather_bytes_per_step(
    batch_size: int, num_subdomains: int, num_classes: int, element_size: int = 4
) -> int:
    """What model-parallel training of a CNN-DNN gathers every step: ``B*N*K`` probabilities of ``element_size``
    bytes (float32: 4; forward only, the backward moves nothing)."""
    return batch_size * num_subdomains * num_classes * element_size
