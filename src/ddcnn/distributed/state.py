"""A training state held in shares, to and from the one a single process would hold.

A process of a model-parallel run holds only its subdomains' local CNNs, and its optimizer only their states. Its
checkpoints are gathered into the file one process training the whole model would write (:func:`gather_state`),
and any checkpoint is split again into each process's share when it is resumed (:func:`local_state`), so that any
checkpoint resumes on any number of processes. Both rely on one layout: every tensor of a local CNN is the dim-0
concatenation over subdomains (``models/layers.py``), and so are its optimizer states.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.local_cnns import LocalCNNs
from .process import collective

if TYPE_CHECKING:
    from .placement import Parallel

log = logging.getLogger(__name__)


def gather_state(
    parallel: Parallel, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """From each rank's trainer ``state`` (``model`` and ``optimizer`` entries of its share), the state one process
    training the whole model would hold, on rank 0 (None on the others). A collective: all ranks call it.

    Rank 0 concatenates the owners' blocks in subdomain order. Everything else is the same on all ranks and taken
    from rank 0."""
    ctx = parallel.ctx
    if not parallel.sharded:
        return state if ctx.is_primary else None
    keys, indices = _sharded_entries(model, optimizer)
    shards: dict[tuple[Any, ...], torch.Tensor] = {}
    if ctx.rank in parallel.owners:
        shards = {("model", k): state["model"][k].cpu() for k in keys}
        for i in indices:
            for name, value in state["optimizer"]["state"].get(i, {}).items():
                if value.dim() > 0:
                    shards["optimizer", i, name] = value.cpu()
    gathered: list[dict[tuple[Any, ...], torch.Tensor]] | None = None
    if ctx.is_primary:
        gathered = [{} for _ in range(ctx.world_size)]
    collective(ctx.rank, dist.gather_object, shards, gathered, dst=0)
    if gathered is None:
        return None
    blocks = [gathered[r] for r in parallel.owners]
    parallel.communication.add("checkpoint", sum(t.nbytes for block in blocks for t in block.values()))
    model_state = dict(state["model"])
    optimizer_state = {**state["optimizer"], "state": {i: dict(s) for i, s in state["optimizer"]["state"].items()}}
    for key in blocks[0]:
        whole = torch.cat([block[key] for block in blocks])
        if key[0] == "model":
            model_state[key[1]] = whole
        else:
            optimizer_state["state"][key[1]][key[2]] = whole
    return {**state, "model": model_state, "optimizer": optimizer_state}


def local_state(
    parallel: Parallel, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The inverse of :func:`gather_state`, without communication: this rank's share of a 1-process trainer state
    (read by every rank from the checkpoint).

    A checkpoint written in the middle of an epoch (by one process, on a signal) resumes at the same step, but its
    running sums of that epoch's training loss and accuracy are dropped: they cannot be split among ranks.
    """
    if parallel.ctx.distributed and state.get("partial"):
        log.warning("resuming from the middle of an epoch: its training loss and accuracy cover only its rest")
        state = {**state, "partial": {}}
    if not parallel.sharded:
        return state
    keys, indices = _sharded_entries(model, optimizer)

    def own_block(whole: torch.Tensor) -> torch.Tensor:
        """This rank's subdomains' rows of a tensor that concatenates all subdomains' along dim 0."""
        rows = whole.shape[0] // parallel.num_subdomains
        return whole.narrow(0, parallel.subdomains[0] * rows, len(parallel.subdomains) * rows).clone()

    model_state = {k: (own_block(v) if k in keys else v) for k, v in state["model"].items()}
    optimizer_state = {
        **state["optimizer"],
        "state": {
            i: {n: (own_block(v) if i in indices and v.dim() > 0 else v) for n, v in s.items()}
            for i, s in state["optimizer"]["state"].items()
        },
    }
    return {**state, "model": model_state, "optimizer": optimizer_state}


def sharded_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The name prefixes, in ``model``, of the :class:`LocalCNNs` that hold only some of the subdomains."""
    return tuple(
        f"{name}." if name else ""
        for name, module in model.named_modules()
        if isinstance(module, LocalCNNs) and module.is_share
    )


def _sharded_entries(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[set[str], set[int]]:
    """The ``model.state_dict()`` keys held in shares (the tensors of a :class:`LocalCNNs` holding only some
    subdomains), and the indices of their parameters in ``optimizer.state_dict()``."""
    prefixes = sharded_prefixes(model)
    keys = {k for k, v in model.state_dict().items() if v.dim() > 0 and k.startswith(prefixes)}
    names = {id(p): name for name, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return keys, {i for i, name in enumerate(ordered) if name in keys}
