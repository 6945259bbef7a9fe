"""A user's backbone (``--backbone package.module:function``) against the built-in grouped one: training steps/s of
the same architecture run three ways.

* ``grouped``: the built-in ``vgg9`` (``LocalCNNs("vgg9", ...)``): one grouped module for all N local CNNs.
* ``vmap``: :func:`vgg9_plain`, the same network written with ordinary torch layers as a user would, its N copies
  batched by ``torch.func.vmap`` over ``functional_call`` (``LocalCNNs.from_factory(..., batching="vmap")``).
* ``loop``: the same N copies, over the same storage, one after another (``batching="loop"``).

A step is forward, loss, backward and SGD step of all N local CNNs on a CIFAR-size batch (the engine's loss and
optimiser, ``common.make_train_step``); the three run in interleaved rounds and the ratios are medians of per-round
ratios. The plain network has exactly the built-in's parameters (checked), so the numbers compare the ways of
running it, not two architectures.
"""

from __future__ import annotations

import math
import time
from functools import partial

from common import (
    CIFAR_SHAPE,
    NUM_CLASSES,
    Result,
    Settings,
    fmt_ratio,
    make_train_step,
    median,
    ratio,
    synthetic_batch,
    threads,
    time_interleaved,
)
from torch import nn

from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs

NAME = "backbones"
GRIDS = [(2, 2), (4, 4)]  # N = 4 and 16
BUDGET = 45.0  # seconds of timed rounds per configuration, so that a loaded machine ends in time
PAIRS = ("vmap / loop", "grouped / vmap", "grouped / loop")
CPU = ", 1 thread, CPU time"
VGG9_STAGES = [32, 32, "M", 64, 64, "M", 128, 128, 128, "M"]  # ddcnn.models.vgg.vgg9, hidden layer 256


def vgg9_plain(
    in_channels: int, num_classes: int, spatial_dims: int, image_shape: tuple[int, ...], width: float = 1.0
) -> nn.Module:
    """ddcnn's vgg9 (models/vgg.py: conv-BN-ReLU, max-pooling while the map stays 2 pixels wide, adaptive average
    pooling to at most 4 pixels per axis, a 256-unit hidden layer) in plain torch layers, 2D only."""
    assert spatial_dims == 2
    layers: list[nn.Module] = []
    channels, size = in_channels, list(image_shape)
    for stage in VGG9_STAGES:
        if stage == "M":
            if min(size) >= 4:
                layers.append(nn.MaxPool2d(2))
                size = [s // 2 for s in size]
            continue
        out = max(4, round(int(stage) * width))
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    pooled = [min(s, 4) for s in size]
    hidden = max(4, round(256 * width))
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(tuple(pooled)),
        nn.Flatten(),
        nn.Linear(channels * math.prod(pooled), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def run(settings: Settings) -> Result:
    rounds = settings.rounds(full=7, quick=3)
    x, y = synthetic_batch(settings)
    batch = len(x)
    result = Result(
        NAME,
        f"A user's backbone (vgg9 in plain torch layers) batched by vmap or looped, against the built-in grouped "
        f"vgg9 (train step, batch {batch}, 32x32x3 images)",
        ["grid", "N", "grouped steps/s", "vmap steps/s", "loop steps/s", *PAIRS]
        + ([f"{pair}{CPU}" for pair in PAIRS] if not settings.cuda else []),
    )
    for grid in GRIDS:
        decomposition = Decomposition(grid, CIFAR_SHAPE[1:])
        grouped = LocalCNNs("vgg9", decomposition, CIFAR_SHAPE[0], NUM_CLASSES)
        models = {"grouped": grouped}
        for batching in ("vmap", "loop"):
            models[batching] = LocalCNNs.from_factory(
                vgg9_plain, decomposition, CIFAR_SHAPE[0], NUM_CLASSES, batching=batching
            )
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
        if len(set(counts.values())) != 1:
            raise AssertionError(f"the plain vgg9 is not the built-in one: parameters {counts}")
        candidates = {
            name: partial(make_train_step(m.to(settings.device), settings), x, y) for name, m in models.items()
        }
        times = time_interleaved(candidates, settings, rounds, warmup=1, budget=BUDGET)
        row = {
            "grid": "x".join(map(str, grid)),
            "N": decomposition.num_subdomains,
            **{f"{name} steps/s": round(1 / median(times[name]), 2) for name in models},
            **_ratios(times, ""),
        }
        if not settings.cuda:  # the load-insensitive measure of the work itself (as in bench_batched)
            with threads(1):
                cpu_times = time_interleaved(
                    candidates, settings, rounds, warmup=1, clock=time.process_time, budget=BUDGET
                )
            row |= _ratios(cpu_times, CPU)
        result.rows.append(row)
    result.notes.append(
        "a / b: the speed-up of a over b, the median of per-round ratios of step times (interquartile range in "
        f"brackets), {rounds} rounds after a warm-up step each (at least 3 once {BUDGET:.0f} s are spent). The three "
        f"have the same {counts['grouped']:,} parameters at N = 16. The vmap and loop paths share one storage "
        "(ddcnn.models.stacked): ddcnn takes vmap wherever a probe forward and backward succeeds. On CPU the ratios "
        "are also measured on one thread in process CPU time, which the load of a shared machine barely changes."
    )
    return result


def _ratios(times: dict[str, list[float]], suffix: str) -> dict[str, str]:
    """Each of :data:`PAIRS` (``a / b``: the speed-up of a over b) from the step times of an interleaved run."""
    return {f"{a} / {b}{suffix}": fmt_ratio(ratio(times[b], times[a])) for a, b in (p.split(" / ") for p in PAIRS)}
