"""The processes of a run: who this one is (:class:`DistContext`, from the launcher's environment), joining and
leaving the process group, logging by rank, and the error a failed collective becomes."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import DistributedError
from ..runtime import resolve_device

log = logging.getLogger(__name__)

# (rank, world size, local rank), of torchrun and of tasks started by srun
_LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))
T = TypeVar("T")


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
            collective(self.rank, dist.barrier)

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
        for handler in {*logging.getLogger().handlers, *logging.getLogger("ddcnn").handlers}:
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


# -- collectives --------------------------------------------------------------------------------------------------


def collective(rank: int, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a ``torch.distributed`` collective; a failure becomes a :class:`DistributedError` of one line that says
    what to do.

    A process that dies (or a node that is lost) closes its connections, and gloo fails the collective on the others
    at once ("Connection closed by peer"); one that hangs makes them fail after the process group's timeout
    (``--dist-timeout``). ``tests/test_multinode.py`` kills a node in the middle of a run and checks this.
    """
    try:
        return operation(*args, **kwargs)
    except RuntimeError as e:
        raise lost_contact(rank, operation.__name__, e) from e


def lost_contact(rank: int, where: str, error: BaseException) -> DistributedError:
    """The error of a collective (in ``where``) that failed with ``error``: the one line of :func:`collective`."""
    return DistributedError(
        f"rank {rank} lost contact with the other processes in {where} ({_gist(error)}): another process probably "
        "died or hung (see its log, or torchrun's on its node); the job ends, run it again with --resume to "
        "continue from the last checkpoint"
    )


def _gist(error: BaseException, limit: int = 160) -> str:
    """A backend's error in a few words, for a one-line message: its first line without the ``[file.cc:123]``
    prefix of gloo's messages (nor the prefix that an error in a future's callback gets, as DDP's all-reduces
    raise them), up to the end of its first sentence, at most ``limit`` characters."""
    lines = str(error).strip().splitlines()
    text = re.sub(r"^Got the following error when running the callback: \w+: ", "", lines[0].strip() if lines else "")
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0].rstrip(".")
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
