"""The α-β model beyond the emulation: the training throughput of DDP and of the CNN-DNN for P = 2 to 1024
processes at each emulated link rate, from the compute measured on two nodes (one process per core), and the link
rate at which the CNN-DNN's time to the target equals the best DDP variant's."""

from __future__ import annotations

import math
from typing import Any

from cluster_model import gradient_shapes, probe_compute
from cluster_plan import DDP_CONFIGS, Config, Plan

from ddcnn import scaling
from ddcnn.scaling import Link, StepCompute

PROCESSES = tuple(2**i for i in range(1, 11))  # 2 .. 1024
PER_PROCESS_BATCH = 16  # beyond P = 4: weak scaling at the emulation's 4-node share of a batch of 64


def global_batch(plan: Plan, processes: int) -> int:
    """The batch of the whole job at ``processes``: the emulation's (64) up to P = 4, where each process takes 16;
    beyond, 16 per process (the global batch grows with P, as data-parallel training at scale does)."""
    return max(plan.batch, PER_PROCESS_BATCH * processes)


def _per_image(step: StepCompute, images: float) -> StepCompute:
    return StepCompute(step.forward / images, step.backward / images, step.optimizer)


def ddp_throughput(config: Config, plan: Plan, compute: dict[str, Any], link: Link, processes: int) -> float:
    """Images per second of the whole job: DDP with ``config.hook`` (compressing throughout), each process on its
    share of the batch at the compute probe's speed (of two nodes in the benchmark: one process per core)."""
    batch = global_batch(plan, processes)
    per_image = _per_image(probe_compute(compute, config), plan.batch / compute["world_size"])
    share = batch / processes
    step_compute = StepCompute(per_image.forward * share, per_image.backward * share, per_image.optimizer)
    step_buckets = scaling.ddp_buckets(gradient_shapes((1, 1)), config.hook, powersgd_rank=plan.powersgd_rank)
    return batch / scaling.ddp_step_seconds(step_compute, step_buckets, processes, link)


def cnn_dnn_throughput(grid: tuple[int, int], plan: Plan, compute: dict[str, Any], link: Link, processes: int) -> float:
    """Images per second of the CNN-DNN's local phase: model parallel up to P = N, then each local CNN data
    parallel over P/N processes (plain all-reduces of one local CNN's gradients)."""
    n = math.prod(grid)
    batch = global_batch(plan, processes)
    share = probe_compute(compute, Config(grid))  # one process's local CNNs of the probe's K, on whole batches
    whole = _per_image(share.scaled(n / scaling.subdomains_per_process(n, compute["world_size"])), plan.batch)
    step_compute = StepCompute(whole.forward * batch, whole.backward * batch, whole.optimizer)
    local = scaling.ddp_buckets(gradient_shapes(grid))
    seconds = scaling.cnn_dnn_epoch_seconds(1, step_compute, n, processes, link, local, epoch_messages=0)
    return batch / seconds


def curves(
    plan: Plan, compute: dict[str, Any], links: dict[str, Link], grids: tuple[tuple[int, int], ...]
) -> dict[str, dict[str, list[float]]]:
    """For each rate (by its label): the throughput at every P of :data:`PROCESSES` of each DDP variant, of the
    best of them, and of each CNN-DNN grid."""
    result = {}
    for rate, link in links.items():
        lines = {c.key: [ddp_throughput(c, plan, compute, link, p) for p in PROCESSES] for c in DDP_CONFIGS}
        lines["ddp-best"] = [max(values) for values in zip(*(lines[c.key] for c in DDP_CONFIGS))]
        for grid in grids:
            lines[Config(grid).key] = [cnn_dnn_throughput(grid, plan, compute, link, p) for p in PROCESSES]
        result[rate] = lines
    return result


def predicted_time_to_target(
    config: Config,
    plan: Plan,
    compute: dict[str, Any],
    link: Link,
    processes: int,
    epochs: int,
    aggregation_compute: float = 0.0,
) -> float:
    """The model's time to the target at ``processes`` processes: ``epochs`` epochs of the emulation's plan (all at
    the rate of compressed steps, PowerSGD's plain first steps included), plus for the CNN-DNN the aggregation
    phase's ``aggregation_compute`` seconds and its gather."""
    from cluster_model import predicted_epochs

    seconds = sum(predicted_epochs(config, plan, compute, link, processes, epochs))
    if not config.is_global:
        n = math.prod(config.grid)
        seconds += scaling.aggregation_seconds(
            plan.train_images, n, 10, processes, link, probabilities_seconds=0.0, aggregator_seconds=aggregation_compute
        )
    return seconds


def crossover_rate(
    cnn_dnn: Config,
    plan: Plan,
    compute: dict[str, Any],
    alpha: float,
    processes: int,
    epochs: dict[str, int],
    aggregation_compute: float,
) -> float | None:
    """The link rate (bit/s) below which the model has the CNN-DNN reach the target sooner than every DDP variant,
    between 1 Mbit/s and 1 Tbit/s (bisection on the rate's logarithm); None where it wins or loses throughout."""

    def advantage(log_rate: float) -> float:
        link = Link(alpha, 10**log_rate / 8)
        ours = predicted_time_to_target(
            cnn_dnn, plan, compute, link, processes, epochs[cnn_dnn.key], aggregation_compute
        )
        best = min(
            predicted_time_to_target(c, plan, compute, link, processes, epochs[c.key])
            for c in DDP_CONFIGS
            if c.key in epochs
        )
        return best / ours - 1  # > 0: the CNN-DNN is sooner

    low, high = 6.0, 12.0
    if advantage(low) <= 0 or advantage(high) >= 0:
        return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if advantage(middle) > 0 else (low, middle)
    return 10 ** ((low + high) / 2)
