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

With ``coarse``, the decomposition has a *coarse level*, a two-level CNN-DNN as in two-level domain decomposition:
one more subdomain, index ``N = prod(grid)`` after the grid's, whose subimage is the whole image downsampled by area
averaging to the subimage shape (``adaptive_avg_pool``, which takes any output size; its factor is the grid's,
``L / s`` per axis). A local CNN sees a ``1/N`` of the image and nothing of the rest; the coarse CNN sees all of it
at ``1/N`` of the pixels, which is what a coarse space supplies in domain decomposition: the global information the
subdomains lack. Because its subimage has the subimage shape it is simply one more copy of the local CNNs (it needs
no communication, trains in the local phase, and everything that handles N local CNNs handles it), so it is a
subdomain here and not a separate network. Only :meth:`split` and :attr:`num_subdomains` count it: the windows, the
cores, :meth:`merge` and the grid coordinates are the grid's (:attr:`num_grid_subdomains`).

Refused with a :class:`~ddcnn.errors.DecompositionError`: more subdomains than pixels along an axis, an overlap
wider than a core (``delta > floor(L / n)``), and a coarse level on a ``1x1`` grid (where it would be the image again).

This module imports nothing from ``torch.distributed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from itertools import product

import torch
import torch.nn.functional as F

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
    subdomain order (the last grid axis fastest), with ``coarse`` the downsampled whole image last; ``merge`` is
    its inverse on the cores.
    """

    grid: tuple[int, ...]
    image_shape: tuple[int, ...]
    overlap: int = 0
    coarse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", parse_grid(self.grid))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if len(self.grid) != len(self.image_shape):
            raise DecompositionError(
                f"grid {format_grid(self.grid)} has {len(self.grid)} axes but the images have "
                f"{len(self.image_shape)} spatial axes {self.image_shape}; use a "
                f"{'2x2x2-style' if len(self.image_shape) == 3 else '2x2-style'} grid"
            )
        object.__setattr__(self, "coarse", bool(self.coarse))
        if self.coarse and self.num_grid_subdomains == 1:
            raise DecompositionError(
                "a coarse level on a 1x1 grid would see the whole image again; use a finer grid, or no coarse level"
            )
        _ = self._axes  # validate every axis now, not at the first split

    @property
    def num_subdomains(self) -> int:
        """The subdomains: the grid's, and the coarse one."""
        return self.num_grid_subdomains + self.coarse

    @property
    def num_grid_subdomains(self) -> int:
        """The subdomains of the grid (without the coarse one): those with a window, a core and a grid position."""
        return math.prod(self.grid)

    @property
    def coarse_index(self) -> int | None:
        """The subdomain index of the coarse level (the last one), or None without it."""
        return self.num_grid_subdomains if self.coarse else None

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
        subimages = [x[(slice(None), slice(None), *window)] for window in self._windows]
        return torch.stack(subimages + ([self.coarse_subimage(x)] if self.coarse else []), 1)

    def coarse_subimage(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *image_shape)`` -> ``(B, C, *subimage_shape)``: the whole images averaged over areas down to the
        subimage shape, the coarse level's subimage (in ``x``'s dtype; a loader of a process's own subimages calls
        this very function on the same images, so that both agree bit for bit)."""
        if not x.is_floating_point():
            raise DecompositionError(
                f"the coarse level averages pixels, which {x.dtype} images cannot hold; split floating-point images"
            )
        pool = F.adaptive_avg_pool3d if self.spatial_dims == 3 else F.adaptive_avg_pool2d
        return pool(x, self.subimage_shape)

    def merge(self, subimages: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`: ``(B, N, C, *subimage_shape)`` -> ``(B, C, *image_shape)`` from the grid
        subdomains' cores (the coarse subimage, if any, is not read)."""
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
        """Grid position of each grid subdomain, in subdomain order (for heatmaps and logs; the coarse one, if any,
        has none and follows them)."""
        return list(product(*(range(n) for n in self.grid)))

    def subdomain_name(self, index: int) -> str:
        """How logs and tables name subdomain ``index``: its number, or ``coarse``."""
        return "coarse" if index == self.coarse_index else str(index)

    def __str__(self) -> str:
        coarse = f" + the coarse level (the whole image averaged down to {self._shape(self.subimage_shape)})"
        return (
            f"{format_grid(self.grid)} grid over {self._shape(self.image_shape)} images, overlap {self.overlap}: "
            f"{self.num_grid_subdomains} subimages of {self._shape(self.subimage_shape)}{coarse if self.coarse else ''}"
        )

    @staticmethod
    def _shape(shape: tuple[int, ...]) -> str:
        return "x".join(map(str, shape))
