"""The cluster benchmark's result (``cluster.py``): its table, goals and notes, from the saved measurements."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from cluster_measure import point_name
from cluster_model import (
    TimeToTarget,
    compose,
    epoch_seconds,
    fit_link,
    predicted_bytes_per_epoch,
    predicted_epochs,
    probe_compute,
    time_to_target,
    training_flops_per_image,
)
from cluster_plan import CNN_DNN_2X2, CNN_DNN_4X4, DDP_CONFIGS, Config, Plan, Store, configs
from common import Goal, Result
from netns import rate_text

from ddcnn.scaling import Link
from ddcnn.train.logs import format_bytes

NAME = "cluster"
MODEL_TOLERANCE = 0.20
GOAL_SPEEDUPS = ((100e6, 2.0), (1e9, 1.3), (None, 1.0))  # the goals: rate, CNN-DNN vs best DDP
COLUMNS = [
    "nodes",
    "configuration",
    "link",
    "time to target s",
    "how",
    "epochs",
    "test accuracy",
    "vs best DDP",
    "epoch s",
    "model epoch s",
    "model error",
    "counted per epoch",
    "model link bytes per epoch",
    "measured tx per epoch",
    "GFLOP/s per process",
    "aggregation s",
]


@dataclass
class Point:
    """One measured (nodes, configuration, rate) with what is derived from it."""

    nodes: int
    config: Config
    rate: float | None
    data: dict[str, Any]
    reached: TimeToTarget
    epochs: list[float]  # measured training seconds of each epoch it trained
    predicted: list[float]  # the model's, of the same epochs
    reference: dict[str, Any]  # the end-to-end run of the same configuration and K that composed points use

    @property
    def model_error(self) -> float:
        return sum(self.predicted) / sum(self.epochs) - 1


def collect(plan: Plan, store: Store) -> tuple[list[Point], dict[tuple[int, float | None], tuple[Link, float]]]:
    """Every finished point of ``plan`` in ``store``, and the fitted link of every (nodes, rate) measured."""
    points, links = [], {}
    for k in plan.nodes:
        for rate in plan.rates:
            compute = store.get(point_name(k, rate, "probe"))
            if compute is None:
                continue
            links[k, rate] = fit_link(compute["sweep"], k)
            link = links[k, rate][0]
            for config in configs(k):
                data = store.get(point_name(k, rate, config.key))
                reference = store.get(point_name(k, None, config.key))
                if data is None or reference is None:
                    continue
                measured = epoch_seconds(data["records"])
                predicted = predicted_epochs(config, plan, compute, link, k, len(measured))
                reached = time_to_target(data, reference, plan.target)
                points.append(Point(k, config, rate, data, reached, measured, predicted, reference))
    return points, links


def best_ddp(points: list[Point], nodes: int, rate: float | None) -> Point | None:
    """The DDP variant that reached the target soonest at (nodes, rate)."""
    reached = [
        p
        for p in points
        if p.nodes == nodes and p.rate == rate and p.config.is_global and p.reached.seconds is not None
    ]
    return min(reached, key=lambda p: p.reached.seconds) if reached else None


def _mean(values: list[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.mean(present) if present else None


def row(point: Point, points: list[Point], plan: Plan) -> dict[str, Any]:
    records, config, k = point.data["records"], point.config, point.nodes
    seconds = point.reached.seconds
    best = best_ddp(points, k, point.rate)
    versus = ""
    if not config.is_global and best is not None and seconds is not None:
        versus = f"{best.reached.seconds / seconds:.2f}x ({best.config.label.split(', ', 1)[-1]})"
    counted = _mean([r["comm_bytes_per_epoch"] for r in records])
    _, link_bytes = predicted_bytes_per_epoch(config, plan, k, len(records))
    flops = training_flops_per_image(config.grid) * plan.train_images / k  # per process per epoch
    aggregation = _mean([r["aggregation_seconds"] for r in records]) if not config.is_global else None
    return {
        "nodes": k,
        "configuration": config.label,
        "link": rate_text(point.rate),
        "time to target s": f"{seconds:.1f}" if seconds is not None else f"not reached in {plan.epochs} epochs",
        "how": point.reached.how,
        "epochs": point.reached.epochs or "",
        "test accuracy": f"{point.reached.accuracy:.3f}" if point.reached.accuracy is not None else "",
        "vs best DDP": versus,
        "epoch s": f"{statistics.mean(point.epochs):.2f}",
        "model epoch s": f"{statistics.mean(point.predicted):.2f}",
        "model error": f"{point.model_error:+.0%}",
        "counted per epoch": format_bytes(counted or 0),
        "model link bytes per epoch": format_bytes(link_bytes),
        "measured tx per epoch": format_bytes(_mean([r.get("tx_bytes") for r in records]) or 0),
        "GFLOP/s per process": f"{flops / statistics.mean(point.epochs) / 1e9:.1f}",
        "aggregation s": f"{aggregation:.2f}" if aggregation is not None else "",
    }


def goals(points: list[Point], plan: Plan) -> list[Goal]:
    """The issue's goals: the CNN-DNN against the best DDP variant at 100 Mbit/s, 1 Gbit/s and unshaped, for each
    grid on each K; and the model within 20% of every measured point."""
    result = []
    for k in plan.nodes:
        for grid_config in (CNN_DNN_2X2, *((CNN_DNN_4X4,) if k >= 4 else ())):
            for rate, wanted in GOAL_SPEEDUPS:
                name = f"K={k}, {grid_config.label} vs the best DDP variant, {rate_text(rate)}"
                target = f">= {wanted}x sooner to {plan.target:.0%}"
                ours = next((p for p in points if p.nodes == k and p.rate == rate and p.config == grid_config), None)
                best = best_ddp(points, k, rate)
                if ours is None or best is None or ours.reached.seconds is None:
                    missing = "not measured" if ours is None or best is None else "target not reached by the CNN-DNN"
                    result.append(Goal(name, target, missing, False))
                    continue
                speedup = best.reached.seconds / ours.reached.seconds
                how = "end to end" if ours.reached.how == best.reached.how == "end to end" else "composed"
                measured = (
                    f"{speedup:.2f}x ({best.config.label}: {best.reached.seconds:.1f} s in "
                    f"{best.reached.epochs} epochs; ours {ours.reached.seconds:.1f} s in "
                    f"{ours.reached.epochs}; {how})"
                )
                if speedup < wanted:
                    measured += f"; missed by {wanted / speedup:.2f}x"
                result.append(Goal(name, target, measured, speedup >= wanted))
    if points:
        worst = max(points, key=lambda p: abs(p.model_error))
        where = f"K={worst.nodes} {worst.config.label} at {rate_text(worst.rate)}"
        result.append(
            Goal(
                "scaling model: predicted vs measured epoch time, every measured point",
                f"within {MODEL_TOLERANCE:.0%}",
                f"worst {worst.model_error:+.0%} ({where}) of {len(points)} points; median "
                f"{statistics.median(abs(p.model_error) for p in points):.0%}",
                abs(worst.model_error) <= MODEL_TOLERANCE,
            )
        )
    return result


def composition_checks(points: list[Point], plan: Plan) -> list[str]:
    """At every end-to-end point but the unshaped references: the time to the target composed from its first
    epochs (as at the composed points) against the measured one; and whether the accuracy curves of one
    configuration agree across the rates (they should: same seed)."""
    lines = []
    for p in points:
        if not p.data["end_to_end"] or p.reached.seconds is None or p.rate is None:  # unshaped: the reference
            continue
        first = p.data["records"][: plan.measure_epochs(p.config)]
        composed = compose(first, p.reached.epochs, p.reference["records"])
        lines.append(f"K={p.nodes} {p.config.label} {rate_text(p.rate)}: {composed / p.reached.seconds - 1:+.0%}")
    curves = []
    for k in plan.nodes:
        for config in configs(k):
            runs = [p for p in points if p.nodes == k and p.config == config and p.data["end_to_end"]]
            if len(runs) > 1:
                differences = [
                    abs(a["test_accuracy"] - b["test_accuracy"])
                    for p in runs[1:]
                    for a, b in zip(runs[0].data["records"], p.data["records"])
                ]
                curves.append(f"K={k} {config.label}: {max(differences):.4f}")
    notes = []
    if lines:
        notes.append(
            "Composition checked at the end-to-end points (composed from the first epochs, as at the "
            "composed points, against the measured time to the target): " + "; ".join(lines) + "."
        )
    if curves:
        notes.append(
            "The accuracy after each epoch does not depend on the link: largest difference of the test "
            "accuracies of the end-to-end runs of one configuration at different rates: " + "; ".join(curves) + "."
        )
    return notes


def link_notes(
    store: Store, links: dict[tuple[int, float | None], tuple[Link, float]], points: list[Point]
) -> list[str]:
    lines = []
    for (k, rate), (link, residual) in links.items():
        checked = store.get(point_name(k, rate, "link"))
        stream = f", one TCP stream {checked['measured_bps'] / 1e6:.4g} Mbit/s" if checked else ""
        counters = [q for p in points if p.nodes == k and p.rate == rate for q in p.data["qdisc"].values()]
        shaped = ""
        if counters:
            sent, drops = sum(q["bytes"] for q in counters), sum(q["drops"] for q in counters)
            shaped = f", tbf passed {sent / 1e6:,.0f} MB and dropped {drops:,} packets in training"
        lines.append(
            f"K={k} {rate_text(rate)}: alpha {link.alpha * 1e6:.0f} us, beta {link.beta * 8 / 1e6:.4g} "
            f"Mbit/s (within {residual:.0%}){stream}{shaped}"
        )
    return [
        "Links: alpha per ring step (from the 4-byte all-reduce) and beta (fitted to the all-reduces of 64 KiB "
        "to 4 MiB, the largest error of the fit in brackets) of the gloo all-reduce sweep at each rate, one TCP "
        "stream from node 1 to node 0 (the shaping check), and tc's counters of all shaped egresses during the "
        "trainings: " + "; ".join(lines) + "."
    ]


def accuracy_notes(points: list[Point], plan: Plan) -> list[str]:
    notes = []
    for p in points:
        if p.rate is None:
            curve = "; ".join(f"{r['test_accuracy']:.1%}" for r in p.data["records"])
            notes.append(f"K={p.nodes} {p.config.label}, test accuracy after each epoch: {curve}.")
    return notes


def result(plan: Plan, store: Store, quick: bool) -> tuple[Result, list[Point], dict]:
    points, links = collect(plan, store)
    title = (
        f"Time to {plan.target:.0%} test accuracy on an emulated cluster (CIFAR-10, {plan.train_images:,} "
        f"images, vgg9 width 0.5, one process x one thread per node)"
    )
    out = Result(NAME, title, COLUMNS)
    order = {c.key: i for i, c in enumerate((*DDP_CONFIGS, CNN_DNN_2X2, CNN_DNN_4X4))}
    rates = {r: i for i, r in enumerate(plan.rates)}
    for p in sorted(points, key=lambda p: (p.nodes, rates[p.rate], order[p.config.key])):
        out.rows.append(row(p, points, plan))
    out.goals = goals(points, plan)
    out.notes += [
        (
            "Each node is a Linux network namespace with a veth link to a bridge, shaped with tc tbf to the rate in both "
            "directions (benchmarks/netns.py); one torchrun agent per node, c10d rendezvous at node 0, gloo, "
            "OMP_NUM_THREADS=1. K=4 runs 4 processes on the machine's "
            f"{_cores()} cores: each process gets about half a core, so its compute is slower than at K=2 and the "
            "links count relatively less."
        ),
        (
            f"Time to target: training seconds (and for the CNN-DNN the aggregation phase at that epoch) until the first "
            f"epoch whose test accuracy on {plan.test_images:,} test images reaches {plan.target:.0%}, schedule of "
            f"{plan.epochs} epochs. 'end to end': trained to the target at that rate; 'composed': the epochs to the "
            "target of the end-to-end run of the same configuration and K (unshaped); the epochs this point trained "
            "(one; PowerSGD's until it compresses throughout) as measured, each later one as that run's epoch plus "
            "what the link added to the last measured epoch; plus the aggregation phase measured at this rate."
        ),
        (
            "Bytes per epoch: 'counted' is ddcnn's accounting (the volume of the all-reduces, every step); 'model link "
            "bytes' what a ring sends through each process's link (2(P-1)/P of it); 'measured tx' what node 0's "
            "interface sent during the epoch's training steps (kernel counter, headers included)."
        ),
        (
            "Model epoch s: ddcnn.scaling's prediction from the compute probe (each process's step timed with no "
            "communication, all processes at once) and alpha, beta fitted at that rate; 'model error' is "
            "predicted / measured - 1 over the epochs the point trained."
        ),
    ]
    out.notes += link_notes(store, links, points) + composition_checks(points, plan) + accuracy_notes(points, plan)
    if quick:
        out.notes.append("--quick: a smoke test on a few hundred images; its numbers mean nothing.")
    return out, points, links


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def process_flops(store: Store, plan: Plan) -> float | None:
    """FLOP/s of one process's training step with no communication (the unshaped compute probe of the global CNN
    under plain DDP, on 2 nodes where measured: one process per core): what the cores compute, against which a
    link's bytes/s are set."""
    nodes = 2 if 2 in plan.nodes else plan.nodes[0]
    compute = store.get(point_name(nodes, None, "probe"))
    if compute is None:
        return None
    step = probe_compute(compute, DDP_CONFIGS[0])
    return training_flops_per_image((1, 1)) * (plan.batch / nodes) / step.total
