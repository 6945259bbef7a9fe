"""From the cluster benchmark's measurements to its numbers: the α-β fit of each link, the time to the target of
every point (end to end, or composed from its first epochs and the accuracy curve of the same configuration run to the
target), and what the α-β model of ``ddcnn.scaling`` predicts for every measured epoch and for P up to 1024."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from bench_flops import count_training_flops
from cluster_plan import BACKBONE, WIDTH, Config, Plan
from common import CIFAR_SHAPE, NUM_CLASSES, Settings, attribute

from ddcnn import scaling
from ddcnn.decomposition import Decomposition
from ddcnn.models import LocalCNNs
from ddcnn.models.layers import SmallMapConv
from ddcnn.scaling import Link, StepCompute

# -- the links --------------------------------------------------------------------------------------------------


def fit_link(rows: list[dict[str, float]], processes: int) -> tuple[Link, float]:
    """α and β from an all-reduce sweep, read as a ring: α from the smallest message (``2(P-1) α``, latency only),
    β by least squares of relative errors (each size counts alike) on the messages of 64 KiB and more (their seconds
    less the latency, against the ring's ``2(P-1)/P`` of their bytes), the sizes that gradients are. Below the tbf
    bucket (64 KiB) a shaped link passes a message at the veth's speed, so smaller ones say nothing of β. Also the
    largest relative error of the fitted times over those sizes."""
    steps = 2 * (processes - 1)
    alpha = min(rows, key=lambda r: r["bytes"])["seconds"] / steps
    large = [r for r in rows if r["bytes"] >= 64 * 1024] or rows
    x = [scaling.ring_allreduce_bytes(r["bytes"], processes) for r in large]
    y = [max(r["seconds"] - steps * alpha, 1e-9) for r in large]
    per_byte = sum(a / b for a, b in zip(x, y)) / sum((a / b) ** 2 for a, b in zip(x, y))
    link = Link(alpha, 1 / max(per_byte, 1e-15))
    residual = max(abs(scaling.ring_allreduce_seconds(r["bytes"], processes, link) / r["seconds"] - 1) for r in large)
    return link, residual


# -- the models' sizes and FLOPs --------------------------------------------------------------------------------


def local_cnns(grid: tuple[int, int]) -> LocalCNNs:
    return LocalCNNs(BACKBONE, Decomposition(grid, CIFAR_SHAPE[1:]), CIFAR_SHAPE[0], NUM_CLASSES, WIDTH)


def gradient_shapes(grid: tuple[int, int]) -> list[tuple[int, ...]]:
    """The parameter shapes DDP's buckets hold: the global CNN's (``1x1``), or one local CNN's."""
    model = local_cnns(grid)
    if grid != (1, 1):
        model = model.subset([0])
    return [tuple(p.shape) for p in model.parameters()]


def training_flops_per_image(grid: tuple[int, int]) -> float:
    """Model FLOPs of training on one image (forward and backward, 3x the forward; every convolution counted as a
    direct one, as ``bench_flops.py`` does) through the global CNN or all local CNNs of ``grid``."""
    x = torch.randn(2, *CIFAR_SHAPE)
    with attribute(SmallMapConv, "enabled", False):
        return count_training_flops(local_cnns(grid).eval(), x, Settings()) / len(x)


# -- measured numbers of one point ------------------------------------------------------------------------------


def epoch_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Each epoch's training seconds (the records hold them cumulated)."""
    total = [r["train_seconds"] for r in records]
    return [b - a for a, b in zip([0.0, *total], total)]


def epochs_to_target(records: list[dict[str, Any]], target: float) -> int | None:
    return next((r["epoch"] for r in records if r["test_accuracy"] >= target), None)


@dataclass
class TimeToTarget:
    seconds: float | None  # None: not reached within the schedule
    epochs: int | None
    accuracy: float | None
    how: str  # "end to end" or "composed"


def time_to_target(point: dict[str, Any], reference: dict[str, Any], target: float) -> TimeToTarget:
    """End to end: the training (and, for the CNN-DNN, aggregation) seconds until the first epoch at the target.
    Composed: the reference run's epochs to the target (same configuration and K, same seed, so the same accuracy
    after every epoch whatever the link), timed by :func:`compose`."""
    records = point["records"]
    if point["end_to_end"]:
        epochs = epochs_to_target(records, target)
        if epochs is None:
            return TimeToTarget(None, None, None, "end to end")
        record = records[epochs - 1]
        return TimeToTarget(record["seconds"], epochs, record["test_accuracy"], "end to end")
    epochs = epochs_to_target(reference["records"], target)
    if epochs is None:
        return TimeToTarget(None, None, None, "composed")
    seconds = compose(records, epochs, reference["records"])
    return TimeToTarget(seconds, epochs, reference["records"][epochs - 1]["test_accuracy"], "composed")


def compose(records: list[dict[str, Any]], epochs: int, reference: list[dict[str, Any]]) -> float:
    """Seconds to the end of epoch ``epochs`` from the first epochs measured at this rate (``records``) and the
    reference run trained further (``reference``, of the same configuration at another rate): the measured epochs
    as they are; each later epoch as the reference's same epoch plus what the link added to the last measured one
    (this point's last epoch less the reference's same epoch: the link costs every epoch alike, and the first
    epoch's warm-up is then counted once); plus the aggregation phase measured at this rate."""
    times, base = epoch_seconds(records), epoch_seconds(reference)
    m = len(times)
    train = sum(times[:epochs])
    if epochs > m:
        extra = times[-1] - base[m - 1]
        train += sum(base[m:epochs]) + (epochs - m) * extra
    return train + records[-1]["aggregation_seconds"]


# -- the α-β model of one point ---------------------------------------------------------------------------------


def probe_compute(compute: dict[str, Any], config: Config) -> StepCompute:
    """The compute probe's step of ``config``: forward, backward and optimizer of the slowest rank (medians),
    scaled to what a step costs in training. DDP's steps are synchronous, so each costs the slowest rank's step time
    of that step (the expected maximum over the ranks); the CNN-DNN's processes wait for each other only at the end
    of the epoch, so a step costs the slowest rank's mean."""
    row = next(r for r in compute["compute"] if r["label"] == config.key)
    ranks = row["ranks"]
    median = StepCompute(*(max(rank[part] for rank in ranks) for part in ("forward", "backward", "optimizer")))
    if not all("totals" in rank for rank in ranks):
        return median
    totals = [rank["totals"] for rank in ranks]
    step = scaling.expected_maximum(totals) if config.is_global else max(statistics.mean(t) for t in totals)
    return median.scaled_to(step)


def _global_epochs(
    config: Config, plan: Plan, compute: dict[str, Any], link: Link, processes: int, epochs: int
) -> list[float]:
    shapes = gradient_shapes((1, 1))
    spe = plan.steps_per_epoch
    hooked = scaling.ddp_buckets(shapes, config.hook, powersgd_rank=plan.powersgd_rank)
    plain = scaling.ddp_buckets(shapes, "none")
    step = scaling.ddp_step_seconds(probe_compute(compute, config), hooked, processes, link)
    plain_step = scaling.ddp_step_seconds(probe_compute(compute, Config((1, 1))), plain, processes, link)
    metrics = scaling.ring_allreduce_seconds(16, processes, link)
    start = plan.powersgd_start() if config.hook == "powersgd" else 0
    result = []
    for e in range(epochs):
        plain_steps = min(spe, max(0, start - e * spe))
        result.append(plain_steps * plain_step + (spe - plain_steps) * step + metrics)
    return result


def predicted_epochs(
    config: Config, plan: Plan, compute: dict[str, Any], link: Link, processes: int, epochs: int
) -> list[float]:
    """The model's training seconds of each of the first ``epochs`` epochs of ``config`` on ``processes``
    processes over ``link``, from the compute probe."""
    if config.is_global:
        return _global_epochs(config, plan, compute, link, processes, epochs)
    n = math.prod(config.grid)
    share = probe_compute(compute, config)  # one process's local CNNs: ceil(N/P) of them
    whole = share.scaled(n / scaling.subdomains_per_process(n, processes))
    seconds = scaling.cnn_dnn_epoch_seconds(plan.steps_per_epoch, whole, n, processes, link)
    return [seconds] * epochs


def predicted_bytes_per_epoch(config: Config, plan: Plan, processes: int, epochs: int) -> tuple[float, float]:
    """What the model says an epoch of DDP sends, on average over the first ``epochs`` (PowerSGD's plain first
    steps included): the volume of the all-reduces (what ddcnn counts) and the bytes through each process's link
    (a ring's 2(P-1)/P of it); zero for the CNN-DNN's local phase."""
    if not config.is_global:
        return 0.0, 0.0

    def per_step(hook: str) -> list[int]:
        step_buckets = scaling.ddp_buckets(gradient_shapes((1, 1)), hook, powersgd_rank=plan.powersgd_rank)
        return [m for b in step_buckets for m in b.messages]

    spe, start = plan.steps_per_epoch, plan.powersgd_start() if config.hook == "powersgd" else 0
    plain_steps = sum(min(spe, max(0, start - e * spe)) for e in range(epochs)) / epochs
    volume = link = 0.0
    for messages, steps in ((per_step("none"), plain_steps), (per_step(config.hook), spe - plain_steps)):
        volume += steps * sum(messages)
        link += steps * sum(scaling.ring_allreduce_bytes(m, processes) for m in messages)
    return volume, link
