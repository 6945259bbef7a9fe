"""Data parallelism through torch's ``DistributedDataParallel`` (DDP): the replicas of one model in a data-parallel
group (:func:`replicate`, :class:`Replicas`), the communication hook of their gradient all-reduce (``--ddp-hook``),
and the count of what the hooks send.

DDP puts the gradients into buckets (the first of 1 MiB, the others of up to 25 MiB, in the reverse order of the
parameters, reordered after the first step to the order backward produced them) and all-reduces each bucket as soon
as backward has produced all of its gradients, so that the communication overlaps the rest of backward. Every
bucket goes through a communication hook, wrapped here in one that counts its bytes (:class:`_Traffic`):

* ``none``: torch's ``allreduce_hook``, the average of the gradients as they are;
* ``fp16``: torch's ``fp16_compress_hook``, the bucket sent in float16 (2 bytes per gradient element) and the
  average cast back;
* ``powersgd``: torch's ``powerSGD_hook`` (Vogels et al., 2019): each gradient, viewed as an ``n x m`` matrix
  (``n`` its first dimension), is sent as two factors ``P`` (``n x r``) and ``Q`` (``m x r``) of a rank ``r =
  --powersgd-rank`` approximation where that is less than half of ``n * m`` (torch's ``min_compression_rate`` 2);
  the others (biases, norms, small matrices) are all-reduced as they are. Its defaults here: error feedback on (each
  rank adds what compression lost at the last step to its next gradient; PowerSGD is biased without it) and warm
  start on (the last step's ``Q`` starts the next power iteration), as in the paper; plain all-reduces for the first
  10% of a training's optimizer steps (:data:`POWERSGD_START_FRACTION`, torch's own advice for
  ``start_powerSGD_iter``: the first steps are the most sensitive to inexact gradients), and at least for the first
  2 steps of every process, as DDP requires (its buckets change after the first step).

PowerSGD's memory (the error feedback, the last ``Q``) is each rank's own and is kept in no checkpoint, which is the
one a single process writes: a run resumed with ``--ddp-hook powersgd`` starts it afresh (2 plain steps, then
compression, error feedback from zero), so it continues the training but not bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..scaling import powersgd_matrix
from .accounting import ddp_bytes_per_step
from .process import collective, lost_contact

if TYPE_CHECKING:
    from .placement import Parallel

log = logging.getLogger(__name__)

POWERSGD_START_FRACTION = 0.1  # of a training's optimizer steps, all-reduced as they are before PowerSGD starts
POWERSGD_MIN_START = 2  # DDP's buckets change after the first step; PowerSGD's memory needs them fixed
_warned: set[str] = set()  # the one-line warnings this process has given
# what the errors of a failed collective say (gloo's name its transport's source files), unlike those of computing
_COMMUNICATION = re.compile(r"gloo|nccl|connection|timed out|processgroup", re.IGNORECASE)


class Replicas:
    """This rank's replica of a model in its data-parallel group: :attr:`module` is what the training forward
    calls (the DDP wrapper of the model, or the model itself where nothing is averaged), and every micro-batch's
    forward and backward run in :meth:`micro_batch`."""

    def __init__(self, module: nn.Module, ddp: DistributedDataParallel | None = None, traffic: _Traffic | None = None):
        self.module, self.ddp, self.traffic = module, ddp, traffic

    def plan(self, total_steps: int, done_steps: int) -> None:
        """The training's ``total_steps`` optimizer steps, ``done_steps`` of them done before (a resumed run): where
        PowerSGD starts compressing (module docstring)."""
        if self.traffic is not None:
            self.traffic.plan(total_steps, done_steps)

    @contextlib.contextmanager
    def micro_batch(self, sync: bool) -> Iterator[None]:
        """The forward and backward of one micro-batch; its gradients are averaged over the group where ``sync`` (the
        last micro-batch of an optimizer step, ``--accumulate``), otherwise they only add up (DDP's ``no_sync``).
        A rank that is alone in its group while other groups average counts what their hooks send."""
        if self.ddp is None:
            yield
            if sync and self.traffic is not None:
                self.traffic.step_of_peers()
            return
        try:
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                yield
        except RuntimeError as e:  # a lost peer fails the all-reduce of a bucket, in backward
            if sync and (isinstance(e, dist.DistError) or _COMMUNICATION.search(str(e))):
                raise lost_contact(dist.get_rank(), "the gradient all-reduce", e) from e
            raise


def replicate(
    parallel: Parallel,
    model: nn.Module,
    parameters: Sequence[nn.Parameter],
    cfg: TrainConfig,
    desc: str | None = None,
) -> Replicas:
    """The :class:`Replicas` of ``model`` (this rank's share of it, per ``parallel``) whose ``parameters`` (the
    optimizer's) are trained with ``cfg``: DDP over this rank's data-parallel group where it has more than one
    rank (gloo on CPUs, nccl on GPUs; ``process_group`` the group's where it is not the world), with
    ``cfg.ddp_hook``. DDP registers only parameters that require a gradient (frozen ones are neither averaged nor
    counted), and here only the optimizer's. ``desc``, the training's name, for the warning that the hook has no
    effect (None: no warning, for trainings that are never placed on processes).

    Batch-norm running statistics: each replica keeps those of its own share of the batches during the epoch
    (DDP's ``broadcast_buffers``, which would overwrite them with the first rank's before every forward, is off),
    and :meth:`Parallel.sync_buffers` averages them before every evaluation and checkpoint. That keeps the
    statistics of all the group's images rather than one rank's, moves nothing per step, and is what ddcnn did
    before DDP, so data-parallel runs give the numbers they gave (docs/distributed.md).
    """
    trained = {id(p) for p in parameters}
    registered = [p for p in model.parameters() if p.requires_grad and id(p) in trained]
    if not parallel.averaging_groups or not registered:
        if cfg.ddp_hook != "none" and desc is not None and parallel.ctx.is_primary:
            where = "one process" if not parallel.ctx.distributed else str(parallel)
            _warn_once(f"--ddp-hook {cfg.ddp_hook} has no effect on {desc}: no gradients are averaged ({where})")
        return Replicas(model)
    if len(parallel.group) == 1:
        return Replicas(model, traffic=_Traffic(parallel, cfg, registered, sends=False))
    ignored = {name for name, p in model.named_parameters() if p.requires_grad and id(p) not in trained}
    if ignored:  # trainable, but not trained by this optimizer: not averaged either
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    device = parallel.ctx.device
    options, buffers_broadcast = _buffer_options()
    ddp = collective(
        parallel.ctx.rank,
        DistributedDataParallel,
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=parallel.process_group,
        find_unused_parameters=False,
        **options,
    )
    # DDP's construction broadcasts the parameters (and buffers) from the group's first rank, which holds the same
    # values already (every rank builds the model from the run's seed); its check of their shapes is not counted
    states = [p for name, p in model.named_parameters() if name not in ignored]
    states += list(model.buffers()) if buffers_broadcast else []
    parallel.communication.add("replicas", sum(t.nbytes for t in states) * parallel.averaging_groups)
    traffic = _Traffic(parallel, cfg, registered, sends=True)
    ddp.register_comm_hook(traffic, _HOOKS[cfg.ddp_hook])
    return Replicas(ddp, ddp, traffic)


class _Traffic:
    """The state of one model's counting hook (``sends``: this rank's DDP calls it) or, on a rank alone in its
    group, of the count of what the other groups' hooks send: the hook's own state, and what its buckets send,
    counted as ``gradients`` for the whole job (every data-parallel group sends as much: all local CNNs are alike,
    the convention of :class:`~ddcnn.distributed.Communication`)."""

    def __init__(self, parallel: Parallel, cfg: TrainConfig, parameters: list[nn.Parameter], sends: bool):
        self.communication, self.groups = parallel.communication, parallel.averaging_groups
        self.process_group = parallel.process_group  # None: the world
        self.hook, self.rank, self.parameters = cfg.ddp_hook, cfg.powersgd_rank, parameters
        self.powersgd: powersgd.PowerSGDState | None = None
        self.start, self.steps = POWERSGD_MIN_START, 0  # of a rank alone: PowerSGD's start and iteration
        if self.hook == "powersgd" and sends:
            self.powersgd = powersgd.PowerSGDState(
                self.process_group,
                matrix_approximation_rank=self.rank,
                start_powerSGD_iter=POWERSGD_MIN_START,
                min_compression_rate=2,
                use_error_feedback=True,
                warm_start=True,
            )

    def plan(self, total_steps: int, done_steps: int) -> None:
        start = max(POWERSGD_MIN_START, math.ceil(POWERSGD_START_FRACTION * total_steps) - done_steps)
        self.start = start
        if self.powersgd is not None:
            self.powersgd.start_powerSGD_iter = start

    def add(self, nbytes: int) -> None:
        self.communication.add("gradients", nbytes * self.groups)

    def step_of_peers(self) -> None:
        """On a rank alone in its group: count one optimizer step of the other groups' hooks, which send what
        :func:`~ddcnn.distributed.ddp_bytes_per_step` says of their replicas, alike to this rank's."""
        compressed = self.hook == "powersgd" and self.steps >= self.start
        self.add(ddp_bytes_per_step(self.parameters, self.hook, self.rank, compressed=compressed))
        self.steps += 1


# -- the hooks: torch's, each counting its bucket's bytes first --------------------------------------------------
# (no annotations: DDP compares them with dist.GradBucket, which a postponed annotation's string is not)


def _allreduce(traffic, bucket):
    traffic.add(bucket.buffer().nbytes)
    return default_hooks.allreduce_hook(traffic.process_group, bucket)


def _fp16(traffic, bucket):
    traffic.add(bucket.buffer().numel() * torch.finfo(torch.float16).bits // 8)
    return default_hooks.fp16_compress_hook(traffic.process_group, bucket)


def _powersgd(traffic, bucket):
    """PowerSGD's own count of what it sends (``total_numel_after_compression``: the factors, and the gradients it
    does not compress), in the bucket's dtype; its plain steps send the bucket. It sees the gradients as
    :func:`~ddcnn.scaling.powersgd_matrix` says (:class:`_Matrices`)."""
    state = traffic.powersgd
    if state.iter < state.start_powerSGD_iter:
        traffic.add(bucket.buffer().nbytes)
        return powersgd.powerSGD_hook(state, bucket)
    before = state.total_numel_after_compression
    future = powersgd.powerSGD_hook(state, _Matrices(bucket))
    traffic.add((state.total_numel_after_compression - before) * bucket.buffer().element_size())
    return future


class _Matrices:
    """A gradient bucket whose gradients PowerSGD views as :func:`~ddcnn.scaling.powersgd_matrix` says: without
    leading dimensions of size 1 (views of the bucket's buffer, so that what PowerSGD writes into them lands there).
    Without it, the global CNN's dense head ``(1, out, in)`` would be sent whole: 57% of vgg9's bytes at width 0.5."""

    def __init__(self, bucket):
        self._bucket = bucket

    def gradients(self) -> list[torch.Tensor]:
        return [
            g.view(powersgd_matrix(g.shape)) if g.dim() > 1 and g.shape[0] == 1 else g for g in self._bucket.gradients()
        ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)


_HOOKS = {"none": _allreduce, "fp16": _fp16, "powersgd": _powersgd}


def _buffer_options() -> tuple[dict[str, Any], bool]:
    """DDP's option that keeps each replica's buffers its own during training, and whether DDP then still
    broadcasts them at construction: ``forward_sync_buffers=False`` (torch 2.13 and later: it does) or, before,
    ``broadcast_buffers=False`` (it does not)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}, True
    return {"broadcast_buffers": False}, False


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("warning: %s", message)
