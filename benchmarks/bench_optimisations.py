"""The effect of each optimisation of the batched local CNNs, as a before/after ratio measured in this run.

Each row switches one optimisation off (or runs the replaced code, kept here as the reference) and times it
against the current code, interleaved. Train steps are the batched vgg9 local CNNs on 32x32 images; layer rows
time forward and backward of the one layer concerned. On CPU every row but the threads row runs on one thread and
is timed in process CPU time, which the load of a shared machine barely changes (a wall-time ratio on an
oversubscribed machine swings by +-30%); on CUDA in wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    CIFAR_SHAPE,
    NUM_CLASSES,
    Result,
    Settings,
    attribute,
    fmt_ratio,
    make_train_step,
    median,
    ratio,
    synthetic_batch,
    threads,
    time_interleaved,
    train_config,
)
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs
from ddcnn.models.layers import AdaptiveAvgPool2d, SmallMapConv
from ddcnn.train.optim import build_optimizer

NAME = "optimisations"


def _time(candidates: dict[str, Callable[[], object]], settings: Settings, rounds: int) -> dict[str, list[float]]:
    """Interleaved timing: one thread and CPU time on CPU, wall time on CUDA."""
    if settings.cuda:
        return time_interleaved(candidates, settings, rounds)
    with threads(1):
        return time_interleaved(candidates, settings, rounds, clock=time.process_time)


def gather_split(self: Decomposition, x: torch.Tensor) -> torch.Tensor:
    """The replaced :meth:`Decomposition.split` (2D): one advanced-indexing gather, then a permuted copy."""
    rows, cols = (
        torch.stack([torch.arange(a, b, device=x.device) for a, b in windows]) for _, windows in self._axes
    )
    sub = x[:, :, rows[:, None, :, None], cols[None, :, None, :]].permute(0, 2, 3, 1, 4, 5)
    return sub.reshape(x.shape[0], self.num_subdomains, x.shape[1], *self.subimage_shape)


@contextlib.contextmanager
def original_code(model: LocalCNNs) -> Iterator[None]:
    """The model's optimisations off: the model as it was before this work (the optimiser is switched separately)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(attribute(SmallMapConv, "enabled", False))
        stack.enter_context(attribute(model.net, "channels_last", False))
        stack.enter_context(attribute(Decomposition, "split", gather_split))
        for module in model.modules():
            if isinstance(module, AdaptiveAvgPool2d):
                stack.enter_context(attribute(module, "__class__", nn.AdaptiveAvgPool2d))
        yield


def _loop_sgd(model: LocalCNNs) -> torch.optim.Optimizer:
    """The trainer's SGD as torch builds it by default on CPU: a Python loop over the parameters."""
    cfg = train_config()
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        foreach=False,
    )


def _train_step_row(
    label: str,
    grid: tuple[int, int],
    settings: Settings,
    rounds: int,
    before: Callable[[LocalCNNs], contextlib.AbstractContextManager],
    loop_sgd_before: bool = False,
) -> dict[str, str]:
    """Train steps of the batched vgg9 local CNNs inside ``before(model)`` vs as they are."""
    x, y = synthetic_batch(settings)
    model = LocalCNNs("vgg9", Decomposition(grid, CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES).to(settings.device)
    old_step = make_train_step(model, settings, _loop_sgd(model) if loop_sgd_before else None)
    new_step = make_train_step(model, settings)

    def old() -> None:
        with before(model):
            old_step(x, y)

    times = _time({"before": old, "after": partial(new_step, x, y)}, settings, rounds)
    return _row(label, f"train step, {grid[0]}x{grid[1]}", times)


def _row(label: str, scope: str, times: dict[str, list[float]]) -> dict[str, str]:
    return {
        "optimisation": label,
        "measured on": scope,
        "before ms": f"{median(times['before']) * 1e3:.1f}",
        "after ms": f"{median(times['after']) * 1e3:.1f}",
        "speed-up": fmt_ratio(ratio(times["before"], times["after"])),
    }


def _optimizer_row(settings: Settings, rounds: int) -> dict[str, str]:
    """SGD step alone over the parameters of the 4x4 local CNNs: per-parameter loop vs fused."""
    model = LocalCNNs("vgg9", Decomposition((4, 4), CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES).to(settings.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    loop, fused = _loop_sgd(model), build_optimizer(model.named_parameters(), train_config())
    times = _time({"before": loop.step, "after": fused.step}, settings, rounds * 3)
    label = "fused SGD (build_optimizer) vs the default per-parameter loop"
    return _row(label, "optimiser step, 4x4 (9.1M params)", times)


def _layer_rows(settings: Settings, rounds: int) -> list[dict[str, str]]:
    batch, groups = settings.batch_size, 64
    rows = []
    # 1. identity adaptive average pooling skipped (the 8x8 grid's 2x2 feature maps already have the output size)
    x = torch.randn(batch, groups * 128, 2, 2, device=settings.device, requires_grad=True)
    grad = torch.randn_like(x)
    times = _time(
        {
            "before": lambda: F.adaptive_avg_pool2d(x, (2, 2)).backward(grad),
            "after": lambda: (x * 1).backward(grad),  # pass-through; the multiply stands in for the next layer
        },
        settings,
        rounds * 3,
    )
    rows.append(_row("identity adaptive avg-pool skipped", "layer, 8x8 grid feature map", times))
    # 2. the split: one gather vs slicing + stack
    for grid in ((4, 4), (8, 8)):
        d = Decomposition(grid, CIFAR_SHAPE[1:])
        images = synthetic_batch(settings)[0]
        candidates = {"before": partial(gather_split, d, images), "after": partial(d.split, images)}
        times = _time(candidates, settings, rounds * 5)
        rows.append(_row("split by slicing + stack (vs one gather)", f"split of a batch, {grid[0]}x{grid[1]}", times))
    # 3. GroupedLinear: einsum (kept) vs baddbmm, first dense layer of the 4x4 local CNNs
    xl = torch.randn(batch, 16, 512, device=settings.device, requires_grad=True)
    w = torch.randn(16, 256, 512, device=settings.device, requires_grad=True)
    b = torch.randn(16, 256, device=settings.device, requires_grad=True)
    gl = torch.randn(batch, 16, 256, device=settings.device)
    times = _time(
        {
            "before": lambda: torch.baddbmm(b[:, None], xl.transpose(0, 1), w.transpose(1, 2))
            .transpose(0, 1)
            .backward(gl),
            "after": lambda: (torch.einsum("bgi,goi->bgo", xl, w) + b).backward(gl),
        },
        settings,
        rounds * 3,
    )
    rows.append(_row("GroupedLinear einsum (kept) vs baddbmm", "layer, 16 x (512 -> 256)", times))
    return rows


def _threads_row(settings: Settings, rounds: int) -> dict[str, str]:
    """One intra-op thread vs torch's default (all cores), in wall time."""
    x, y = synthetic_batch(settings)
    model = LocalCNNs("vgg9", Decomposition((4, 4), CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES).to(settings.device)
    step = make_train_step(model, settings)

    def one_thread() -> None:
        with threads(1):
            step(x, y)

    times = time_interleaved({"before": one_thread, "after": partial(step, x, y)}, settings, rounds)
    return _row(f"{torch.get_num_threads()} intra-op threads vs 1 (wall time)", "train step, 4x4", times)


def _compile_row(settings: Settings, rounds: int) -> dict[str, str]:
    """``torch.compile`` of the local CNNs: steady-state step and the compile time (the first step, wall time)."""
    x, y = synthetic_batch(settings)
    eager = LocalCNNs("vgg9", Decomposition((4, 4), CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES).to(settings.device)
    compiled_model = LocalCNNs("vgg9", Decomposition((4, 4), CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES)
    compiled_model.to(settings.device).compile()
    compiled = make_train_step(compiled_model, settings)
    start = time.perf_counter()
    compiled(x, y)
    settings.sync()
    compile_seconds = time.perf_counter() - start
    candidates = {"before": partial(make_train_step(eager, settings), x, y), "after": partial(compiled, x, y)}
    times = _time(candidates, settings, rounds)
    return _row(f"torch.compile (inductor; compiling took {compile_seconds:.0f} s)", "train step, 4x4", times)


def run(settings: Settings, compile_model: bool = False) -> Result:
    rounds = settings.rounds(full=5, quick=3)
    result = Result(
        NAME,
        "Optimisations: before/after, measured in this run",
        ["optimisation", "measured on", "before ms", "after ms", "speed-up"],
    )
    grids = [(4, 4)] if settings.quick else [(4, 4), (8, 8)]
    for grid in grids:
        result.rows.append(
            _train_step_row(
                "all of the below, off (the code before this work)",
                grid,
                settings,
                rounds,
                original_code,
                loop_sgd_before=True,
            )
        )
    for grid in grids:
        result.rows.append(
            _train_step_row(
                "small-map convolutions as one bmm (SmallMapConv)",
                grid,
                settings,
                rounds,
                lambda m: attribute(SmallMapConv, "enabled", False),
            )
        )
    result.rows.append(
        _train_step_row(
            "channels-last feature maps", (4, 4), settings, rounds, lambda m: attribute(m.net, "channels_last", False)
        )
    )
    result.rows.append(_optimizer_row(settings, rounds))
    result.rows.extend(_layer_rows(settings, rounds))
    if not settings.cuda:
        result.rows.append(_threads_row(settings, rounds))
    if compile_model:
        result.rows.append(_compile_row(settings, rounds))
    result.notes.append(
        "speed-up: median of per-round ratios before/after (interquartile range in brackets). "
        + ("Timed in wall time." if settings.cuda else "On CPU all rows but the threads row: one thread, CPU time.")
    )
    return result
