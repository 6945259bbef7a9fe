"""A model of the epoch time of data-parallel training (DDP) and of the CNN-DNN on P processes, to say where the
method's missing gradient communication pays: the α-β cost of each collective, DDP's buckets and their overlap with
backward, and the compute time of a step, which is measured, not modelled. Pure arithmetic: no torch, no processes.
``benchmarks/cluster.py`` checks it against an emulated cluster; docs/scaling.md explains it.

*Links.* Sending a message of ``m`` bytes costs ``alpha + m / beta`` (:class:`Link`): ``alpha`` seconds of latency
per message (wire, switch and the software stack), ``beta`` bytes/s of bandwidth of one process's link, each way.

*Collectives* are rings, as gloo's and nccl's all-reduce and all-gather of large messages are: an all-reduce of ``m``
bytes over P processes is a reduce-scatter and an all-gather of P chunks, 2(P-1) steps in each of which every process
sends ``m/P`` bytes to its neighbour while receiving as much from the other, so it sends ``2(P-1)/P * m`` bytes and
takes ``2(P-1) * alpha + 2(P-1)/P * m / beta`` (:func:`ring_allreduce_seconds`). An all-gather of ``m`` bytes in all
is half of that: ``(P-1) * alpha + (P-1)/P * m / beta``.

*DDP* all-reduces the gradients in buckets (:func:`buckets`): in the order backward produces them (taken as the
reverse order of the parameters), the first bucket closed once it holds 1 MiB, the others once they hold 25 MiB
(a bucket takes the tensor that crosses its cap), torch's defaults. A communication hook turns each bucket into
messages (:func:`hook_messages`): plain (one all-reduce), fp16 (one of half the bytes), PowerSGD (three: the
tensors it does not compress, then the factors P, then Q).

*Overlap* (:func:`ddp_step_seconds`): a bucket's all-reduce can start once backward has produced all its gradients,
and the buckets go through the link one after another. When a bucket is ready is modelled simply: backward produces
the gradient bytes at a constant rate, so a bucket is ready at ``forward + backward * (bytes up to its end) /
(all bytes)``. The step ends when both backward and the last bucket are done, then the optimizer steps. So the
communication left exposed lies between ``communication - backward`` and ``communication`` (never overlapped), and
a model whose gradients fit one bucket (vgg9 at width 0.5 has 0.97 MB) overlaps nothing.

*Compute* comes in measured (:class:`StepCompute`): the seconds of forward, backward and optimizer of one
process's step with no communication. A DDP step is synchronous, so it costs the slowest process's step time of
that step (:func:`expected_maximum` of the processes' measured step times); processes that wait for each other only
once an epoch pay the slowest one's mean.

*The CNN-DNN* (:func:`cnn_dnn_epoch_seconds`): its local phase trains each local CNN on its own subdomain, with no
communication while P <= N; a process holding ``ceil(N/P)`` of the N local CNNs does that share of the arithmetic
on every image of a step. With P > N each subdomain's local CNN is trained data parallel by a group of P/N
processes, which all-reduce that local CNN's gradients like DDP (within the group, over the same links). The
aggregation phase (:func:`aggregation_seconds`) then computes the local probabilities of the training images once,
gathers them (``B*N*K`` numbers per batch: all-gathers of the padded ``(B, ceil(N/P), K)`` shares), and trains the
aggregator on every process alike: its compute does not shrink with P.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FIRST_BUCKET_BYTES = 1024 * 1024  # DDP's first bucket (torch.distributed._DEFAULT_FIRST_BUCKET_BYTES)
BUCKET_BYTES = 25 * 1024 * 1024  # DDP's bucket_cap_mb=25
HOOKS = ("none", "fp16", "powersgd")


@dataclass(frozen=True)
class Link:
    """One process's link: ``alpha`` seconds per message, ``beta`` bytes/s each way (``math.inf``: free)."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if self.alpha < 0 or not self.beta > 0:
            raise ValueError(f"a link needs alpha >= 0 and beta > 0, got alpha={self.alpha}, beta={self.beta}")

    @classmethod
    def from_ratio(cls, flops_per_second: float, flops_per_byte: float, alpha: float = 0.0) -> Link:
        """The link of a process that computes ``flops_per_second`` and has ``flops_per_byte`` FLOPs of compute per
        byte of bandwidth (the compute-to-communication ratio of docs/scaling.md)."""
        return cls(alpha, flops_per_second / flops_per_byte)

    def seconds(self, messages: float, nbytes: float) -> float:
        return messages * self.alpha + nbytes / self.beta


def ring_allreduce_bytes(nbytes: float, processes: int) -> float:
    """Bytes each process sends (and receives) in a ring all-reduce of ``nbytes``: ``2(P-1)/P * nbytes``."""
    return 2 * (processes - 1) / processes * nbytes


def ring_allreduce_seconds(nbytes: float, processes: int, link: Link) -> float:
    """A ring all-reduce of ``nbytes``: ``2(P-1)`` steps of ``alpha`` plus the ring's bytes through the link."""
    if processes <= 1:
        return 0.0
    return link.seconds(2 * (processes - 1), ring_allreduce_bytes(nbytes, processes))


def ring_allgather_seconds(nbytes: float, processes: int, link: Link) -> float:
    """A ring all-gather whose result is ``nbytes`` (``nbytes / P`` from each process): ``P-1`` steps."""
    if processes <= 1:
        return 0.0
    return link.seconds(processes - 1, (processes - 1) / processes * nbytes)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def buckets(
    shapes: Sequence[Sequence[int]],
    element_size: int = 4,
    first_cap: int = FIRST_BUCKET_BYTES,
    cap: int = BUCKET_BYTES,
) -> list[list[int]]:
    """DDP's buckets of the gradients of parameters of ``shapes`` (in the model's order), as lists of indices into
    ``shapes``, in the order backward fills them: the parameters taken in reverse order; a bucket is closed once its
    bytes reach its cap (``first_cap`` for the first, ``cap`` for the others), with the tensor that reached it."""
    result: list[list[int]] = []
    current: list[int] = []
    size, limit = 0, first_cap
    for index in reversed(range(len(shapes))):
        current.append(index)
        size += numel(shapes[index]) * element_size
        if size >= limit:
            result.append(current)
            current, size, limit = [], 0, cap
    if current:
        result.append(current)
    return result


def powersgd_matrix(shape: Sequence[int]) -> tuple[int, int]:
    """The ``n x m`` matrix PowerSGD compresses a gradient of ``shape`` as: torch views a tensor as ``shape[0] x
    rest``; ddcnn's hook (:mod:`ddcnn.distributed.ddp`) first drops leading dimensions of size 1, so that the dense
    head of a global CNN, stored as one group ``(1, out, in)`` of a grouped linear layer, is the ``out x in`` matrix
    it is rather than an incompressible ``1 x (out * in)`` row."""
    shape = list(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    n = shape[0] if shape else 1
    return n, numel(shape) // max(n, 1)


def powersgd_factor_sizes(shape: Sequence[int], rank: int, min_compression_rate: float = 2.0) -> tuple[int, int] | None:
    """The elements of PowerSGD's factors ``(P, Q)`` of a gradient of ``shape`` (viewed as :func:`powersgd_matrix`),
    or None where it is sent uncompressed: torch's rule compresses only where ``(n + m) * r * min_compression_rate <
    n * m``, with ``r = min(n, m, rank)``."""
    n, m = powersgd_matrix(shape)
    r = min(n, m, rank)
    if (n + m) * r * min_compression_rate < n * m:
        return n * r, m * r
    return None


def hook_messages(
    shapes: Sequence[Sequence[int]], hook: str = "none", element_size: int = 4, powersgd_rank: int = 1
) -> list[int]:
    """The bytes of each all-reduce a communication hook makes of one bucket holding gradients of ``shapes``:
    ``none`` one of all the bytes; ``fp16`` one of 2 bytes per element; ``powersgd`` three, in order: the tensors it
    does not compress, the ``P`` factors, the ``Q`` factors (all in the gradients' own element size)."""
    total = sum(numel(s) for s in shapes)
    if hook == "none":
        return [total * element_size]
    if hook == "fp16":
        return [total * 2]
    if hook == "powersgd":
        plain = p = q = 0
        for shape in shapes:
            factors = powersgd_factor_sizes(shape, powersgd_rank)
            if factors is None:
                plain += numel(shape)
            else:
                p, q = p + factors[0], q + factors[1]
        return [plain * element_size, p * element_size, q * element_size]
    raise ValueError(f"unknown communication hook {hook!r}; choose from {', '.join(HOOKS)}")


@dataclass(frozen=True)
class Bucket:
    """One bucket of a DDP step: when it is ready (a fraction of backward) and the all-reduces it sends (bytes)."""

    ready: float
    messages: tuple[int, ...]


def ddp_buckets(
    shapes: Sequence[Sequence[int]],
    hook: str = "none",
    element_size: int = 4,
    powersgd_rank: int = 1,
    first_cap: int = FIRST_BUCKET_BYTES,
    cap: int = BUCKET_BYTES,
) -> list[Bucket]:
    """The :class:`Bucket` s of a DDP step of a model with parameters of ``shapes`` (module docstring)."""
    assignment = buckets(shapes, element_size, first_cap, cap)
    total = sum(numel(s) for s in shapes) or 1
    done, result = 0, []
    for indices in assignment:
        done += sum(numel(shapes[i]) for i in indices)
        messages = hook_messages([shapes[i] for i in indices], hook, element_size, powersgd_rank)
        result.append(Bucket(done / total, tuple(messages)))
    return result


@dataclass(frozen=True)
class StepCompute:
    """The compute of one training step of one process, in seconds (measured)."""

    forward: float
    backward: float
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.optimizer

    def scaled(self, factor: float) -> StepCompute:
        """The same step with ``factor`` times the arithmetic (another share of the batch or of the model)."""
        return StepCompute(self.forward * factor, self.backward * factor, self.optimizer)

    def scaled_to(self, total: float) -> StepCompute:
        """The same proportions of forward, backward and optimizer, ``total`` seconds in all."""
        factor = total / self.total if self.total > 0 else 0.0
        return StepCompute(self.forward * factor, self.backward * factor, self.optimizer * factor)


def expected_maximum(samples: Sequence[Sequence[float]]) -> float:
    """E[max_r X_r] of independent draws, one from each process's measured step times (exactly, from their
    empirical distributions): the compute of a synchronous step (DDP's), which ends when the slowest process is
    done, so that every process's jitter costs all of them. (Processes that wait for each other only at the end of
    an epoch, as the CNN-DNN's local phase, pay the slowest one's mean instead.)"""
    values = sorted({v for rank in samples for v in rank})
    expected, below = 0.0, 0.0
    for v in values:
        cdf = math.prod(sum(x <= v for x in rank) / len(rank) for rank in samples)
        expected, below = expected + v * (cdf - below), cdf
    return expected


def communication_seconds(step_buckets: Sequence[Bucket], processes: int, link: Link) -> float:
    """All the all-reduces of one step, one after another, with nothing overlapped."""
    return sum(ring_allreduce_seconds(m, processes, link) for b in step_buckets for m in b.messages)


def ddp_step_seconds(
    compute: StepCompute, step_buckets: Sequence[Bucket], processes: int, link: Link, overlap: bool = True
) -> float:
    """One DDP step: forward, backward with the buckets' all-reduces started as they become ready and run one
    after another (``overlap``; otherwise all of them after backward), then the optimizer."""
    if not overlap:
        return compute.total + communication_seconds(step_buckets, processes, link)
    end = 0.0
    for bucket in step_buckets:
        ready = compute.forward + compute.backward * bucket.ready
        end = max(end, ready) + sum(ring_allreduce_seconds(m, processes, link) for m in bucket.messages)
    return max(compute.forward + compute.backward, end) + compute.optimizer


def ddp_epoch_seconds(
    steps: int,
    compute: StepCompute,
    step_buckets: Sequence[Bucket],
    processes: int,
    link: Link,
    plain_steps: int = 0,
    plain_buckets: Sequence[Bucket] = (),
    overlap: bool = True,
    epoch_messages: int = 1,
) -> float:
    """An epoch of ``steps`` DDP steps, of which the first ``plain_steps`` send ``plain_buckets`` (PowerSGD's plain
    all-reduces before it starts compressing) and the others ``step_buckets``; ``epoch_messages``: the small
    all-reduces of every epoch (the logged loss and accuracy)."""
    plain_steps = min(plain_steps, steps)
    seconds = (steps - plain_steps) * ddp_step_seconds(compute, step_buckets, processes, link, overlap)
    if plain_steps:
        seconds += plain_steps * ddp_step_seconds(compute, plain_buckets, processes, link, overlap)
    return seconds + epoch_messages * ring_allreduce_seconds(16, processes, link)


def subdomains_per_process(num_subdomains: int, processes: int) -> int:
    """The most local CNNs one process holds (ddcnn's balanced blocks): ``ceil(N/P)``, 1 once P >= N."""
    return max(1, -(-num_subdomains // processes))


def group_size(num_subdomains: int, processes: int) -> int:
    """The smallest data-parallel group training one local CNN where P > N (``floor(P/N)``); 1 while P <= N."""
    return max(1, processes // num_subdomains)


def cnn_dnn_epoch_seconds(
    steps: int,
    compute: StepCompute,
    num_subdomains: int,
    processes: int,
    link: Link,
    local_buckets: Sequence[Bucket] = (),
    epoch_messages: int = 1,
    overlap: bool = True,
) -> float:
    """An epoch of the CNN-DNN's local phase on ``processes`` processes; ``compute`` is the step of a process that
    holds all N local CNNs and takes the whole batch (one process). A process holds ``ceil(N/P)`` of them (P <= N;
    with P > N one, on ``1/floor(P/N)`` of the batch, and its group all-reduces ``local_buckets``, one local CNN's).
    ``epoch_messages``: the few small all-reduces of every epoch over all processes (the logged loss and accuracy)."""
    if processes <= num_subdomains:
        share = subdomains_per_process(num_subdomains, processes) / num_subdomains
        step = compute.scaled(share).total
    else:
        group = group_size(num_subdomains, processes)
        step = ddp_step_seconds(compute.scaled(1 / num_subdomains / group), local_buckets, group, link, overlap)
    return steps * step + epoch_messages * ring_allreduce_seconds(8 * (1 + num_subdomains), processes, link)


def aggregation_seconds(
    images: int,
    num_subdomains: int,
    num_classes: int,
    processes: int,
    link: Link,
    probabilities_seconds: float,
    aggregator_seconds: float,
    batch: int = 512,
    element_size: int = 4,
) -> float:
    """The aggregation phase: the local probabilities of ``images`` training images (``probabilities_seconds`` on
    one process holding all local CNNs; a share of that on each), gathered in batches of ``batch`` as all-gathers of
    the padded ``(batch, ceil(N/P), K)`` shares of every process, then the aggregator trained on every process alike
    (``aggregator_seconds``, whatever P)."""
    held = subdomains_per_process(num_subdomains, processes)
    compute = probabilities_seconds * min(1.0, held / num_subdomains)
    full, rest = divmod(images, batch)
    gather = full * ring_allgather_seconds(batch * held * num_classes * element_size * processes, processes, link)
    if rest:
        gather += ring_allgather_seconds(rest * held * num_classes * element_size * processes, processes, link)
    return compute + gather + aggregator_seconds


def steps_per_epoch(images: int, global_batch: int) -> int:
    """Training steps of an epoch: whole batches, a last partial one dropped (ddcnn's loader)."""
    return max(1, images // global_batch)
