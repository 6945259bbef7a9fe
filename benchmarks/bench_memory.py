"""Memory: peak resident memory of local-phase training on a CIFAR-10-sized data set, and a check that the data set
is held once, not once per subdomain (the split into subimages happens per batch), also by a process of the
model-parallel local phase whose loader yields only its subdomains' subimages (4 of 16, the share of one of 4
processes: :mod:`ddcnn.data.subimages`; on the CPU gathered from the host images themselves).

Each configuration runs in a fresh process and reports its peak resident memory (``VmHWM``; not ``ru_maxrss``,
which Linux carries over from the parent across fork and exec): a synthetic in-memory data set of 60,000 x 3x32x32
uint8 (CIFAR-10's size, 184 MB), the project's loader (augmented), the local CNNs and the trainer's optimiser, a
few training steps. The same run with a data set of 1,280 images gives the memory that is not the data;
(peak - peak without data) / data set size is then how many copies of the data set the run holds (within about
+-0.5: the allocator's peaks vary by +-100 MB from run to run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from common import CIFAR_SHAPE, Goal, Result, Settings, peak_rss

NAME = "memory"
GOAL_BYTES = 2 * 1024**3
FULL, TINY = 60_000, 1_280


def run(settings: Settings) -> Result:
    grids: list[tuple[tuple[int, int], tuple[int, ...] | None]] = [((4, 4), None), ((4, 4), (0, 1, 2, 3))]
    if not settings.quick:
        grids = [((1, 1), None), *grids, ((8, 8), None)]
    steps = 5
    result = Result(
        NAME,
        f"Peak memory of local-phase training on CIFAR-10-sized data (60,000 images, batch {settings.batch_size})",
        ["model", "peak RSS MB", "peak RSS without data MB", "data set MB", "data set copies"]
        + (["peak GPU MB"] if settings.cuda else []),
    )
    worst_peak, worst_copies = 0, 0.0
    for grid, share in grids:
        full = _child(grid, FULL, steps, settings, share)
        tiny = _child(grid, TINY, steps, settings, share)
        copies = (full["peak_rss"] - tiny["peak_rss"]) / full["data_bytes"]
        worst_peak, worst_copies = max(worst_peak, full["peak_rss"]), max(worst_copies, copies)
        label = "global CNN" if grid == (1, 1) else f"local CNNs {grid[0]}x{grid[1]}"
        if share is not None:
            label += f", subdomains {share[0]}-{share[-1]} (own subimages)"
        row = {
            "model": f"vgg9 {label}",
            "peak RSS MB": round(full["peak_rss"] / 1e6),
            "peak RSS without data MB": round(tiny["peak_rss"] / 1e6),
            "data set MB": round(full["data_bytes"] / 1e6),
            "data set copies": f"{copies:.2f}",
        }
        if settings.cuda:
            row["peak GPU MB"] = round(full["peak_gpu"] / 1e6)
        result.rows.append(row)
    peak = f"{worst_peak / 1e9:.2f} GB (worst)"
    result.goals.append(Goal("peak memory of local-phase training", "< 2 GB", peak, worst_peak < GOAL_BYTES))
    result.goals.append(
        Goal(
            "data set held once, not per subdomain",
            "1 copy (N copies if split per subdomain)",
            f"{worst_copies:.1f} copies (worst)",
            worst_copies < 2,
        )
    )
    result.notes.append(f"{steps} training steps per run; each run in a fresh process.")
    return result


def _child(
    grid: tuple[int, int], images: int, steps: int, settings: Settings, share: tuple[int, ...] | None = None
) -> dict[str, float]:
    """Run :func:`_measure` in a fresh interpreter and return what it reports."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent / "src"), str(here), env.get("PYTHONPATH", "")])
    args = {"grid": grid, "images": images, "steps": steps, "quick": settings.quick, "device": str(settings.device)}
    args["share"] = share
    command = [sys.executable, __file__, json.dumps(args)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _measure(
    grid: tuple[int, int], images: int, steps: int, quick: bool, device: str, share: list[int] | None = None
) -> dict[str, float]:
    """Train the local CNNs of ``grid`` (those of ``share`` only, on their own subimages, if given) for ``steps``
    batches of an in-memory data set of ``images`` images."""
    import torch

    from bench_data import synthetic_split
    from common import NUM_CLASSES, make_train_step
    from ddcnn.config import DataConfig
    from ddcnn.data import make_loader
    from ddcnn.decomposition import Decomposition
    from ddcnn.models import LocalCNNs

    settings = Settings(quick=quick, device=torch.device(device))
    split = synthetic_split(images)
    decomposition = Decomposition(tuple(grid), CIFAR_SHAPE[1:])
    loader = make_loader(
        split,
        batch_size=settings.batch_size,
        train=True,
        cfg=DataConfig(batch_size=settings.batch_size, crop_padding=4, flip=True),
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        device=settings.device,
        subimages=None if share is None else (decomposition, share),
    )
    model = LocalCNNs("vgg9", decomposition, CIFAR_SHAPE[0], NUM_CLASSES)
    model = model if share is None else model.subset(share)
    step = make_train_step(model.to(settings.device), settings)
    for _, (x, y) in zip(range(steps), loader):
        step(x, y)
    settings.sync()
    return {
        "peak_rss": peak_rss(),
        "data_bytes": split.images.numel() * split.images.element_size(),
        "peak_gpu": torch.cuda.max_memory_allocated(settings.device) if settings.cuda else 0,
    }


if __name__ == "__main__":
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
