"""The cluster benchmark's probe (``cluster.py``), run under one ``torchrun`` agent per emulated node: what the α-β
model (``ddcnn.scaling``) takes as measured inputs.

    python -m torch.distributed.run ... benchmarks/cluster_probe.py SPEC.json

``SPEC.json``: ``output`` (rank 0 writes JSON there), and

* ``sizes`` (bytes): the seconds of a gloo all-reduce of float32 tensors of each size over all processes (median of
  several, after one untimed), from which the benchmark fits α and β of the links as they are shaped;
* ``models`` (each ``{"label", "grid", "batch", "hook", "width"}``): the compute of one training step of this
  process's share, with every process stepping at the same time (so that K processes on fewer cores share them as in
  training) and no communication: the global CNN is wrapped in DDP over a process group of this process alone, so
  that DDP's own work and the hook's compression are timed while its all-reduce moves nothing; the local CNNs are
  this rank's share (ddcnn's placement), as the local phase trains them. Forward, backward and optimizer step are
  timed apart (median over 2 s of steps). The benchmark measures it at every rate, next to the sweep, so that the model
  of each point uses the compute measured minutes before it (a shared machine's load drifts).

Also reports the address of each rank's interface: the benchmark checks that rank ``i`` runs on node ``i``.
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import CIFAR_SHAPE, NUM_CLASSES, Settings, synthetic_batch, train_config
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

from ddcnn.decomposition import Decomposition
from ddcnn.distributed.placement import assign_subdomains
from ddcnn.models import LocalCNNs
from ddcnn.train.evaluation import classification_loss
from ddcnn.train.optim import build_optimizer

WARMUP, MIN_STEPS, SECONDS = 3, 5, 2.0


def sweep(sizes: list[int], seconds_per_size: float = 1.0) -> list[dict[str, float]]:
    """The median seconds of an all-reduce of each size in ``sizes`` (bytes), over the world."""
    rows = []
    for nbytes in sizes:
        tensor = torch.ones(max(1, nbytes // 4))
        start = time.perf_counter()
        dist.all_reduce(tensor)  # untimed (connections, allocation), but it sets how often to repeat
        # every rank must run as many all-reduces: the count comes from the slowest rank's first one
        first = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(first, op=dist.ReduceOp.MAX)
        repeats = int(min(25, max(3, seconds_per_size / max(float(first), 1e-6))))
        times: list[float] = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        # every rank's median; the slowest is the collective's
        median = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
        rows.append({"bytes": tensor.nbytes, "seconds": float(median), "repeats": len(times)})
    return rows


def _hook(name: str, group: dist.ProcessGroup, rank: int) -> tuple[Any, Any]:
    """The state and hook of torch's DDP communication hook ``name``, as ``ddcnn.distributed.ddp`` sets it up, but
    compressing from the third step on (the probe times compressed steps)."""
    if name == "none":
        return group, default_hooks.allreduce_hook
    if name == "fp16":
        return group, default_hooks.fp16_compress_hook
    state = powersgd.PowerSGDState(
        group,
        matrix_approximation_rank=rank,
        start_powerSGD_iter=2,
        min_compression_rate=2,
        use_error_feedback=True,
        warm_start=True,
    )
    return state, powersgd.powerSGD_hook


def time_steps(
    model: torch.nn.Module, batch: int, params: list[torch.nn.Parameter], seconds: float = SECONDS
) -> dict[str, float]:
    """Median seconds of forward, backward and optimizer step of ``model`` on batches of ``batch`` images, and
    every step's total (``totals``), over
    ``seconds`` of steps that every process takes at the same time (a fixed window rather than a fixed count of
    steps: a process that finished early would leave the cores to the others, and they would measure less
    contention than training has)."""
    x, y = synthetic_batch(Settings(), batch)
    optimizer = build_optimizer([(f"p{i}", p) for i, p in enumerate(params)], train_config())
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def step() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = classification_loss(model(x), y)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for _ in range(WARMUP):
        step()
    dist.barrier()  # every process steps in the same window
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(parts["forward"]) < MIN_STEPS:
        for name, value in zip(parts, step()):
            parts[name].append(value)
    totals = [sum(step) for step in zip(*parts.values())]
    return {**{name: statistics.median(values) for name, values in parts.items()}, "totals": totals}


def compute(models: list[dict[str, Any]], powersgd_rank: int) -> list[dict[str, Any]]:
    """The compute of a step of each of ``models`` on this rank (module docstring); every rank's, per model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group, in order
    rows = []
    for spec in models:
        grid = tuple(spec["grid"])
        torch.manual_seed(0)
        local_cnns = LocalCNNs("vgg9", Decomposition(grid, CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES, spec["width"])
        if grid == (1, 1):
            state, hook = _hook(spec["hook"], alone, powersgd_rank)
            model: torch.nn.Module = DistributedDataParallel(local_cnns, process_group=alone, **_buffer_option())
            model.register_comm_hook(state, hook)
            params = list(local_cnns.parameters())
        else:
            held = assign_subdomains(local_cnns.decomposition.num_subdomains, world)[rank]
            model = local_cnns.subset(held) if len(held) < local_cnns.decomposition.num_subdomains else local_cnns
            params = list(model.parameters())
        times = time_steps(model, spec["batch"], params)
        gathered: list[dict[str, float]] = [{} for _ in range(world)]
        dist.all_gather_object(gathered, times)
        rows.append({**spec, "ranks": gathered})
    return rows


def _buffer_option() -> dict[str, bool]:
    """Each replica keeps its own batch-norm statistics during training, as ``ddcnn.distributed.ddp`` sets DDP up."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _address(interface: str) -> str:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface.encode()[:15]))  # SIOCGIFADDR
    return socket.inet_ntoa(packed[20:24])


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        addresses: list[str] = ["" for _ in range(dist.get_world_size())]
        dist.all_gather_object(addresses, _address(os.environ["GLOO_SOCKET_IFNAME"]))
        swept = sweep(spec["sizes"])
        computed = compute(spec["models"], spec["powersgd_rank"])
        if dist.get_rank() == 0:
            output = {"sweep": swept, "compute": computed, "addresses": addresses, "world_size": dist.get_world_size()}
            Path(spec["output"]).write_text(json.dumps(output, indent=1))
        dist.barrier()
        if spec.get("done"):  # as tta_worker.py: the measurement is complete on this rank
            Path(f"{spec['done']}.{dist.get_rank()}").touch()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
