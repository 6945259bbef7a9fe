"""The tables of ``ddcnn compare`` (its ``results.md``), made from the rows of its ``results.json``: methods by
grids, each cell the mean ± std over the seeds, and a table of parameters, training time and communication; where
the classes are imbalanced (:func:`is_imbalanced`), tables of balanced accuracy and ROC AUC too.
``study/report.py`` builds ``docs/results.md`` from the same functions.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .config import grid_order, parse_grid
from .config.options import LOCAL_OUTPUTS, split_input
from .models.aggregators import list_aggregators
from .train.logs import format_bytes

if TYPE_CHECKING:
    from .compare import CompareConfig

AGGREGATORS = tuple(list_aggregators())
# the methods of `ddcnn compare`, in the order of the tables' rows (each aggregator is a method: the aggregation
# phase of that aggregator)
COMPARE_METHODS = ("global", "local", *AGGREGATORS, "coherent", "transfer")
# Balanced accuracy and ROC AUC are tabulated where the training split's largest class has at least this many times
# the images of its smallest: there, predicting the majority class alone scores its share in accuracy (77% on
# AdrenalMNIST3D), but 1/K in balanced accuracy and 0.5 in AUC. Balanced data sets (CIFAR-10 1.0, MNIST 1.24,
# tf_flowers 1.42) keep the one accuracy table.
IMBALANCE_RATIO = 1.5


def method_order(methods: Iterable[str]) -> list[str]:
    """``methods`` in the order of the tables' rows: that of :data:`COMPARE_METHODS`, each aggregator with an input
    (``dnn:logits``) right after its plain aggregator, in the order of the inputs (probabilities, logits, features);
    names of neither kind last, as they come."""

    def key(method: str) -> tuple[int, int]:
        base, reads = split_input(method)
        if base not in COMPARE_METHODS:
            return len(COMPARE_METHODS), 0
        return COMPARE_METHODS.index(base), 0 if reads is None else 1 + (
            LOCAL_OUTPUTS.index(reads) if reads in LOCAL_OUTPUTS else len(LOCAL_OUTPUTS))

    return sorted(dict.fromkeys(methods), key=key)


def mean_std_cell(values: Sequence[float], fmt: str = "{:.4f}") -> str:
    """A table cell: the mean ± the standard deviation of ``values`` (one value as it is; none: empty). ``fmt``
    formats both; a ``+`` in it signs the mean only, as a standard deviation has no sign."""
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def methods_by_grids(values: dict[str, dict[str, list[float]]], label: str = "method") -> list[str]:
    """A markdown table of :func:`summarize`'s ``{method: {grid: [value per seed]}}``: a row per method, a column
    per grid (in :func:`~ddcnn.config.grid_order`), cells mean ± std over the seeds."""
    grids = sorted({g for cells in values.values() for g in cells}, key=grid_order)
    lines = [f"| {label} | " + " | ".join(grids) + " |", "|---|" + "---:|" * len(grids)]
    for method, cells in values.items():
        lines.append(f"| {method} | " + " | ".join(mean_std_cell(cells.get(g, [])) for g in grids) + " |")
    return lines


def per_seed(rows: Sequence[dict[str, Any]], key: str = "test_accuracy") -> dict[tuple[str, str], dict[int, float]]:
    """``{(method, grid): {seed: value}}``; for ``local``, each seed's mean over the grid's subdomains (the coarse
    level's row, ``--coarse``, apart: so that ``local`` means the same with and without it)."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for row in rows:
        if row.get(key) is not None and not row.get("coarse"):
            values[row["method"], row["grid"], row["seed"]].append(float(row[key]))
    out: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for (method, grid, seed), seed_values in values.items():
        out[method, grid][seed] = statistics.mean(seed_values)
    return out


def summarize(rows: Sequence[dict[str, Any]], key: str = "test_accuracy") -> dict[str, dict[str, list[float]]]:
    """``{method: {grid: [value per seed]}}``; for ``local``, each seed's mean over the subdomains."""
    out: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for (method, grid), seeds in per_seed(rows, key).items():
        out[method][grid] = list(seeds.values())
    return {m: out[m] for m in method_order(out) if split_input(m)[0] in COMPARE_METHODS}


_NOTES = {
    "local": "local CNNs: the mean of the subdomains' own accuracies (each local CNN alone); per subdomain in "
    "results.json and subdomains.png",
}


def is_imbalanced(class_counts: Sequence[int] | None) -> bool:
    """Whether the classes of ``class_counts`` (training images per class) are imbalanced enough for balanced
    accuracy and AUC tables (:data:`IMBALANCE_RATIO`); None (not recorded): no."""
    counts = [int(c) for c in class_counts or ()]
    return len(counts) > 1 and max(counts) >= IMBALANCE_RATIO * max(min(counts), 1)


def imbalance_markdown(rows: Sequence[dict[str, Any]], class_counts: Sequence[int]) -> list[str]:
    """Tables of test balanced accuracy and ROC AUC (methods by grids) for imbalanced classes, with what predicting
    the majority class alone would score."""
    counts = [int(c) for c in class_counts]
    shares = "/".join(f"{100 * c / sum(counts):.0f}" for c in counts)
    return [
        "",
        "## Balanced accuracy and ROC AUC",
        "",
        (
            f"The classes are imbalanced (training images per class {', '.join(map(str, counts))}: {shares}%), so "
            f"accuracy alone misleads: predicting the majority class scores about {max(counts) / sum(counts):.2f} "
            f"accuracy, but {1 / len(counts):.2f} balanced accuracy (the mean of the per-class recalls) and 0.5 ROC "
            "AUC (of the positive class's probability; for more classes the macro mean of one-vs-rest AUCs). local: "
            "the mean of the local CNNs' own numbers."
        ),
        "",
        *methods_by_grids(summarize(rows, "test_balanced_accuracy"), label="balanced accuracy"),
        "",
        *methods_by_grids(summarize(rows, "test_auc"), label="ROC AUC"),
    ]


def results_markdown(
    rows: Sequence[dict[str, Any]], cc: CompareConfig, dataset: str, class_counts: Sequence[int] | None = None
) -> str:
    """The paper-style table (methods by grids, mean ± std over seeds) and a table of parameters and time; where
    ``class_counts`` (training images per class) are imbalanced, tables of balanced accuracy and AUC between them."""
    accuracy = summarize(rows)
    seeds = len(cc.seeds)
    stats = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    local_width = "" if cc.model.local_width is None else f", local CNNs {cc.model.local_width}"
    balance = {"class weights": (cc.train.class_weights, "none"), "sampler": (cc.train.sampler, "uniform")}
    balancing = "".join(f"; {name}: {value}" for name, (value, default) in balance.items() if value != default)
    coarse = ", with the coarse level (one more local CNN on the whole image, --coarse)" if cc.model.coarse else ""
    lines = [
        f"# {dataset}: test accuracy ({stats})",
        "",
        f"backbone {cc.model.backbone} (width {cc.model.width}{local_width}){coarse}, epochs: global "
        f"{cc.phase_epochs('global')}, local {cc.phase_epochs('local')}, aggregators "
        f"{cc.phase_epochs('aggregator')}, coherent and transfer {cc.phase_epochs('coherent')}; aggregator inputs: "
        f"{cc.aggregator_inputs}, the local {_reads(cc)}{balancing}.",
        "",
        *methods_by_grids(accuracy),
        "",
        *(f"- {m}: {note}" for m, note in _NOTES.items() if m in accuracy),
    ]
    if is_imbalanced(class_counts):
        lines += imbalance_markdown(rows, class_counts)

    parameters, phase_seconds, total_seconds = summarize(rows, "parameters"), summarize(rows, "train_seconds"), \
        summarize(rows, "total_train_seconds")
    model_parallel, data_parallel = summarize(rows, "model_parallel_bytes_per_step"), \
        summarize(rows, "data_parallel_bytes_per_step")
    lines += [
        "",
        "## Parameters, training time and communication",
        "",
        "| method | grid | parameters | training s (own phase) | training s (incl. local phase) "
        "| sent per step, model parallel | all-reduced per step, data parallel |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for method, cells in parameters.items():
        for grid in sorted(cells, key=grid_order):
            params = int(cells[grid][0])
            if method == "local":
                coarse = f" + coarse {params:,}" if cc.model.coarse else ""  # --coarse: one more local CNN
                params_text = f"{math.prod(parse_grid(grid))} x {params:,}{coarse}"
            else:
                params_text = f"{params:,}"
            lines.append(
                f"| {method} | {grid} | {params_text} | {mean_std_cell(phase_seconds[method][grid], '{:.1f}')} | "
                f"{mean_std_cell(total_seconds.get(method, {}).get(grid, []), '{:.1f}')} | "
                f"{_bytes_cell(model_parallel, method, grid)} | {_bytes_cell(data_parallel, method, grid)} |"
            )
    lines += [
        "",
        "Training time is wall-clock seconds of the training epochs (evaluation excluded). *Own phase*: the local "
        "phase for local (all local CNNs at once, so the same for every subdomain); for dnn, linear and attention, "
        "computing "
        "the frozen local CNNs' training inputs plus training the aggregator; for weighted, the local CNNs on the "
        "validation split plus the fit; mean, logmean and vote need no training (0). *Incl. local phase*: the same "
        "plus the local phase the aggregator or transfer learning starts from. Parameters of an aggregator's row and "
        "of coherent and transfer are the whole CNN-DNN's (local CNNs plus aggregator).",
        "",
        "Communication per training step (docs/distributed.md), with the batch of the whole job: *model parallel*, "
        "the subdomains spread over the processes (`torchrun ... --parallel model`): nothing for the local CNNs, "
        "the batch's local probabilities (B*N*K floats, forward only) for coherent and transfer; the aggregators "
        "train on every process on inputs gathered once (N*K numbers per image); one CNN (global) is data parallel "
        "either way. *Data parallel*, the baseline (`--parallel data`): an all-reduce of every trained parameter.",
        "",
    ]
    return "\n".join(lines)


def _reads(cc: CompareConfig) -> str:
    """What the trained aggregators without an input of their own read, in words (``--local-output``); an
    aggregator with one (``dnn:features``) says it in its row's name."""
    if cc.model.local_output != "features":
        return cc.model.local_output
    dim = "all channels" if cc.model.feature_dim is None else f"{cc.model.feature_dim} a subdomain"
    return f"pooled features ({dim})"


def _bytes_cell(values: dict[str, dict[str, list[float]]], method: str, grid: str) -> str:
    """A volume in bytes from :func:`summarize`'s ``values`` (the same for every seed)."""
    cell = values.get(method, {}).get(grid)
    return format_bytes(cell[0]) if cell else ""
