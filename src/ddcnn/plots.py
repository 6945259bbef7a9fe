"""Plots written to the run folder (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .config import grid_order  # noqa: E402
from .checkpoint import atomic_file  # noqa: E402


def _save(fig: Any, path: Path, **options: Any) -> None:
    """Write ``fig`` as a PNG atomically (a full disk leaves the previous plot, never a 0-byte one) and close it."""
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", **options)
    finally:
        plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> Path:
    """Confusion matrix as a heatmap with counts (rows: true class, columns: predicted)."""
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k), dpi=120)
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    peak = max(max(row) for row in confusion) or 1
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    return path


def _local_cnns(rows: Sequence[dict[str, Any]]) -> int:
    """The number of local CNNs a phase's history is of (its rows list their accuracies), 1 for one model."""
    return max((len(r.get("train_subdomain_accuracy") or ()) for r in rows), default=0) or 1


def plot_curves(histories: dict[str, list[dict[str, Any]]], path: Path, title: str = "training curves") -> Path:
    """Loss and accuracy per epoch (train solid, validation dashed, a marker on every epoch so that one epoch is
    a point) of one or more training phases. The loss of N local CNNs, summed over them in training, is drawn as
    the mean per local CNN (divided by N, which its label says), on the scale of the other phases' losses; their
    accuracy is the mean of the local CNNs' accuracies."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 3.6), dpi=120)
    for i, (name, rows) in enumerate(histories.items()):
        style = {"color": f"C{i % 10}", "marker": "o", "markersize": 3}
        epochs = [r["epoch"] for r in rows]
        n = _local_cnns(rows)
        loss_name = f"{name} (mean of {n} local CNNs)" if n > 1 else name
        ax_loss.plot(epochs, [r["train_loss"] / n for r in rows], **style, label=f"{loss_name} train")
        ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], **style, label=f"{loss_name} train")
        if rows and "val_accuracy" in rows[0]:
            val = {**style, "ls": "--", "markerfacecolor": "none", "label": f"{loss_name} val"}  # hollow: val
            ax_loss.plot(epochs, [r["val_loss"] / n for r in rows], **val)
            ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], **val)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    epochs = [r["epoch"] for rows in histories.values() for r in rows]
    for ax in (ax_loss, ax_acc):
        if 0 < len(set(epochs)) <= 10:
            ax.set_xticks(sorted(set(epochs)))  # epochs are whole: few epochs, a tick each
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:  # half an epoch either side, so that one epoch is a tick, not a span of fractions
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # one legend, beside the curves
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_method_accuracy(
    summary: dict[str, dict[str, tuple[float, float | None]]], path: Path, title: str = "test accuracy"
) -> Path:
    """Grouped bars: one group per method, one bar per grid, height the mean test accuracy over seeds (written on
    the bar) and error bars its standard deviation. ``summary[method][grid] = (mean, std)``, std None for one seed
    (no error bar). The y axis spans the data (from 0 where an accuracy is low), up to at most 1."""
    methods = list(summary)
    grids = sorted({g for cells in summary.values() for g in cells}, key=grid_order)
    width = 0.8 / max(len(grids), 1)
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 0.35 * len(methods) * max(1, len(grids))), 3.8), dpi=120)
    for j, grid in enumerate(grids):
        xs = [i + (j - (len(grids) - 1) / 2) * width for i, m in enumerate(methods) if grid in summary[m]]
        cells = [summary[m][grid] for m in methods if grid in summary[m]]
        colour = _grid_colour(grid, grids)
        spread = [c[1] for c in cells]
        yerr = [s or 0.0 for s in spread] if any(s is not None for s in spread) else None
        bars = ax.bar(xs, [c[0] for c in cells], width, yerr=yerr, capsize=3, label=grid, color=colour)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, padding=1)
    lows = [c[0] - (c[1] or 0.0) for cells in summary.values() for c in cells.values()]
    highs = [c[0] + (c[1] or 0.0) for cells in summary.values() for c in cells.values()]
    low = math.floor((min(lows, default=0.0) - 0.02) * 10) / 10  # a tenth below the lowest
    ax.set_ylim(0.0 if low < 0.2 else low, min(1.0, math.ceil((max(highs, default=1.0) + 0.04) * 20) / 20))
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="grid", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_subdomain_heatmaps(
    accuracies: dict[str, tuple[tuple[int, ...], Sequence[float]]], path: Path,
    title: str = "test accuracy of each local CNN",
) -> Path:
    """Per-subdomain accuracies laid out as their grids: ``accuracies[label] = (grid, values in subdomain order)``
    (row-major, last grid axis fastest, as :class:`~ddcnn.decomposition.Decomposition` orders them), and after them
    the coarse level's, if any, which has no place on the grid: its panels' titles give it. A 3D grid gets one panel
    per slice along its shortest axis (the first of equally long ones)."""
    panels: list[tuple[str, Any]] = []
    for label, (grid, values) in accuracies.items():
        values = list(values)
        if len(values) == math.prod(grid) + 1:  # the coarse level's, last
            label = f"{label}, coarse {values.pop():.2f}"
        array = np.asarray(values, dtype=float).reshape(grid)
        if array.ndim == 3:  # sliced along its shortest axis (the first of equal ones): 4x4x1 is one 4x4 panel
            axis = int(np.argmin(array.shape))
            slices = np.moveaxis(array, axis, 0)
            if len(slices) == 1:
                panels.append((label, slices[0]))
            else:
                panels += [(f"{label}, slice {k} of axis {axis}", s) for k, s in enumerate(slices)]
        else:
            panels.append((label, array))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.6, 3.2), dpi=120, squeeze=False)
    for ax, (label, array) in zip(axes[0], panels):
        im = ax.imshow(array, cmap="viridis", vmin=0.0, vmax=1.0)
        for (i, j), v in np.ndenumerate(array):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(array.shape[1]))
        ax.set_yticks(range(array.shape[0]))
        ax.set_title(label, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.046)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, bbox_inches="tight")
    return path


def _grid_colour(grid: str, grids: Sequence[str]) -> str:
    """The bar colour of ``grid`` among the sorted ``grids``: the global CNN (one subdomain) is always ``C0`` and
    the decompositions follow, so a table without the global CNN colours its grids as one with it does."""
    first = 0 if grids and grid_order(grids[0])[0] == 1 else 1
    return f"C{(list(grids).index(grid) + first) % 10}"
