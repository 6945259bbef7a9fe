"""Plots written to the run folder (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


def plot_curves(histories: dict[str, list[dict[str, Any]]], path: Path, title: str = "training curves") -> Path:
    """Loss and accuracy per epoch (train solid, validation dashed) of one or more training phases."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    for i, (name, rows) in enumerate(histories.items()):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, label=f"{name} train")
        ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], color=color, label=f"{name} train")
        if rows and "val_accuracy" in rows[0]:
            ax_loss.plot(epochs, [r["val_loss"] for r in rows], color=color, ls="--", label=f"{name} val")
            ax_acc.plot(epochs, [r["val_accuracy"] for r in rows], color=color, ls="--", label=f"{name} val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_method_accuracy(
    summary: dict[str, dict[str, tuple[float, float]]], path: Path, title: str = "test accuracy"
) -> Path:
    """Grouped bars: one group per method, one bar per grid, height the mean test accuracy over seeds and error
    bars its standard deviation. ``summary[method][grid] = (mean, std)``."""
    methods = list(summary)
    grids = sorted({g for cells in summary.values() for g in cells}, key=grid_order)
    width = 0.8 / max(len(grids), 1)
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 0.35 * len(methods) * max(1, len(grids))), 3.8), dpi=120)
    for j, grid in enumerate(grids):
        xs = [i + (j - (len(grids) - 1) / 2) * width for i, m in enumerate(methods) if grid in summary[m]]
        cells = [summary[m][grid] for m in methods if grid in summary[m]]
        colour = _grid_colour(grid, grids)
        ax.bar(xs, [c[0] for c in cells], width, yerr=[c[1] for c in cells], capsize=3, label=grid, color=colour)
    lows = [c[0] - c[1] for cells in summary.values() for c in cells.values()]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.0)
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
    (row-major, last grid axis fastest, as :class:`~ddcnn.decomposition.Decomposition` orders them). A 3D grid
    gets one panel per slice along its first axis."""
    panels: list[tuple[str, Any]] = []
    for label, (grid, values) in accuracies.items():
        array = np.asarray(values, dtype=float).reshape(grid)
        if array.ndim == 3:
            panels += [(f"{label}, slice {k}", array[k]) for k in range(array.shape[0])]
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
