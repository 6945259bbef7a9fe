"""Distributed training: the processes, where the subdomains live among them, and what they communicate.

All of ddcnn's distributed code is in this module; nothing else reads the environment or calls
``torch.distributed``. See docs/distributed.md for the commands.

*Processes.* ``torchrun`` (or ``srun``) starts P processes, the *ranks*. :func:`init_distributed` reads their
environment into a :class:`DistContext` and joins the process group (gloo on CPU, nccl on GPU); a single process
(world size 1) needs no process group and runs the same code.

*Placement.* A :class:`Parallel` places the N subdomains of one decomposition on the ranks, in one of two modes:

* ``model``, the method's own parallelism: :func:`assign_subdomains` gives each rank a contiguous block of
  subdomains and the rank trains their local CNNs on whole batches, exactly as one process would. Where P > N, the
  ranks that hold the same subdomain form a data-parallel group: each takes an equal share of every batch and they
  average their gradients.
* ``data``, the baseline: every rank holds the whole model, takes a 1/P share of every batch, and the gradients of
  all parameters are averaged (an all-reduce of every parameter at every step).

*Communication*, counted by :class:`Communication` in the collectives below: none during the local phase (only a few
numbers per epoch for the logs, and the local CNNs once per checkpoint); ``B*N*K`` probabilities per step forward
for coherent training and transfer learning, and nothing backward (see :class:`_SubdomainGather`); ``N*K`` numbers
per image, once, for the aggregation phase; every parameter at every step in data parallelism. Gradient clipping
adds one number per step (the whole model's gradient norm).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, DistributedError
from .models.local_cnns import LocalCNNs
from .runtime import resolve_device

log = logging.getLogger("ddcnn")

MODES = ("model", "data")
# (rank, world size, local rank), of torchrun and of tasks started by srun
_LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
T = TypeVar("T")


# -- processes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Who this process is in a distributed run. ``backend`` is None where there is no process group."""

    rank: int = 0
    local_rank: int = 0  # rank on this node: picks the GPU
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_primary(self) -> bool:
        """Whether this process writes checkpoints, results and logs (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process has got here (after rank 0 wrote a file that the others read next)."""
        if self.distributed:
            _collective(self.rank, dist.barrier)

    @classmethod
    def from_env(cls, env: Mapping[str, str], device: str = "auto") -> DistContext:
        """The context described by launcher variables: torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, or
        else, for tasks started by ``srun``, ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` and ``SLURM_LOCALID``; with
        neither, one process. ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): a bare ``cuda`` (and ``auto`` on
        a machine with GPUs) becomes GPU ``LOCAL_RANK``. The backend is nccl on GPUs and gloo on CPUs."""
        rank, world_size, local_rank = 0, 1, 0
        names = next((names for names in _LAUNCHER_VARIABLES if names[0] in env and names[1] in env), None)
        if names is not None:
            try:
                rank, world_size, local_rank = (int(env[name]) for name in names)
            except (KeyError, ValueError):
                message = f"the launcher variables {', '.join(names)} must all be set, to integers"
                raise DistributedError(message) from None
            if not 0 <= rank < world_size or local_rank < 0:
                raise DistributedError(f"{names[0]}={rank} is not a rank of a world of {world_size} processes")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        resolved = resolve_device(device)
        if resolved.type == "cuda" and resolved.index is None:
            if local_rank >= torch.cuda.device_count():
                raise DistributedError(
                    f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} on this node); "
                    "start at most one process per GPU (--nproc-per-node)"
                )
            resolved = torch.device("cuda", local_rank)
        backend = None if world_size == 1 else "nccl" if resolved.type == "cuda" else "gloo"
        return cls(rank, local_rank, world_size, resolved, backend)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """This process's :class:`DistContext` from its environment; in a distributed run, join the process group.

    A collective that waits ``timeout_minutes`` for another process fails (:class:`DistributedError`), so that a
    hung process ends the job rather than block it forever. Configure logging first: on the other ranks than
    rank 0, the handlers then get a :class:`RankFilter`.
    """
    ctx = DistContext.from_env(os.environ, device)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    if ctx.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise DistributedError(
                "MASTER_ADDR and MASTER_PORT are not set: torchrun sets them; for tasks started by srun, export them "
                "in the batch script (docs/distributed.md)"
            )
        dist.init_process_group(
            ctx.backend,
            init_method="env://",
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not ctx.is_primary:
        rank_filter = RankFilter(ctx.rank)
        for handler in {*logging.getLogger().handlers, *log.handlers}:
            handler.addFilter(rank_filter)
    return ctx


@contextmanager
def distributed_session(device: str = "auto", timeout_minutes: float = 30.0) -> Iterator[DistContext]:
    """:func:`init_distributed`, and leave the process group at the end: after a barrier, when the block ended
    normally, so that no process tears its connections down while another still uses them (gloo aborts the
    process, "terminate called without an active exception", when a peer leaves mid-collective)."""
    ctx = init_distributed(device, timeout_minutes)
    try:
        yield ctx
        ctx.barrier()
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def primary_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (to fill a cache, say), the other ranks once it is done."""
    if not ctx.is_primary:
        ctx.barrier()
    yield
    if ctx.is_primary:
        ctx.barrier()


class RankFilter(logging.Filter):
    """For the handlers of a rank other than 0: drops records below WARNING and names the rank in the others, so that
    the job's log says each thing once."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


# -- placement --------------------------------------------------------------------------------------------------


def balanced_blocks(total: int, parts: int) -> list[range]:
    """``range(total)`` cut into ``parts`` contiguous blocks whose sizes differ by at most one: block ``j`` is
    ``[floor(j * total / parts), floor((j + 1) * total / parts))`` (the rule of the decomposition's cores)."""
    return [range(j * total // parts, (j + 1) * total // parts) for j in range(parts)]


def assign_subdomains(num_subdomains: int, world_size: int) -> list[tuple[int, ...]]:
    """The subdomains of each rank, in model parallelism.

    P <= N: rank ``r`` holds the contiguous block ``r`` of :func:`balanced_blocks` ``(N, P)``: ``floor(N/P)`` or
    ``ceil(N/P)`` subdomains. P > N: each rank holds one subdomain, and subdomain ``i`` is held by the ranks of block
    ``i`` of ``balanced_blocks(P, N)`` (``floor(P/N)`` or ``ceil(P/N)`` of them), which train it data parallel.
    """
    if num_subdomains < 1 or world_size < 1:
        raise ValueError(f"need at least one subdomain and one rank, got {num_subdomains} and {world_size}")
    if world_size <= num_subdomains:
        return [tuple(block) for block in balanced_blocks(num_subdomains, world_size)]
    return [(i,) for i, ranks in enumerate(balanced_blocks(world_size, num_subdomains)) for _ in ranks]


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


class Parallel:
    """The placement of the N subdomains of one decomposition on the ranks of ``ctx`` (``mode`` ``model`` or
    ``data``, see the module docstring), and the collectives of training on it.

    The training code asks it for: this rank's local CNNs (:meth:`local_cnns`) and its share of each batch
    (:attr:`shard`, :meth:`batch_size`); the subdomain gather of the CNN-DNN (:meth:`subdomain_gather`); the
    gradient and buffer averaging of data-parallel groups (:meth:`sync_gradients`, :meth:`sync_buffers`); the whole
    model's metrics (:meth:`reduce_metrics`); and the conversion between this rank's training state and a 1-process
    checkpoint (:meth:`gather_state`, :meth:`local_state`). With one process all of these are identities.
    """

    def __init__(self, ctx: DistContext, num_subdomains: int, mode: str = "model"):
        if mode not in MODES:
            raise ConfigError(f"parallel mode {mode!r} is not one of {', '.join(MODES)}")
        self.ctx, self.num_subdomains, self.mode = ctx, num_subdomains, mode
        if mode == "data":
            self.placement = [tuple(range(num_subdomains))] * ctx.world_size
        else:
            self.placement = assign_subdomains(num_subdomains, ctx.world_size)
        self.subdomains = self.placement[ctx.rank]
        self.group = self.group_of(ctx.rank)
        # the first rank of each group: the one whose copy of its subdomains is gathered, in subdomain order
        self.owners = sorted({self.placement.index(held) for held in self.placement})
        self.communication = Communication()
        self._process_group = self._new_groups()
        # data-parallel groups of more than one rank: each averages its gradients and buffers
        self._averaging_groups = sum(len(self.group_of(owner)) > 1 for owner in self.owners)

    def _new_groups(self) -> dist.ProcessGroup | None:
        """The process group of this rank's data-parallel group (None: the world, or no communication needed).
        Every rank creates every group, in the same order, as ``new_group`` requires."""
        mine = None
        for owner in self.owners:
            ranks = self.group_of(owner)
            if 1 < len(ranks) < self.ctx.world_size:
                created = dist.new_group(list(ranks))
                if self.ctx.rank in ranks:
                    mine = created
        return mine

    def group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks holding the same subdomains as ``rank`` (its data-parallel group)."""
        return tuple(r for r, held in enumerate(self.placement) if held == self.placement[rank])

    def __str__(self) -> str:
        """E.g. ``model parallel, 4 subdomains on 2 processes: rank 0: 0-1, rank 1: 2-3``."""
        ranks = ", ".join(
            f"rank {r}: {held[0]}" + (f"-{held[-1]}" if len(held) > 1 else "") for r, held in enumerate(self.placement)
        )
        return f"{self.mode} parallel, {self.num_subdomains} subdomains on {self.ctx.world_size} processes: {ranks}"

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only some of the subdomains."""
        return len(self.subdomains) < self.num_subdomains

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world)`` of this rank's share of each training batch, within its data-parallel group."""
        return self.group.index(self.ctx.rank), len(self.group)

    def batch_size(self, batch_size: int) -> int:
        """This rank's share of a batch of ``batch_size`` images (the batch size is that of the whole job)."""
        share = len(self.group)
        if batch_size % share:
            raise ConfigError(
                f"batch size {batch_size} cannot be split evenly among the {share} processes that share each batch; "
                f"use a multiple of {share}"
            )
        return batch_size // share

    # models -------------------------------------------------------------------------------------------------------
    def local_cnns(self, local_cnns: LocalCNNs) -> LocalCNNs:
        """This rank's share of (all) ``local_cnns``: a copy of its subdomains' local CNNs, or ``local_cnns``
        itself where it holds them all."""
        return local_cnns.subset(self.subdomains) if self.sharded else local_cnns

    def subdomain_gather(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For a model that needs every subdomain's output on every rank (the CNN-DNN): the differentiable map
        from this rank's outputs ``(B, n, ...)`` to all subdomains' ``(B, N, ...)``; None where it holds them all."""
        if not self.sharded:
            return None
        if len(self.group) > 1:
            raise ConfigError(
                f"a CNN-DNN trained model parallel needs at most one process per subdomain ({self.num_subdomains}), "
                f"got {self.ctx.world_size} processes; use --parallel data or fewer processes"
            )
        return self.gather

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """All subdomains' ``(B, N, ...)`` from this rank's ``(B, n, ...)``, differentiably (see
        :class:`_SubdomainGather`); itself where this rank holds every subdomain."""
        return _SubdomainGather.apply(local, self) if self.sharded else local

    def _all_gather_subdomains(self, local: torch.Tensor) -> torch.Tensor:
        """All-gather of every rank's subdomains along dim 1. Ranks with fewer subdomains pad to the most that
        any rank holds (a gloo all-gather needs equal sizes); the padding is counted, it is sent."""
        width = max(len(held) for held in self.placement)
        padded = local.new_zeros(local.shape[0], width, *local.shape[2:], device=self.ctx.device)
        padded[:, : local.shape[1]] = local
        parts = [torch.empty_like(padded) for _ in range(self.ctx.world_size)]
        _collective(self.ctx.rank, dist.all_gather, parts, padded)
        self.communication.add("subdomain_gather", padded.nbytes * self.ctx.world_size)
        whole = torch.cat([parts[r][:, : len(self.placement[r])] for r in self.owners], dim=1)
        return whole.to(local.device)

    # training -----------------------------------------------------------------------------------------------------
    def sync_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Average the gradients over this rank's data-parallel group (after backward); nothing where the group is
        this rank alone."""
        params = [p for p in parameters if p.requires_grad]
        self._count_averaging("gradients", params)
        if len(self.group) == 1:
            return
        for p in params:
            if p.grad is None:  # unused in this step: a zero gradient, as on the other ranks
                p.grad = torch.zeros_like(p)
        self._average([p.grad for p in params])

    def sync_buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers (batch-norm running statistics) over this rank's data-parallel group,
        so that its copies of the model agree before they are evaluated or saved."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        self._count_averaging("buffers", buffers)
        if len(self.group) > 1 and buffers:
            self._average(buffers)

    def _count_averaging(self, kind: str, tensors: list[torch.Tensor]) -> None:
        """Count an averaging of (tensors like) ``tensors`` for the whole job: every data-parallel group of more than
        one rank averages as much, since all local CNNs are alike (also where this rank's group is itself alone)."""
        self.communication.add(kind, sum(t.numel() * t.element_size() for t in tensors) * self._averaging_groups)

    def _average(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over this rank's data-parallel group, in place: one all-reduce of them flattened."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        _collective(self.ctx.rank, dist.all_reduce, flat, group=self._process_group)
        flat /= len(self.group)
        for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(value.view_as(t))

    def clip_grad_norm_(self, model: nn.Module, parameters: Sequence[nn.Parameter], max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` by the norm of the whole model's gradient, the one a single process
        clips by: the ranks' squared norms summed, a parameter held by c ranks counted 1/c on each (after
        :meth:`sync_gradients`, its c copies are equal). One all-reduce of a number."""
        if not self.ctx.distributed:
            nn.utils.clip_grad_norm_(parameters, max_norm)
            return
        prefixes = _sharded_prefixes(model)
        sharded = {id(p) for name, p in model.named_parameters() if name.startswith(prefixes)}
        grads = [(p.grad, id(p) in sharded) for p in parameters if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for grad, in_shares in grads:
            squares += grad.double().pow(2).sum() / (len(self.group) if in_shares else self.ctx.world_size)
        self._all_reduce(squares, "gradient_norm")
        scale = max_norm / (float(squares.sqrt()) + 1e-6)
        if scale < 1:
            for grad, _ in grads:
                grad.mul_(scale)

    def reduce_metrics(self, loss: float, accuracy: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The whole model's loss and accuracy from this rank's, on training shards or on whole splits alike.

        For outputs per subdomain (``accuracy`` a vector over this rank's subdomains) the loss is the sum over the
        subdomains, each subdomain's numbers the mean over the ranks of its group. For whole-image outputs
        (``accuracy`` a scalar) both are the mean over the ranks, which hold the same numbers (model parallel) or
        equal shares of the images (data parallel)."""
        if not self.ctx.distributed:
            return loss, accuracy
        if accuracy.dim() == 0:
            values = torch.tensor([loss, float(accuracy)], dtype=torch.float64) / self.ctx.world_size
        else:
            values = torch.zeros(1 + self.num_subdomains, dtype=torch.float64)
            values[0] = loss
            values[1 + self.subdomains[0] : 1 + self.subdomains[-1] + 1] = accuracy.double()
            values /= len(self.group)
        values = self._all_reduce(values.to(self.ctx.device), "metrics").cpu()
        return float(values[0]), (values[1] if accuracy.dim() == 0 else values[1:]).float()

    # checkpoints --------------------------------------------------------------------------------------------------
    def gather_state(
        self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """From each rank's trainer ``state`` (``model`` and ``optimizer`` entries of its share), the state one
        process training the whole model would hold, on rank 0 (None on the others). A collective: all ranks call it.

        Every tensor of a local CNN is the dim-0 concatenation over subdomains (``models/layers.py``), and so are
        their optimizer states; rank 0 concatenates the owners' blocks in subdomain order. Everything else is the
        same on all ranks and taken from rank 0."""
        if not self.sharded:
            return state if self.ctx.is_primary else None
        keys, indices = _sharded_entries(model, optimizer)
        shards: dict[tuple[Any, ...], torch.Tensor] = {}
        if self.ctx.rank in self.owners:
            shards = {("model", k): state["model"][k].cpu() for k in keys}
            for i in indices:
                for name, value in state["optimizer"]["state"].get(i, {}).items():
                    if value.dim() > 0:
                        shards["optimizer", i, name] = value.cpu()
        gathered: list[dict[tuple[Any, ...], torch.Tensor]] | None = None
        if self.ctx.is_primary:
            gathered = [{} for _ in range(self.ctx.world_size)]
        _collective(self.ctx.rank, dist.gather_object, shards, gathered, dst=0)
        if gathered is None:
            return None
        blocks = [gathered[r] for r in self.owners]
        self.communication.add("checkpoint", sum(t.nbytes for block in blocks for t in block.values()))
        model_state = dict(state["model"])
        optimizer_state = {**state["optimizer"], "state": {i: dict(s) for i, s in state["optimizer"]["state"].items()}}
        for key in blocks[0]:
            whole = torch.cat([block[key] for block in blocks])
            if key[0] == "model":
                model_state[key[1]] = whole
            else:
                optimizer_state["state"][key[1]][key[2]] = whole
        return {**state, "model": model_state, "optimizer": optimizer_state}

    def local_state(self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The inverse of :meth:`gather_state`, without communication: this rank's share of a 1-process trainer
        state (read by every rank from the checkpoint).

        A checkpoint written in the middle of an epoch (by one process, on a signal) resumes at the same step, but
        its running sums of that epoch's training loss and accuracy are dropped: they cannot be split among ranks.
        """
        if self.ctx.distributed and state.get("partial"):
            log.warning("resuming from the middle of an epoch: its training loss and accuracy cover only its rest")
            state = {**state, "partial": {}}
        if not self.sharded:
            return state
        keys, indices = _sharded_entries(model, optimizer)
        model_state = {k: (self._own_block(v) if k in keys else v) for k, v in state["model"].items()}
        optimizer_state = {
            **state["optimizer"],
            "state": {
                i: {n: (self._own_block(v) if i in indices and v.dim() > 0 else v) for n, v in s.items()}
                for i, s in state["optimizer"]["state"].items()
            },
        }
        return {**state, "model": model_state, "optimizer": optimizer_state}

    def _own_block(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's subdomains' rows of a tensor that concatenates all subdomains' along dim 0."""
        rows = whole.shape[0] // self.num_subdomains
        return whole.narrow(0, self.subdomains[0] * rows, len(self.subdomains) * rows).clone()

    # collectives --------------------------------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place."""
        _collective(self.ctx.rank, dist.all_reduce, tensor)
        self.communication.add(kind, tensor.nbytes)
        return tensor


def _collective(rank: int, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a ``torch.distributed`` collective; a failure becomes a :class:`DistributedError` of one line that says
    what to do.

    A process that dies (or a node that is lost) closes its connections, and gloo fails the collective on the others
    at once ("Connection closed by peer"); one that hangs makes them fail after the process group's timeout
    (``--dist-timeout``). ``tests/test_multinode.py`` kills a node in the middle of a run and checks this.
    """
    try:
        return operation(*args, **kwargs)
    except RuntimeError as e:
        raise DistributedError(
            f"rank {rank} lost contact with the other processes in {operation.__name__} ({_gist(e)}): "
            "another process probably died or hung (see its log, or torchrun's on its node); the job ends, "
            "run it again with --resume to continue from the last checkpoint"
        ) from e


def _gist(error: BaseException, limit: int = 160) -> str:
    """A backend's error in a few words, for a one-line message: its first line without the ``[file.cc:123]``
    prefix of gloo's messages, up to the end of its first sentence, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0].strip() if lines else "").split(". ")[0].rstrip(".")
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _SubdomainGather(torch.autograd.Function):
    """All-gather along the subdomain axis; backward: this rank's slice of the gradient, with no communication.

    Every rank applies the same function (the replicated aggregator, same weights, same dropout masks) to the same
    gathered tensor, so every rank already holds the whole gradient and keeps its own subdomains' part, as
    Megatron-LM's gather from the model-parallel region does. (``torch.distributed.nn.functional.all_gather`` would
    instead reduce-scatter the P identical gradients: P times the true gradient, for ``B*N*K`` more floats.)
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, parallel: Parallel) -> torch.Tensor:
        ctx.parallel = parallel
        return parallel._all_gather_subdomains(local)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        held = ctx.parallel.subdomains
        return grad.narrow(1, held[0], len(held)), None


def _sharded_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The name prefixes, in ``model``, of the :class:`LocalCNNs` that hold only some of the subdomains."""
    return tuple(
        f"{name}." if name else ""
        for name, module in model.named_modules()
        if isinstance(module, LocalCNNs) and module.num_subdomains < module.decomposition.num_subdomains
    )


def _sharded_entries(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[set[str], set[int]]:
    """The ``model.state_dict()`` keys held in shares (the tensors of a :class:`LocalCNNs` holding only some
    subdomains), and the indices of their parameters in ``optimizer.state_dict()``."""
    prefixes = _sharded_prefixes(model)
    keys = {k for k, v in model.state_dict().items() if v.dim() > 0 and k.startswith(prefixes)}
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return keys, {i for i, name in enumerate(ordered) if name in keys}


# -- sizes of the whole model, and communication volumes for comparisons --------------------------------------


def sum_over_whole_model(model: nn.Module, value: Callable[[nn.Parameter], int]) -> int:
    """The sum of ``value(p)`` over the parameters of the whole model, where ``model`` may be one process's share
    of it: the local CNNs it lacks are counted as copies of those it holds (all local CNNs are alike)."""
    total = sum(value(p) for p in model.parameters())
    for module in model.modules():
        if isinstance(module, LocalCNNs) and module.num_subdomains < module.decomposition.num_subdomains:
            share = sum(value(p) for p in module.parameters())
            total += share // module.num_subdomains * (module.decomposition.num_subdomains - module.num_subdomains)
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
