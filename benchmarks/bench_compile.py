"""``--compile`` (``TrainConfig.compile``): what torch.compile costs before training and gains per step.

Both candidates are the forward that a :class:`ddcnn.train.engine.Trainer` trains with (``torch.compile(model)``
with ``compile`` set, the model itself without), stepped with that Trainer's optimiser and the engine's loss on the
same synthetic CIFAR-size batch. *Compile seconds*: the wall time of the first compiled training step less an eager
step, once with an empty inductor cache (a new machine or torch version: the cost a cluster job pays) and once with
the cache warm (a second run on the same machine); the validation forward compiles once more (eval mode), which is
not counted. *Steady state*: steps/s of each after the warm-up, in interleaved rounds, and the median of the per-round
speed-ups with their interquartile range; on CPU also on one thread in process CPU time, which load barely changes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

from common import (
    CIFAR_SHAPE,
    NUM_CLASSES,
    Result,
    Settings,
    fmt_ratio,
    median,
    ratio,
    synthetic_batch,
    threads,
    time_interleaved,
)
from ddcnn.config import TrainConfig
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs
from ddcnn.runtime import autocast
from ddcnn.train.engine import Trainer
from ddcnn.train.evaluation import classification_loss

NAME = "compile"
BUDGET = 60.0  # seconds of timed rounds per configuration and measure
# (backbone, grid, width); --quick runs the first
CONFIGS = [("vgg9", (2, 2), 0.5), ("vgg9", (4, 4), 1.0), ("vgg9", (1, 1), 1.0)]


def trainer_step(
    model: torch.nn.Module, settings: Settings, compile: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``step(x, y)``: one training step as the Trainer of ``TrainConfig(compile=compile)`` takes it."""
    cfg = TrainConfig(compile=compile, progress=False, amp=settings.cuda)
    trainer = Trainer(model.to(settings.device).train(), cfg, settings.device, epochs=1)
    forward, optimizer = trainer._forward, trainer.optimizer  # what Trainer._step steps with

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(cfg, settings.device):
            logits = forward(x)
        loss = classification_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@contextmanager
def inductor_cache(folder: str) -> Iterator[None]:
    """Inductor's (and AOTAutograd's) on-disk caches in ``folder``: empty for a cold compile."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def first_step_seconds(step: Callable[[], None], settings: Settings) -> float:
    start = time.perf_counter()
    step()
    settings.sync()
    return time.perf_counter() - start


def bench_compile(backbone: str, grid: tuple[int, ...], width: float, settings: Settings, rounds: int) -> dict:
    """One configuration's row: compile seconds (cold and warm cache) and steady-state steps/s, eager vs compiled."""
    x, y = synthetic_batch(settings)

    def model() -> LocalCNNs:
        torch.manual_seed(0)
        return LocalCNNs(backbone, Decomposition(grid, CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES, width=width)

    eager = partial(trainer_step(model(), settings, compile=False), x, y)
    eager_first = first_step_seconds(eager, settings)
    eager_step = min(first_step_seconds(eager, settings) for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache, inductor_cache(cache):
        torch._dynamo.reset()
        cold = first_step_seconds(partial(trainer_step(model(), settings, compile=True), x, y), settings)
        torch._dynamo.reset()  # forget the compiled graphs, keep the on-disk cache
        compiled = partial(trainer_step(model(), settings, compile=True), x, y)
        warm = first_step_seconds(compiled, settings)
        times = time_interleaved({"eager": eager, "compiled": compiled}, settings, rounds, budget=BUDGET)
        row = {
            "model": f"{backbone} {'global CNN' if grid == (1, 1) else 'local CNNs ' + 'x'.join(map(str, grid))}"
            f", width {width}",
            "compile s, cold cache": round(cold - eager_step, 1),
            "compile s, warm cache": round(warm - eager_step, 1),
            "eager steps/s": round(1 / median(times["eager"]), 2),
            "compiled steps/s": round(1 / median(times["compiled"]), 2),
            "compiled / eager": fmt_ratio(ratio(times["eager"], times["compiled"])),
            "eager first step s": round(eager_first, 2),
        }
        if not settings.cuda:
            with threads(1):
                cpu = time_interleaved({"eager": eager, "compiled": compiled}, settings, rounds, 1, time.process_time,
                                       budget=BUDGET)
            row["compiled / eager, 1 thread, CPU time"] = fmt_ratio(ratio(cpu["eager"], cpu["compiled"]))
    torch._dynamo.reset()
    return row


def run(settings: Settings) -> Result:
    rounds = settings.rounds(full=7, quick=3)
    columns = ["model", "compile s, cold cache", "compile s, warm cache", "eager steps/s", "compiled steps/s",
               "compiled / eager", "eager first step s"]
    if not settings.cuda:
        columns.append("compiled / eager, 1 thread, CPU time")
    result = Result(NAME, f"--compile: compile time and training steps/s (batch {settings.batch_size})", columns)
    for backbone, grid, width in CONFIGS[:1] if settings.quick else CONFIGS:
        result.rows.append(bench_compile(backbone, grid, width, settings, rounds))
    result.notes.append(
        "compile s: the first compiled training step less an eager step (forward and backward graphs; the "
        "validation forward compiles once more). Steps/s: wall time, medians of interleaved rounds; compiled / "
        "eager: median of the per-round speed-ups (interquartile range)."
    )
    return result


if __name__ == "__main__":
    import json
    import sys

    quick = "--quick" in sys.argv
    print(json.dumps(run(Settings(quick=quick)).rows, indent=2))
