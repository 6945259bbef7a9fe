"""The order of a training epoch (``--sampler``): a permutation, or a class-balanced draw with replacement.

``uniform`` is a permutation of the images: every image once per epoch. ``balanced`` draws as many indices as the
split has images, each independently: first a class, uniformly among the classes the split has, then an image of
that class, uniformly, so that an image of class k is drawn with probability ``1 / (K * n_k)``, inversely
proportional to its class's frequency, and every class is on average ``1/K`` of the epoch. (Drawing the class
first, rather than ``torch.multinomial`` over per-image probabilities, is exact in integers and has no limit on the
number of images.)

Both draw only from the ``torch.Generator`` they are given, which the loaders seed from ``(seed, epoch)``; every
process of a distributed run draws the same order and takes its strided shard of it, so that the shards of N
processes are together the draw of one (:meth:`ddcnn.data.loader.BatchLoader._epoch_indices`). A balanced epoch has
the uniform one's length, so a run has the same steps either way.
"""

from __future__ import annotations

import torch

from ..config import SAMPLERS, check_choice


def epoch_order(labels: torch.Tensor, generator: torch.Generator, sampler: str = "uniform") -> torch.Tensor:
    """One training epoch's sample indices (int64, ``len(labels)`` of them) under ``sampler`` (:data:`SAMPLERS`),
    drawn from ``generator`` alone. ``uniform`` is exactly ``torch.randperm(len(labels), generator=generator)``."""
    check_choice("sampler", sampler, SAMPLERS)
    if sampler == "uniform":
        return torch.randperm(len(labels), generator=generator)
    return balanced_draw(labels, len(labels), generator)


def balanced_draw(labels: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices into ``labels``, drawn with replacement, every class present in ``labels`` equally likely
    and, within a class, every image (classes absent from ``labels`` are never drawn)."""
    labels = labels.detach().cpu().long()
    if count == 0 or len(labels) == 0:
        return torch.zeros(0, dtype=torch.long)
    by_class = torch.argsort(labels, stable=True)  # the images of each class, one run per class, in index order
    _, counts = torch.unique(labels, return_counts=True)  # the classes present, in increasing order
    starts = counts.cumsum(0) - counts
    picked = torch.randint(len(counts), (count,), generator=generator)
    size = counts[picked]
    # uniform in [0, size): floor(u * size), clamped since u * size may round up to size in float64
    within = (torch.rand(count, generator=generator, dtype=torch.float64) * size).long().minimum(size - 1)
    return by_class[starts[picked] + within]
