"""Distributed training: the processes, where the subdomains live among them, and what they communicate.

All of ddcnn's distributed code is in this package; nothing else reads the environment or calls
``torch.distributed``. See docs/distributed.md for the commands. Its modules: ``process`` (the processes and the
collectives' error handling), ``placement`` (the subdomains on the ranks, :class:`Parallel`), ``ddp`` (the
data-parallel groups' training through torch's ``DistributedDataParallel`` and its communication hooks), ``state``
(a sharded training state to and from a 1-process checkpoint) and ``accounting`` (bytes moved, and the volumes of
the whole model that comparisons quote).

*Processes.* ``torchrun`` (or ``srun``) starts P processes, the *ranks*. :func:`init_distributed` reads their
environment into a :class:`DistContext` and joins the process group (gloo on CPU, nccl on GPU); a single process
(world size 1) needs no process group and runs the same code: :meth:`Parallel.single` is the placement of one
process, on which every collective is an identity, and the training loop gets one when it is given none.

*Placement.* A :class:`Parallel` places the N subdomains of one decomposition on the ranks, in one of two modes:

* ``model``, the method's own parallelism: :func:`assign_subdomains` gives each rank a contiguous block of
  subdomains and the rank trains their local CNNs on whole batches, exactly as one process would. Where P > N, the
  ranks that hold the same subdomain form a data-parallel group: each takes an equal share of every batch and they
  average their gradients (DDP, ``ddp``).
* ``data``, the baseline: every rank holds the whole model, takes a 1/P share of every batch, and the gradients of
  all parameters are averaged by DDP (an all-reduce of every parameter at every step, in buckets overlapped with
  backward; fewer bytes with the ``fp16`` or ``powersgd`` hook).

*Communication*, counted by :class:`Communication` in the collectives of :class:`Parallel`: none during the local
phase (only a few numbers per epoch for the logs, and the local CNNs once per checkpoint); ``B*N*K`` probabilities
per step forward for coherent training and transfer learning, and nothing backward (see ``placement.
_SubdomainGather``); ``N*K`` numbers per image, once, for the aggregation phase; every parameter at every step in
data parallelism (what DDP's hook sends, counted by the hook). Gradient clipping adds one number per step (the whole model's gradient norm).
"""

from .accounting import (
    Communication,
    data_parallel_bytes_per_step,
    ddp_bytes_per_step,
    subdomain_gather_bytes_per_step,
    sum_over_whole_model,
)
from .placement import MODES, Parallel, assign_subdomains, balanced_blocks
from .process import DistContext, RankFilter, distributed_session, init_distributed, primary_first

__all__ = [
    "MODES",
    "Communication",
    "DistContext",
    "Parallel",
    "RankFilter",
    "assign_subdomains",
    "balanced_blocks",
    "data_parallel_bytes_per_step",
    "ddp_bytes_per_step",
    "distributed_session",
    "init_distributed",
    "primary_first",
    "subdomain_gather_bytes_per_step",
    "sum_over_whole_model",
]
