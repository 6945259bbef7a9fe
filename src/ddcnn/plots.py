"""Plots written to the run folder (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.savefig(path)
    plt.close(fig)
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
    fig.savefig(path)
    plt.close(fig)
    return path
