"""The domain decomposition: a grid of subdomains over an image, as pure tensor code.

A grid ``n_1 x n_2 (x n_3)`` cuts each spatial axis of length ``L`` into ``n`` *core* intervals with boundaries
``floor(i * L / n)``, so the cores tile the image exactly and their lengths differ by at most one. Each subimage
is a *window* around its core, widened by the overlap ``delta`` into the neighbours. So that all subimages of a
batch stack into one tensor (and the local CNNs can run as one batched module), every window along an axis has the
same length::

    s = min(L, ceil(L / n) + 2 * delta)

and starts at ``clamp(core_start - delta, 0, L - s)``: centred on its core, and shifted inward where it would
cross the image border (so nothing outside the image is ever read, and border windows reach ``2*delta`` into
their one neighbour). Every window contains its whole core, so :meth:`Decomposition.merge` recovers the image
exactly from the subimages.

Refused with a :class:`~ddcnn.errors.DecompositionError`: more subdomains than pixels along an axis, and an
overlap wider than a core (``delta > floor(L / n)``).

This module imports nothing from ``torch.distributed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import torch

from .config import format_grid, parse_grid
from .errors import DecompositionError


def compute_windows(length: int, parts: int, overlap: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Core intervals and (equal-length) windows along one axis, as ``[start, stop)`` pairs."""
    if parts > length:
        raise DecompositionError(
            f"{parts} subdomains do not fit along an axis of {length} pixels; use a grid of at most {length} per axis"
        )
    cores = [(i * length // parts, (i + 1) * length // parts) for i in range(parts)]
    narrowest = length // parts
    if overlap < 0 or overlap > narrowest:
        raise DecompositionError(
            f"overlap {overlap} is wider than a subdomain ({narrowest} pixels along an axis of {length} "
            f"split into {parts}); use an overlap between 0 and {narrowest}"
        )
    size = min(length, math.ceil(length / parts) + 2 * overlap)
    windows = [(s, s + size) for s in (min(max(c0 - overlap, 0), length - size) for c0, _ in cores)]
    return cores, windows


@dataclass(frozen=True)
class Decomposition:
    """A grid of subdomains over images of one spatial shape.

    ``split`` maps a batch ``(B, C, *image_shape)`` to subimages ``(B, N, C, *subimage_shape)`` in row-major
    subdomain order (the last grid axis fastest); ``merge`` is its inverse on the cores.
    """

    grid: tuple[int, ...]
    image_shape: tuple[int, ...]
    overlap: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", parse_grid(self.grid))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.grid) != len(self.image_shape):
            raise DecompositionError(
                f"grid {format_grid(self.grid)} has {len(self.grid)} axes but the images have "
                f"{len(self.image_shape)} spatial axes {self.image_shape}; use a "
                f"{'2x2x2-style' if len(self.image_shape) == 3 else '2x2-style'} grid"
            )
        self._axes  # validate every axis now, not at the first split

    @property
    def num_subdomains(self) -> int:
        return math.prod(self.grid)

    @property
    def spatial_dims(self) -> int:
        return len(self.grid)

    @cached_property
    def _axes(self) -> list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        return [compute_windows(L, n, self.overlap) for L, n in zip(self.image_shape, self.grid)]

    @property
    def subimage_shape(self) -> tuple[int, ...]:
        return tuple(windows[0][1] - windows[0][0] for _, windows in self._axes)

    def windows(self) -> list[tuple[slice, ...]]:
        """The window (as slices over the spatial axes) of each subdomain, in subdomain order."""
        return list(self._windows)

    @cached_property
    def _windows(self) -> tuple[tuple[slice, ...], ...]:
        per_axis = [[slice(a, b) for a, b in windows] for _, windows in self._axes]
        return tuple(tuple(s) for s in product(*per_axis))

    def cores(self) -> list[tuple[slice, ...]]:
        """The core (as slices over the spatial axes) of each subdomain; the cores tile the image."""
        per_axis = [[slice(a, b) for a, b in cores] for cores, _ in self._axes]
        return [tuple(s) for s in product(*per_axis)]

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 2 + self.spatial_dims or tuple(x.shape[2:]) != self.image_shape:
            raise DecompositionError(
                f"expected a batch of shape (B, C, {', '.join(map(str, self.image_shape))}) for this "
                f"decomposition, got {tuple(x.shape)}; build the Decomposition for the images' shape"
            )

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *image_shape)`` -> ``(B, N, C, *subimage_shape)``: the windows of the whole batch at once.

        One slice per subdomain and one copy (``torch.stack``): 2x to 6x faster on CPU than a single
        advanced-indexing gather (benchmarks/README.md), differentiable, and never a copy of more than the batch.
        """
        self._check(x)
        return torch.stack([x[(slice(None), slice(None), *window)] for window in self._windows], 1)

    def merge(self, subimages: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`: ``(B, N, C, *subimage_shape)`` -> ``(B, C, *image_shape)`` from the cores."""
        if subimages.dim() != 3 + self.spatial_dims or subimages.shape[1] != self.num_subdomains:
            raise DecompositionError(
                f"expected subimages of shape (B, {self.num_subdomains}, C, "
                f"{', '.join(map(str, self.subimage_shape))}), got {tuple(subimages.shape)}"
            )
        B, _, C = subimages.shape[:3]
        out = subimages.new_empty(B, C, *self.image_shape)
        for i, (window, core) in enumerate(zip(self.windows(), self.cores())):
            local = tuple(slice(c.start - w.start, c.stop - w.start) for c, w in zip(core, window))
            out[(slice(None), slice(None), *core)] = subimages[(slice(None), i, slice(None), *local)]
        return out

    def subdomain_coordinates(self) -> list[tuple[int, ...]]:
        """Grid position of each subdomain, in subdomain order (for heatmaps and logs)."""
        return list(product(*(range(n) for n in self.grid)))

    def __str__(self) -> str:
        return (
            f"{format_grid(self.grid)} grid over {'x'.join(map(str, self.image_shape))} images, overlap "
            f"{self.overlap}: {self.num_subdomains} subimages of {'x'.join(map(str, self.subimage_shape))}"
        )
