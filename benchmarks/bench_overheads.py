"""The CNN-DNN's own overheads: the aggregation phase against a local-phase epoch, and a local-phase epoch against the
global CNN's at equal FLOPs, at 32, 64 and 128 pixels (issue 14, section 4).

**Aggregation.** On CIFAR-10 (10,000 training images, vgg9 at width 0.5, batch 64) a local phase of one epoch is
trained for the 2x2 and the 4x4 grid, then the aggregation phase runs on it as ``ddcnn train --method aggregation
--pretrained`` does, with 10 aggregator epochs (the time-to-accuracy benchmark's setting). Measured on one thread in
process CPU time (on CUDA: wall time): the local epoch's training steps, the inference pass of the frozen local CNNs
over the training images (what a trained aggregator learns from; the median of 3), and each trained aggregator's
training steps (a :class:`~ddcnn.train.callbacks.Callback` sums the CPU time of the steps, without the per-epoch
validation). The inference pass is inherent to the method (docs/method.md: the local CNNs are frozen, then their
probabilities on the training set are computed once): its arithmetic is a third of a training epoch's.

**Local phase against the global CNN.** Train steps (forward, loss, backward, SGD step) of the global CNN and of the
local CNNs of the 2x2 and 4x4 grids on the same synthetic batch of 64 images of 32, 64 and 128 pixels (vgg9, width
0.5), interleaved rounds, one thread, process CPU time. An epoch has the same number of steps for both, and the data
pipeline is the same (under 1% of a step, the ``data`` benchmark), so the step ratio is the epoch ratio. Equal FLOPs:
vgg9 keeps its channel widths, and without overlap the N local CNNs see N times fewer pixels each, so their
convolutions do the global CNN's arithmetic; the table gives the forward FLOPs per image of both (as
``bench_flops.py`` counts model FLOPs) and the time ratio divided by the FLOP ratio.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import REPO, Goal, Result, Settings, attribute, fmt_ratio, make_train_step, ratio, threads, time_interleaved
from ddcnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, format_grid
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs
from ddcnn.models.layers import SmallMapConv
from ddcnn.phases import Experiment, aggregation_phase, local_probabilities, pretrained_local_cnns, train_local_cnns
from ddcnn.train.callbacks import Callback

NAME = "overheads"
AGGREGATION_GOAL, LOCAL_GOAL = 0.05, 1.1
BACKBONE, WIDTH, BATCH, AGGREGATOR_EPOCHS = "vgg9", 0.5, 64, 10
CIFAR10_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz"
GRIDS = ((2, 2), (4, 4))
SIZES = (32, 64, 128)
TRAINED = ("dnn", "linear")


class StepClock(Callback):
    """The process CPU time (wall time on CUDA) of each fit's optimizer steps, without the validation between its
    epochs: one total per fit, in ``fits``."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.fits, self._total, self._last = clock, [], 0.0, 0.0

    def on_fit_start(self, trainer) -> None:
        self._total, self._last = 0.0, self.clock()

    def on_step_end(self, trainer) -> None:
        now = self.clock()
        self._total, self._last = self._total + now - self._last, now

    def on_epoch_end(self, trainer, row) -> None:
        self._last = self.clock()  # the next epoch's first step starts now; validation is not counted

    def on_fit_end(self, trainer, result) -> None:
        self.fits.append(self._total)


def run(settings: Settings) -> Result:
    clock = time.perf_counter if settings.cuda else time.process_time
    measure = "wall time" if settings.cuda else "1 thread, process CPU time"
    result = Result(
        NAME,
        f"Overheads of the CNN-DNN ({BACKBONE}, width {WIDTH}, batch {BATCH}; {measure})",
        ["part", "grid", "images", "seconds", "ratio", "note"],
    )
    with threads(1) if not settings.cuda else contextlib.nullcontext():
        aggregation = _aggregation(settings, clock, result)
        local = _local_against_global(settings, clock, result)
    _goals(result, aggregation, local)
    result.notes.append(
        "Aggregation rows: the local epoch's training steps; the inference pass of the frozen local CNNs over the "
        f"training images; each trained aggregator's {AGGREGATOR_EPOCHS} epochs of steps (--aggregator-batch-size "
        "512, adamw); ratio: against the local epoch. The aggregation phase reports the inference pass and the "
        "training together as its training seconds. Local-phase rows: seconds per train step, ratio against the "
        "global CNN's step at that size; the note gives the forward FLOP ratio and the time ratio at equal FLOPs."
    )
    return result


def _aggregation(settings: Settings, clock: Callable[[], float], result: Result) -> dict[str, dict[str, float]]:
    """Per grid: the ratios of the inference pass and of each trained aggregator's training to a local epoch."""
    images = 2_000 if settings.quick else 10_000
    ratios: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ddcnn-overheads-") as tmp:
        for grid in GRIDS[:1] if settings.quick else GRIDS:
            steps = StepClock(clock)
            exp = Experiment.from_config(
                _config(settings, grid, images, Path(tmp) / format_grid(grid)), callbacks=[steps]
            )
            decomposition = exp.decomposition()
            train_local_cnns(exp, decomposition, 1, "local")
            (local_epoch,) = steps.fits
            exp = Experiment.from_config(
                _config(settings, grid, images, exp.run_dir, pretrained=str(exp.run_dir)), callbacks=[steps]
            )
            frozen, _ = pretrained_local_cnns(exp, decomposition)
            infer = partial(local_probabilities, frozen, exp.loader("train"), exp.cfg.train, exp.device)
            inference = statistics.median(_seconds(clock, settings, infer) for _ in range(3))
            accuracies = {r.method: r.test.accuracy for r in aggregation_phase(exp, list(TRAINED))}
            trained = dict(zip(TRAINED, steps.fits[1:]))
            g = format_grid(grid)
            ratios[g] = {"inference": inference / local_epoch, **{a: s / local_epoch for a, s in trained.items()}}
            result.rows.append(
                {
                    "part": "local epoch",
                    "grid": g,
                    "images": len(exp.data.train),
                    "seconds": round(local_epoch, 2),
                    "ratio": "1",
                    "note": "",
                }
            )
            result.rows.append(
                {
                    "part": "aggregation: inference pass",
                    "grid": g,
                    "images": len(exp.data.train),
                    "seconds": round(inference, 2),
                    "ratio": f"{inference / local_epoch:.1%}",
                    "note": "the frozen local CNNs' probabilities on the training images",
                }
            )
            for name, seconds in trained.items():
                result.rows.append(
                    {
                        "part": f"aggregation: {name} training",
                        "grid": g,
                        "images": len(exp.data.train),
                        "seconds": round(seconds, 3),
                        "ratio": f"{seconds / local_epoch:.1%}",
                        "note": f"test accuracy {accuracies[name]:.4f} (after a 1-epoch local phase)",
                    }
                )
    return ratios


def _config(settings: Settings, grid: tuple[int, ...], images: int, out: Path, pretrained: str | None = None):
    if not CIFAR10_ARCHIVE.is_file():
        raise FileNotFoundError(f"the aggregation part needs CIFAR-10 at {CIFAR10_ARCHIVE} (see ../shared/data)")
    return RunConfig(
        method="aggregation" if pretrained else "local",
        out=str(out),
        pretrained=pretrained,
        data=DataConfig(dataset=f"cifar10:{CIFAR10_ARCHIVE}", batch_size=BATCH, limit_train=images),
        model=ModelConfig(backbone=BACKBONE, width=WIDTH, grid=grid),
        train=TrainConfig(epochs=1, progress=False, device=str(settings.device)),
        aggregator_epochs=AGGREGATOR_EPOCHS,
    )


def _seconds(clock: Callable[[], float], settings: Settings, fn: Callable[[], Any]) -> float:
    settings.sync()
    start = clock()
    fn()
    settings.sync()
    return clock() - start


def _local_against_global(settings: Settings, clock: Callable[[], float], result: Result) -> dict[int, dict]:
    """Per image size: each grid's step-time ratio to the global CNN and its FLOP ratio."""
    rounds = settings.rounds(full=9, quick=3)
    out: dict[int, dict] = {}
    for size in SIZES[:1] if settings.quick else SIZES:
        generator = torch.Generator().manual_seed(size)
        x = torch.randn(BATCH, 3, size, size, generator=generator).to(settings.device)
        y = torch.randint(0, 10, (BATCH,), generator=generator).to(settings.device)
        steps, flops = {}, {}
        for grid in ((1, 1), *GRIDS):
            model = LocalCNNs(BACKBONE, Decomposition(grid, (size, size)), 3, 10, WIDTH).to(settings.device)
            flops[grid] = _forward_flops(model, x[:2])
            steps[grid] = partial(make_train_step(model, settings), x, y)
        times = time_interleaved(steps, settings, rounds, warmup=1, clock=clock)
        out[size] = {}
        for grid in GRIDS:
            r = ratio(times[grid], times[(1, 1)])
            flop_ratio = flops[grid] / flops[(1, 1)]
            out[size][format_grid(grid)] = (r, r[0] / flop_ratio)
        for grid in ((1, 1), *GRIDS):
            label = "global CNN" if grid == (1, 1) else "local phase"
            r = ratio(times[grid], times[(1, 1)])
            result.rows.append(
                {
                    "part": f"{label}, {size}x{size} px",
                    "grid": format_grid(grid),
                    "images": BATCH,
                    "seconds": round(statistics.median(times[grid]), 4),
                    "ratio": fmt_ratio(r),
                    "note": f"{flops[grid] / 1e6:.1f} MFLOP/image forward ({flops[grid] / flops[(1, 1)]:.3f}x); "
                    f"at equal FLOPs {r[0] * flops[(1, 1)] / flops[grid]:.2f}x",
                }
            )
    return out


def _forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Model FLOPs of one image's forward pass (every convolution counted as a direct one)."""
    with torch.no_grad(), attribute(SmallMapConv, "enabled", False), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / len(x)


def _goals(result: Result, aggregation: dict[str, dict[str, float]], local: dict[int, dict]) -> None:
    if aggregation:
        worst = max(aggregation, key=lambda g: aggregation[g]["dnn"])
        dnn = aggregation[worst]["dnn"]
        result.goals.append(
            Goal(
                f"aggregation phase: training the dnn ({AGGREGATOR_EPOCHS} epochs) vs a local-phase epoch",
                f"< {AGGREGATION_GOAL:.0%}",
                f"{dnn:.1%} (worst: {worst})",
                dnn < AGGREGATION_GOAL,
            )
        )
        whole = {g: r["inference"] + r["dnn"] for g, r in aggregation.items()}
        worst = max(whole, key=whole.get)
        result.goals.append(
            Goal(
                "aggregation phase, all of it (inference pass over the training images + training the dnn) vs a "
                "local-phase epoch",
                f"< {AGGREGATION_GOAL:.0%}",
                f"{whole[worst]:.1%} (worst: {worst}; the inference pass alone {aggregation[worst]['inference']:.1%})",
                whole[worst] < AGGREGATION_GOAL,
            )
        )
    for size, grids in local.items():
        worst = max(grids, key=lambda g: grids[g][1])
        r, at_equal_flops = grids[worst]
        others = ", ".join(f"{g}: {grids[g][1]:.3f}x" for g in grids if g != worst)
        result.goals.append(
            Goal(
                f"local-phase epoch vs the global CNN's at equal FLOPs, {size}x{size} px (vgg9 width {WIDTH})",
                f"<= {LOCAL_GOAL}x",
                f"{at_equal_flops:.3f}x at {worst} ({fmt_ratio(r)} in time); {others}",
                at_equal_flops <= LOCAL_GOAL,
            )
        )
