"""Where the subdomains live: the placement of the N subdomains of one decomposition on the ranks
(:func:`assign_subdomains`, :class:`Parallel`), and the collectives of training on that placement. A coarse level
(:mod:`ddcnn.decomposition`) is subdomain N of N + 1, placed as any other: the last rank's block ends with it (its
subimage has the subimage shape, so it costs a rank what a grid subdomain costs, but its loader reads the whole
images, :mod:`ddcnn.data.subimages`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError
from ..models.local_cnns import LocalCNNs
from . import ddp as _ddp
from . import state as _state
from .accounting import Communication
from .process import DistContext, collective

MODES = ("model", "data")


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


class Parallel:
    """The placement of the N subdomains of one decomposition on the ranks of ``ctx`` (``mode`` ``model`` or
    ``data``, see the package docstring), and the collectives of training on it.

    The training code asks it for: this rank's local CNNs (:meth:`local_cnns`) and its share of each batch
    (:attr:`shard`, :meth:`batch_size`); the subdomain gather of the CNN-DNN (:meth:`subdomain_gather`); the
    gradient and buffer averaging of data-parallel groups (:meth:`replicate`, DDP; :meth:`sync_buffers`); the whole
    model's metrics (:meth:`reduce_metrics`); and the conversion between this rank's training state and a 1-process
    checkpoint (:meth:`gather_state`, :meth:`local_state`). With one process all of these are identities, so the
    training code calls them unconditionally (:meth:`single` is the placement of a run of one process).
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
        # this rank's data-parallel group's process group (None: the world, or a group of this rank alone)
        self.process_group = self._new_groups()
        # data-parallel groups of more than one rank: each averages its gradients and buffers
        self.averaging_groups = sum(len(self.group_of(owner)) > 1 for owner in self.owners)

    @classmethod
    def single(cls, num_subdomains: int = 1, device: torch.device | str = "cpu") -> Parallel:
        """The placement of a run of one process on ``device``: it holds every subdomain, takes whole batches, and
        every collective is an identity that moves nothing (no process group is needed)."""
        return cls(DistContext(device=torch.device(device)), num_subdomains)

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
        collective(self.ctx.rank, dist.all_gather, parts, padded)
        self.communication.add("subdomain_gather", padded.nbytes * self.ctx.world_size)
        whole = torch.cat([parts[r][:, : len(self.placement[r])] for r in self.owners], dim=1)
        return whole.to(local.device)

    # training -----------------------------------------------------------------------------------------------------
    def replicate(
        self, model: nn.Module, parameters: Sequence[nn.Parameter], cfg: TrainConfig, desc: str | None = None
    ) -> _ddp.Replicas:
        """This rank's replica of ``model`` (its share) in its data-parallel group, whose gradients of
        ``parameters`` are averaged over the group by DDP with ``cfg.ddp_hook``; the model itself where the group is
        this rank alone. A collective where DDP wraps the model: all ranks call it. See
        :func:`ddcnn.distributed.ddp.replicate`."""
        return _ddp.replicate(self, model, parameters, cfg, desc)

    def sync_buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers (batch-norm running statistics) over this rank's data-parallel group,
        so that its copies of the model agree before they are evaluated or saved. During training each copy keeps
        the statistics of its own share of the batches (DDP does not broadcast them, see :meth:`replicate`)."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        self._count_averaging("buffers", buffers)
        if len(self.group) > 1 and buffers:
            self._average(buffers)

    def _count_averaging(self, kind: str, tensors: list[torch.Tensor]) -> None:
        """Count an averaging of (tensors like) ``tensors`` for the whole job: every data-parallel group of more than
        one rank averages as much, since all local CNNs are alike (also where this rank's group is itself alone)."""
        self.communication.add(kind, sum(t.numel() * t.element_size() for t in tensors) * self.averaging_groups)

    def _average(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over this rank's data-parallel group, in place: one all-reduce of them flattened."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        collective(self.ctx.rank, dist.all_reduce, flat, group=self.process_group)
        flat /= len(self.group)
        for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(value.view_as(t))

    def clip_grad_norm_(self, model: nn.Module, parameters: Sequence[nn.Parameter], max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` by the norm of the whole model's gradient, the one a single process
        clips by: the ranks' squared norms summed, a parameter held by c ranks counted 1/c on each (after DDP's
        averaging, its c copies are equal, whatever the hook). One all-reduce of a number."""
        if not self.ctx.distributed:
            nn.utils.clip_grad_norm_(parameters, max_norm)
            return
        prefixes = _state.sharded_prefixes(model)
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
        """From each rank's trainer ``state`` (of its share), the state one process training the whole model would
        hold, on rank 0 (None on the others); ``state`` itself with one process. A collective: all ranks call it.
        See :func:`ddcnn.distributed.state.gather_state`."""
        return _state.gather_state(self, state, model, optimizer)

    def local_state(self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The inverse of :meth:`gather_state`, without communication: this rank's share of a 1-process trainer
        state; ``state`` itself with one process. See :func:`ddcnn.distributed.state.local_state`."""
        return _state.local_state(self, state, model, optimizer)

    # collectives --------------------------------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place."""
        collective(self.ctx.rank, dist.all_reduce, tensor)
        self.communication.add(kind, tensor.nbytes)
        return tensor


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
