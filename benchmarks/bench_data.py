"""Data pipeline share: the part of a training step's time spent producing the batch (indexing the in-memory uint8
data set, random crop and flip, normalisation), with the project's loader, ``ddcnn.data.make_loader``.

The data set is a synthetic CIFAR-10-sized train split (50,000 x 3x32x32 uint8) held in memory, as the loader holds
CIFAR-10; the loader augments as for CIFAR (4-pixel reflected crops, horizontal flips). Each timed round fetches the
next batch from the loader, then trains on it; the share is data time / (data time + step time), from medians.
"""

from __future__ import annotations

import time

import torch

from common import (
    CIFAR_SHAPE,
    NUM_CLASSES,
    Goal,
    Result,
    Settings,
    make_train_step,
    median,
)
from ddcnn.config import DataConfig
from ddcnn.data import ImageSet, make_loader
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs

NAME = "data"
GOAL_SHARE = 0.05


def synthetic_split(n: int) -> ImageSet:
    """``n`` random uint8 CIFAR-size images with labels, on the CPU (as a loaded in-memory data set)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *CIFAR_SHAPE), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.randint(0, NUM_CLASSES, (n,), generator=generator))


def run(settings: Settings) -> Result:
    rounds = settings.rounds(full=12, quick=4)
    split = synthetic_split(50_000 if not settings.quick else 10_000)
    cfg = DataConfig(batch_size=settings.batch_size, augment=True, crop_padding=4, flip=True)
    loader = make_loader(
        split,
        batch_size=settings.batch_size,
        train=True,
        cfg=cfg,
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        device=settings.device,
    )
    result = Result(
        NAME,
        f"Data pipeline share of the train step (in-memory, augmented, batch {settings.batch_size})",
        ["model", "data ms/batch", "step ms", "data share", "loader img/s"],
    )
    grids = [(1, 1), (4, 4)] if settings.quick else [(1, 1), (2, 2), (4, 4)]
    worst = 0.0
    for grid in grids:
        model = LocalCNNs("vgg9", Decomposition(grid, CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES)
        step = make_train_step(model.to(settings.device), settings)
        batches = iter(loader)
        data_times, step_times = [], []
        for i in range(rounds + 2):  # the first two rounds warm up
            start = time.perf_counter()
            x, y = next(batches)
            settings.sync()
            fetched = time.perf_counter()
            step(x, y)
            settings.sync()
            if i >= 2:
                data_times.append(fetched - start)
                step_times.append(time.perf_counter() - fetched)
        data, train = median(data_times), median(step_times)
        share = data / (data + train)
        worst = max(worst, share)
        label = "global CNN" if grid == (1, 1) else f"local CNNs {grid[0]}x{grid[1]}"
        result.rows.append(
            {
                "model": f"vgg9 {label}",
                "data ms/batch": round(data * 1e3, 2),
                "step ms": round(train * 1e3, 1),
                "data share": f"{share:.2%}",
                "loader img/s": round(settings.batch_size / data),
            }
        )
    goal = Goal("data pipeline share of step time", f"< {GOAL_SHARE:.0%}", f"{worst:.2%} (worst)", worst < GOAL_SHARE)
    result.goals.append(goal)
    result.notes.append(f"medians of {rounds} rounds (fetch a batch, then train on it) after 2 warm-up rounds.")
    return result
