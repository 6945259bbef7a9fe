"""Parallel efficiency of the local phase: the training time of one epoch of ``ddcnn train --method local`` on
CIFAR-10 (vgg9 at width 0.5, batch 64) on one process of one thread against two processes of one thread each
(``torchrun``, gloo; ddcnn's model parallelism: each process trains its own subdomains' local CNNs, and the
processes exchange only the logged numbers of the epoch).

Each run is a fresh ``ddcnn train`` command; its training time is the epoch's ``seconds`` in its ``local_log.csv``
(the Trainer's: without start-up, data loading, evaluation and checkpoints; with two processes, until the slower
one has finished the epoch). The runs alternate 1, 2, 1, 2 processes, and the speed-up is the median of the
per-round ratios (with two rounds, their mean; the range shows both). Efficiency = speed-up / 2.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

from common import CIFAR10, Goal, Result, Settings, fmt_ratio, ratio, run_processes
from ddcnn.config import format_grid
from ddcnn.train.logs import format_bytes

NAME = "parallel_efficiency"
GOAL_EFFICIENCY = 0.9
PROCESSES = (1, 2)
BATCH, BACKBONE, WIDTH = 64, "vgg9", 0.5


def run(settings: Settings) -> Result:
    images = 2_000 if settings.quick else 10_000
    grids = [(2, 2)] if settings.quick else [(2, 2), (4, 4)]
    rounds = 2
    result = Result(
        NAME,
        f"Parallel efficiency of the local phase on CIFAR-10 ({BACKBONE}, width {WIDTH}, batch {BATCH}, "
        f"{images:,} images, 1 epoch; 1 thread per process)",
        ["grid", "1 process s (each run)", "2 processes s (each run)", "speed-up", "efficiency",
         "whole command s, 1 / 2 processes", "sent per epoch, 2 processes"],
    )
    if settings.cuda:
        result.notes.append("CPU only: it compares processes on CPU cores; run it without --device cuda.")
        return result
    for grid in grids:
        seconds: dict[int, list[float]] = {p: [] for p in PROCESSES}
        command_seconds: dict[int, list[float]] = {p: [] for p in PROCESSES}
        sent = 0.0
        with tempfile.TemporaryDirectory(prefix="ddcnn-parallel-") as tmp:
            for r in range(rounds):
                for processes in PROCESSES:
                    out = Path(tmp) / f"{r}-{processes}"
                    start = time.perf_counter()
                    run_processes(_train_command(grid, images, out), processes, threads=1)
                    command_seconds[processes].append(time.perf_counter() - start)
                    (row,) = _log_rows(out)
                    seconds[processes].append(float(row["seconds"]))
                    if processes > 1:
                        sent = float(row["comm_bytes_per_epoch"])
        speedup = ratio(seconds[1], seconds[2])
        efficiency = speedup[0] / PROCESSES[-1]
        result.rows.append(
            {
                "grid": format_grid(grid),
                "1 process s (each run)": ", ".join(f"{s:.1f}" for s in seconds[1]),
                "2 processes s (each run)": ", ".join(f"{s:.1f}" for s in seconds[2]),
                "speed-up": fmt_ratio(speedup),
                "efficiency": f"{efficiency:.0%}",
                "whole command s, 1 / 2 processes": " / ".join(
                    ", ".join(f"{s:.0f}" for s in command_seconds[p]) for p in PROCESSES
                ),
                "sent per epoch, 2 processes": format_bytes(sent),
            }
        )
        if grid == (2, 2):
            result.goals.append(
                Goal(
                    "local phase, 2x2, 2 processes vs 1 (1 thread each): parallel efficiency",
                    f">= {GOAL_EFFICIENCY:.0%} (speed-up >= {GOAL_EFFICIENCY * PROCESSES[-1]:.1f}x)",
                    f"{efficiency:.0%} ({fmt_ratio(speedup)})",
                    efficiency >= GOAL_EFFICIENCY,
                )
            )
    result.notes.append(
        f"`ddcnn train --method local --grid G --dataset {CIFAR10} --backbone {BACKBONE} --width {WIDTH} "
        f"--batch-size {BATCH} --limit-train {images} --epochs 1 --threads 1` with `OMP_NUM_THREADS=1`, under "
        "`torchrun --standalone --nproc-per-node=2` for 2 processes; the runs alternate 1, 2, 1, 2 processes. "
        "Training time from each run's local_log.csv; the whole command adds start-up, data loading and evaluation."
    )
    return result


def _train_command(grid: tuple[int, int], images: int, out: Path) -> list[str]:
    """``python -m ddcnn train`` arguments of one epoch of the local phase (2% of the training images held out for
    validation, which is evaluated but not timed)."""
    return [
        "-m", "ddcnn", "train", "--method", "local", "--grid", format_grid(grid), "--dataset", CIFAR10,
        "--backbone", BACKBONE, "--width", str(WIDTH), "--batch-size", str(BATCH), "--crop-padding", "4", "--flip",
        "--val-fraction", "0.02", "--limit-train", str(images), "--epochs", "1", "--threads", "1", "--device", "cpu",
        "--no-progress", "--out", str(out),
    ]


def _log_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "local_log.csv", newline="") as f:
        return list(csv.DictReader(f))
