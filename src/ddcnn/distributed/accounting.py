"""What moves between the processes: the bytes each kind of collective moved (:class:`Communication`), and the
volumes of the whole model that the comparisons quote (docs/distributed.md, "Communication")."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from ..models.local_cnns import LocalCNNs
from ..scaling import powersgd_factor_sizes


@dataclass
class Communication:
    """Bytes moved by collectives, by kind: ``subdomain_gather``, ``gradients``, ``gradient_norm``, ``buffers``,
    ``metrics``, ``checkpoint``, ``replicas``.

    A collective's volume is the size of what it delivers (an all-gather: the gathered tensor, an all-reduce: the
    reduced tensor, a broadcast: the tensor), whatever algorithm the backend uses; a ring all-reduce, for example,
    sends about twice that through each rank's link. Every rank counts the volume of the whole job (the averaging in
    all data-parallel groups; a checkpoint's gather only on rank 0, which receives it), so rank 0's log tells it.
    One process moves nothing.

    ``gradients`` is what DDP's communication hook all-reduces (:mod:`ddcnn.distributed.ddp`), counted by the hook
    bucket by bucket as it sends it: the gradients as they are (``--ddp-hook none``), in float16 (``fp16``), or
    PowerSGD's factors and the gradients it leaves uncompressed (``powersgd``). A rank alone in its group, while
    other groups average, counts what their hooks send (:func:`ddp_bytes_per_step`). ``replicas``: DDP's broadcast
    of the parameters (and buffers) from each group's first rank when it wraps the model, once per training.
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


def ddp_bytes_per_step(
    parameters: Iterable[nn.Parameter], hook: str = "none", powersgd_rank: int = 2, compressed: bool = True
) -> int:
    """What DDP's gradient all-reduce of a replica with ``parameters`` sends per optimizer step, with the
    communication hook ``hook`` (``--ddp-hook``, see :mod:`ddcnn.distributed.ddp`): ``none``, the bytes of the
    gradients (those that require one); ``fp16``, 2 bytes per gradient element; ``powersgd``, where ``compressed``
    (after its first plain steps), per gradient the factors of its rank ``powersgd_rank`` approximation where they
    are less than half of it, else the gradient itself. The hooks count the same (``tests/test_distributed.py``)."""

    def sent(p: nn.Parameter) -> int:
        if hook == "fp16":
            return p.numel() * 2
        if hook == "powersgd" and compressed:
            return _powersgd_numel(p, powersgd_rank) * p.element_size()
        return p.numel() * p.element_size()

    return sum(sent(p) for p in parameters if p.requires_grad)


def _powersgd_numel(p: nn.Parameter, rank: int) -> int:
    """The numbers torch's ``powerSGD_hook`` sends of the gradient of ``p`` (:func:`ddcnn.scaling.powersgd_matrix`):
    its factors, or the gradient where they would not be less than half of it."""
    factors = powersgd_factor_sizes(p.shape, rank)
    return sum(factors) if factors is not None else p.numel()


def subdomain_gather_bytes_per_step(
    batch_size: int, num_subdomains: int, num_classes: int, element_size: int = 4
) -> int:
    """What model-parallel training of a CNN-DNN gathers every step: ``B*N*K`` probabilities of ``element_size``
    bytes (float32: 4; forward only, the backward moves nothing)."""
    return batch_size * num_subdomains * num_classes * element_size
