"""What every benchmark shares: settings, the train step, interleaved timing with medians, child processes (one, or
several under torchrun), the machine, results.

The machine these benchmarks were written on is shared and noisy, so no figure is a single timing: every
comparison runs its candidates in alternating rounds (A, B, B, A, ...) after a warm-up, and a speed-up is the median
of the per-round ratios, with the interquartile range of those ratios beside it. A load spike then hits both
candidates of a round alike instead of one of them.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddcnn.config import TrainConfig
from ddcnn.train.evaluation import classification_loss
from ddcnn.train.optim import build_optimizer

CIFAR_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
REPO = Path(__file__).resolve().parent.parent
# CIFAR-10 as the project's runs read it (relative to the repository root: run child processes there)
CIFAR10 = "cifar10:../shared/data/cifar10/cifar10-jpeg.tar.gz"


@dataclass(frozen=True)
class Settings:
    """How to run: ``quick`` (fewer configurations and rounds), the device, and what the device implies.

    On CUDA the benchmarks use bf16 autocast, channels-last inputs and 4x larger batches, as a GPU run would.
    """

    quick: bool = False
    device: torch.device = torch.device("cpu")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batch_size(self) -> int:
        return 512 if self.cuda else 128

    def rounds(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass
class Goal:
    """A target of the performance issue and how far the run got."""

    name: str
    target: str
    measured: str
    met: bool


@dataclass
class Result:
    """One benchmark's output: a table (``columns`` name the keys of ``rows``), goals and notes."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# -- training steps ---------------------------------------------------------------------------------------------


def train_config() -> TrainConfig:
    """The project's default optimiser settings (SGD, momentum, Nesterov, weight decay), quiet."""
    return TrainConfig(progress=False)


def make_train_step(
    model: nn.Module, settings: Settings, optimizer: torch.optim.Optimizer | None = None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``step(x, y)``: forward, the engine's loss, backward and optimiser step for one batch.

    ``optimizer`` defaults to the one the trainer builds (:func:`ddcnn.train.optim.build_optimizer`).
    """
    model.train()
    opt = optimizer or build_optimizer(model.named_parameters(), train_config())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with settings.autocast():
            logits = model(x)
        loss = classification_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def synthetic_batch(settings: Settings, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised CIFAR-size batch and its labels on the device (channels-last on CUDA, as the engine does)."""
    generator = torch.Generator().manual_seed(0)
    b = batch or settings.batch_size
    x = torch.randn(b, *CIFAR_SHAPE, generator=generator).to(settings.device)
    if settings.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=generator).to(settings.device)
    return x, y


# -- timing -----------------------------------------------------------------------------------------------------


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    settings: Settings,
    rounds: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    budget: float | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``warmup`` untimed calls each, then ``rounds`` rounds in which every
    candidate runs once, the order reversed every other round; fewer rounds (but at least 3) once ``budget``
    seconds of wall time have passed. ``clock`` is wall time by default; ``time.process_time`` gives the
    process's CPU time, which other processes' load barely changes (with one thread: with several, threads waiting
    for each other spin and count too)."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    settings.sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + budget if budget is not None else float("inf")
    for r in range(rounds):
        if r >= 3 and time.perf_counter() > deadline:
            break
        for name in names if r % 2 == 0 else reversed(names):
            start = clock()
            candidates[name]()
            settings.sync()
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range of the per-round ratios ``slow[i] / fast[i]`` (a speed-up of fast)."""
    ratios = sorted(s / f for s, f in zip(slow, fast))
    if len(ratios) < 4:
        return statistics.median(ratios), ratios[0], ratios[-1]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def fmt_ratio(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def matmul_peak_gflops(
    settings: Settings, seconds: float = 2.0, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Achieved GFLOP/s of a large square matmul in the training dtype (fp32 on CPU, bf16 on CUDA): the machine's
    practical peak, measured in the same run as the figures compared with it (the best of ``seconds`` of calls,
    timed with ``clock``)."""
    n = 8192 if settings.cuda else 2048
    dtype = torch.bfloat16 if settings.cuda else torch.float32
    a = torch.randn(n, n, device=settings.device, dtype=dtype)
    b = torch.randn(n, n, device=settings.device, dtype=dtype)
    for _ in range(2):
        a @ b
    settings.sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # the best of several: the peak is what the hardware can do when free
        start = clock()
        a @ b
        settings.sync()
        best = max(best, 2 * n**3 / (clock() - start) / 1e9)
    return best


# -- child processes --------------------------------------------------------------------------------------------


def run_processes(args: list[str], processes: int, threads: int, timeout: float = 3600) -> str:
    """Run ``python args`` in the repository root as ``processes`` processes of ``threads`` threads each: plain
    ``python`` for one, ``torchrun --standalone --nproc-per-node=processes`` (gloo on the CPU) for more. Returns its
    stdout; a failure raises with the end of its output."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [sys.executable, *(launcher if processes > 1 else []), *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        output = done.stdout[-2000:] + done.stderr[-4000:]
        raise RuntimeError(f"{' '.join(command)} failed with exit status {done.returncode}:\n{output}")
    return done.stdout


# -- the machine ------------------------------------------------------------------------------------------------


def machine(settings: Settings) -> dict[str, Any]:
    """CPU model, cores, torch version and threads (and the GPU, on CUDA)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(settings.device),
    }
    if settings.cuda:
        info["gpu"] = torch.cuda.get_device_name(settings.device)
    with contextlib.suppress(OSError):
        info["load_average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def attribute(obj: object, name: str, value: object) -> Iterator[None]:
    """Temporarily set ``obj.name = value`` (to switch one optimisation off for a measurement)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def peak_rss() -> int:
    """Bytes: this process's peak resident set size (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
