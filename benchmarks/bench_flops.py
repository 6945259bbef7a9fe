"""Hardware efficiency: achieved GFLOP/s of training against the machine's matmul peak, measured in the same run.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the forward pass, and a training step is
taken as 3x that (backward = 2x forward; the counter's own count of a grouped convolution's backward is wrong: it
counts the weight gradient as if the convolution were not grouped). *Model* FLOPs count every convolution as a
direct convolution, the architecture's arithmetic as usually quoted (MFU-style); *executed* FLOPs are what the
code runs, fewer where the small-map path (:class:`ddcnn.models.layers.SmallMapConv`) skips the zero taps of 3x3
kernels on 2x2 maps. The peak is the best GFLOP/s of a large square matmul in the training dtype.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import (
    CIFAR_SHAPE,
    NUM_CLASSES,
    Result,
    Settings,
    attribute,
    make_train_step,
    matmul_peak_gflops,
    median,
    synthetic_batch,
    threads,
    time_interleaved,
)
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs
from ddcnn.models.layers import SmallMapConv

NAME = "flops"


def count_training_flops(model: torch.nn.Module, x: torch.Tensor, settings: Settings) -> int:
    """FLOPs of one training step of ``model`` on ``x``: 3x the forward pass's."""
    with torch.no_grad(), settings.autocast(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3 * counter.get_total_flops()


def run(settings: Settings) -> Result:
    rounds = settings.rounds(full=5, quick=3)
    cpu = not settings.cuda
    peak = matmul_peak_gflops(settings)
    if cpu:
        with threads(1):
            core_peak = matmul_peak_gflops(settings, clock=time.process_time)
    x, y = synthetic_batch(settings)
    title = f"Hardware efficiency of training (batch {len(x)}; matmul peak {peak:.0f} GFLOP/s"
    title += f", {core_peak:.0f} on one core, measured in this run)" if cpu else ", measured in this run)"
    result = Result(
        NAME,
        title,
        ["model", "model GFLOP/step", "executed GFLOP/step", "step ms", "model GFLOP/s", "of peak"]
        + (["of one core's peak, 1 thread, CPU time"] if cpu else []),
    )
    grids = [(1, 1), (4, 4)] if settings.quick else [(1, 1), (2, 2), (4, 4), (8, 8)]
    for grid in grids:
        model = LocalCNNs("vgg9", Decomposition(grid, CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES)
        step = partial(make_train_step(model.to(settings.device), settings), x, y)
        with attribute(SmallMapConv, "enabled", False):
            model_flops = count_training_flops(model, x, settings)
        executed = count_training_flops(model, x, settings)
        seconds = median(time_interleaved({"step": step}, settings, rounds)["step"])
        achieved = model_flops / seconds / 1e9
        label = "global CNN" if grid == (1, 1) else f"local CNNs {grid[0]}x{grid[1]}"
        row = {
            "model": f"vgg9 {label}",
            "model GFLOP/step": round(model_flops / 1e9, 1),
            "executed GFLOP/step": round(executed / 1e9, 1),
            "step ms": round(seconds * 1e3),
            "model GFLOP/s": round(achieved, 1),
            "of peak": f"{achieved / peak:.0%}",
        }
        if cpu:
            with threads(1):
                cpu_seconds = median(time_interleaved({"step": step}, settings, rounds, 1, time.process_time)["step"])
            row["of one core's peak, 1 thread, CPU time"] = f"{model_flops / cpu_seconds / 1e9 / core_peak:.0%}"
        result.rows.append(row)
    result.notes.append(
        "With the same widths the local CNNs of a 2x2 or 4x4 grid do the global CNN's arithmetic; on the 8x8 grid "
        "(4x4 subimages) max-pooling stops at 2x2 maps, so the last three convolutions run on 4x the pixels. "
        "Model FLOP/s above 100% of peak are possible where the executed FLOPs are fewer."
    )
    return result
