"""The cluster benchmark's figures and its table file: time to accuracy against the link rate, the α-β model's
scaling prediction with the measured points on it, and ``table.md`` (docs/scaling.md links it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from cluster_plan import CNN_DNN_2X2, CNN_DNN_4X4, DDP_CONFIGS, Plan
from cluster_report import Point, best_ddp
from cluster_scaling import PROCESSES
from matplotlib import ticker
from netns import rate_text

STYLE = {
    "ddp-none": ("tab:gray", "-"),
    "ddp-fp16": ("tab:blue", "-"),
    "ddp-powersgd": ("tab:purple", "-"),
    "ddp-best": ("black", "-"),
    "cnn_dnn-2x2": ("tab:orange", "--"),
    "cnn_dnn-4x4": ("tab:red", "--"),
}


def unshaped_position(links: dict[tuple[int, float | None], Any], plan: Plan) -> tuple[float, float | None]:
    """Where 'unshaped' sits on a rate axis, and the bandwidth fitted to the unshaped veth links (its label): at
    that bandwidth, but at least 3x the fastest shaped rate, so that it stands apart."""
    fitted = [link.beta * 8 for (k, rate), (link, _) in links.items() if rate is None]
    fastest = max((r for r in plan.rates if r is not None), default=1e9)
    measured = min(fitted) if fitted else None
    return max(3 * fastest, measured or 0.0), measured


def _log_axis(axis: Any, scale: bool = True) -> None:
    """A logarithmic axis with plain numbers on its ticks, minor ones too (a range under a decade has no major
    tick to label)."""
    if scale:
        axis.axes.set_yscale("log")
    axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    axis.set_tick_params(which="minor", labelsize=7)


def time_to_accuracy(points: list[Point], plan: Plan, links: dict, path: Path) -> None:
    """Time to the target against the link rate (log x), one line per configuration, a panel per K; filled markers
    end to end, hollow ones composed."""
    unshaped, veth = unshaped_position(links, plan)
    veth_label = f"unshaped\n(veth, ~{veth / 1e9:.0f} Gbit/s)" if veth else "unshaped"
    fig, axes = plt.subplots(1, len(plan.nodes), figsize=(6.2 * len(plan.nodes), 4.6), squeeze=False)
    for ax, k in zip(axes[0], plan.nodes):
        for config in (*DDP_CONFIGS, CNN_DNN_2X2, CNN_DNN_4X4):
            mine = sorted(
                (p for p in points if p.nodes == k and p.config == config and p.reached.seconds),
                key=lambda p: p.rate or unshaped,
            )
            if not mine:
                continue
            color, line = STYLE[config.key]
            xs = [p.rate or unshaped for p in mine]
            ax.plot(xs, [p.reached.seconds for p in mine], line, color=color, label=config.label)
            for p, x in zip(mine, xs):
                filled = p.reached.how == "end to end"
                ax.plot(x, p.reached.seconds, "o", color=color, markerfacecolor=color if filled else "white")
        ax.set_xscale("log")
        _log_axis(ax.yaxis)
        ticks = [r for r in plan.rates if r is not None] + [unshaped]
        ax.set_xticks(ticks)
        ax.set_xticklabels(
            [rate_text(r).replace(" ", "\n", 1) for r in ticks[:-1]] + [veth_label],
            fontsize=8,
        )
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlabel("link rate per node, each way")
        ax.set_ylabel(f"seconds to {plan.target:.0%} test accuracy")
        ax.set_title(f"K = {k} nodes, one process each")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, title="filled: end to end, hollow: composed", title_fontsize=7)
    fig.suptitle(
        f"Time to accuracy against link speed\nCIFAR-10, {plan.train_images:,} images, vgg9 width 0.5", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling(curves: dict[str, dict[str, list[float]]], points: list[Point], plan: Plan, path: Path) -> None:
    """Left: the model's training throughput against P at each rate (DDP's best variant solid, the CNN-DNN dashed),
    with the measured points. Right: predicted against measured epoch time of every measured point."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.cm.viridis([i / max(1, len(curves) - 1) for i in range(len(curves))])
    methods = (
        ("ddp-best", "-", "best DDP variant"),
        ("cnn_dnn-2x2", "--", "CNN-DNN 2x2"),
        ("cnn_dnn-4x4", ":", "CNN-DNN 4x4"),
    )
    for (rate_label, lines), color in zip(curves.items(), colors):
        left.plot([], [], "-", color=color, linewidth=4, label=rate_label)
        for key, dash, _ in methods:
            if key in lines:
                left.plot(PROCESSES, lines[key], dash, color=color)
        for p in points:
            if rate_text(p.rate) != rate_label:
                continue
            marker = "s" if p.config.is_global else ("^" if p.config == CNN_DNN_2X2 else "v")
            if p.config.is_global and p is not best_ddp(points, p.nodes, p.rate):
                continue
            throughput = plan.train_images / (sum(p.epochs) / len(p.epochs))
            left.plot(
                p.nodes,
                throughput,
                marker,
                color=color,
                markerfacecolor=color if p.nodes == 2 else "white",
                markersize=7,
            )
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("processes P (one per node)")
    left.set_ylabel("training images per second (whole job)")
    left.set_title(
        "alpha-beta model; measured: squares best DDP, triangles CNN-DNN\n"
        "(filled K=2; hollow K=4, 2 processes per core: not the curves' compute)",
        fontsize=9,
    )
    for _, dash, label in methods:
        left.plot([], [], dash, color="black", label=label)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    measured = [sum(p.epochs) / len(p.epochs) for p in points]
    predicted = [sum(p.predicted) / len(p.predicted) for p in points]
    for p, x, y in zip(points, measured, predicted):
        color, _ = STYLE[p.config.key]
        right.plot(x, y, "o" if p.nodes == 2 else "s", color=color, markerfacecolor=color if p.nodes == 2 else "white")
    if measured:
        low, high = min(measured + predicted) / 1.5, max(measured + predicted) * 1.5
        span = [low, high]
        right.plot(span, span, "k-", linewidth=0.8)
        right.fill_between(
            span, [v * 0.8 for v in span], [v * 1.2 for v in span], color="gray", alpha=0.15, label="within 20%"
        )
        right.set_xlim(low, high)
        right.set_ylim(low, high)
    for config in (*DDP_CONFIGS, CNN_DNN_2X2, CNN_DNN_4X4):
        right.plot([], [], "o", color=STYLE[config.key][0], label=config.label)
    right.set_xscale("log")
    right.set_yscale("log")
    _log_axis(right.xaxis, scale=False)
    _log_axis(right.yaxis, scale=False)
    right.set_xlabel("measured training seconds per epoch")
    right.set_ylabel("model's seconds per epoch")
    right.set_title("model against the emulation, every rate (circles K=2, squares K=4)", fontsize=9)
    right.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(
        f"Scaling: beyond P = 4 each process takes 16 images a step (global batch 16 P); "
        f"{plan.train_images:,}-image epoch = images / throughput",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Vendor data sheets (docs/scaling.md gives the sources): dense bf16/fp16 tensor peak, and the NIC per GPU.
CLUSTERS = (
    ("H100 SXM, bf16 dense, 400 Gbit/s NIC", 989e12, 400e9),
    ("H100 SXM, bf16 dense, 100 Gbit/s NIC", 989e12, 100e9),
    ("A100 SXM, bf16 dense, 200 Gbit/s InfiniBand HDR", 312e12, 200e9),
    ("V100 SXM2, fp16 tensor, 25 Gbit/s Ethernet", 125e12, 25e9),
)


def table_markdown(
    result: Any, plan: Plan, process_flops: float | None, crossovers: dict[str, float | None], date: str
) -> str:
    """``table.md``: the goals, the table, the FLOP-per-byte ratio of each emulated rate next to real clusters', the
    model's crossover rates, and the notes."""
    lines = [f"# {result.title}", "", f"_{date}; generated by `make bench-cluster` (benchmarks/cluster.py)_", ""]
    lines += ["## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g.name} | {g.target} | {g.measured} | {'yes' if g.met else '**no**'} |" for g in result.goals]
    lines += [
        "",
        "## Every point",
        "",
        "| " + " | ".join(result.columns) + " |",
        "|" + "|".join("---" for _ in result.columns) + "|",
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in result.columns) + " |" for r in result.rows]
    lines += ["", "## Compute per byte", ""]
    if process_flops:
        lines += [
            (
                f"One process (one core, the global CNN's training step, no communication) computes "
                f"{process_flops / 1e9:.1f} GFLOP/s (model FLOPs)."
            ),
            "",
            "| setting | FLOP/s per process | link bytes/s | FLOP per byte |",
            "|---|---:|---:|---:|",
        ]
        for rate in plan.rates:
            if rate is not None:
                lines.append(
                    f"| emulated, {rate_text(rate)} | {process_flops:.3g} | {rate / 8:.3g} | "
                    f"{process_flops / (rate / 8):,.0f} |"
                )
        for name, flops, bits in CLUSTERS:
            lines.append(f"| {name} | {flops:.3g} | {bits / 8:.3g} | {flops / (bits / 8):,.0f} |")
    if crossovers:
        lines += [
            "",
            "## Crossover (model)",
            "",
            (
                "Link rate below which the model has the CNN-DNN reach the target sooner than every DDP variant "
                "(epochs to the target and the aggregation phase as measured):"
            ),
            "",
        ]
        lines += [
            f"* {name}: " + (f"{rate / 1e6:,.0f} Mbit/s" if rate else "none between 1 Mbit/s and 1 Tbit/s")
            for name, rate in crossovers.items()
        ]
    lines += ["", "## Notes", ""] + [f"* {n}" for n in result.notes]
    return "\n".join(lines) + "\n"
