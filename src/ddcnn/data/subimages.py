"""A process's own subimages: what the local CNNs of some subdomains read of every image, with the margin that the
loader's augmentation reads around them, so that a process of the model-parallel local phase holds and augments
only those, never the whole images.

The augmentation (:func:`~ddcnn.data.loader.crop_and_flip`) acts on the whole image: along every spatial axis of
length ``L`` a sample is shifted by ``t`` in ``[0, 2p]`` (``p`` the crop padding; reflected at the image border),
then, where flipped, mirrored along the last axis, and only then cut into subimages. Restricted to subdomain ``i``,
whose window is ``[a, a + s)`` along an axis, the shifted image reads the pixels ``reflect([a - p, a + s + p))``,
which all lie in the window widened by ``p`` and clipped to ``[0, L)``: the *region* of ``i``. So that the regions
stack into one tensor, every region along an axis has the same length ``r = min(L, s + 2p)`` and starts at
``clamp(a - p, 0, L - r)`` (the decomposition's rule for windows, widened), which still holds every pixel that the
shifted window reads, reflected ones included.

A flip maps the window to its mirror ``[L - a - s, L - a)`` on the last axis, so a flipped sample's subimage ``i``
is read from the *mirror region* of ``i``: the pixels of another subdomain (the mirror subdomain, or a pixel off
it where the cores are not symmetric). Exactness therefore needs those too: with flips a process holds its
subdomains' regions and their mirrors, the distinct ones once. A process that holds whole rows of the grid (the
contiguous blocks of row-major subdomains of :func:`~ddcnn.distributed.assign_subdomains`) mostly holds its
mirrors already; one that holds a single subdomain holds two regions.

:meth:`OwnSubimages.extract` gathers the subimages from the regions with the very integer coordinates that
``crop_and_flip`` computes for the whole image, so the result is, bit for bit,
``decomposition.split(crop_and_flip(x, shifts, flips, p))[:, subdomains]``. It gathers alike from the whole images
(:meth:`OwnSubimages.whole`, one region at the origin), which is how a process reads them where they are held
anyway (on the CPU) or where the regions would hold more than the images (wide overlaps).

The coarse level (a decomposition with ``coarse``, :mod:`ddcnn.decomposition`) is the subdomain whose subimage is
the whole image averaged down to the subimage shape, so it reads every pixel: a process that holds it holds the
whole images, as one process does (:attr:`OwnSubimages.holds_less` is False; the memory of the others is unchanged),
and gathers its grid subimages from them. Averaging needs the normalised floating-point image, so the coarse
subimage is made in two steps: :meth:`OwnSubimages.augmented` gathers the augmented whole images (stored levels,
bit for bit ``crop_and_flip(x, shifts, flips, p)``), the loader normalises them as it normalises whole images and
averages them by :meth:`~ddcnn.decomposition.Decomposition.coarse_subimage` in the model's floating-point type, the
very operation the model would apply to the whole images; :meth:`OwnSubimages.combine` puts it among the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch

from ..decomposition import Decomposition
from ..errors import ConfigError


class Regions(NamedTuple):
    """Stored levels to gather subimages from: ``images`` ``(M, R, C, *region_shape)``, the origin of each of the
    ``R`` regions in image coordinates ``origins`` ``(R, D)``, and for each own subdomain the region its
    unflipped (``direct``) and flipped (``mirror``) subimage is read from, ``(S,)`` each."""

    images: torch.Tensor
    origins: torch.Tensor
    direct: torch.Tensor
    mirror: torch.Tensor


@dataclass(frozen=True)
class OwnSubimages:
    """The subimages of ``subdomains`` of ``decomposition``, read through a crop padding of ``padding`` pixels and,
    with ``flip``, horizontal flips (the loader's augmentation; ``0`` and False for unaugmented batches).
    ``subdomains`` may include the coarse level (:attr:`holds_coarse`); the regions are those of the grid ones."""

    decomposition: Decomposition
    subdomains: tuple[int, ...]
    padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "subdomains", tuple(int(i) for i in self.subdomains))
        n = self.decomposition.num_subdomains
        if not self.subdomains or any(not 0 <= i < n for i in self.subdomains):
            raise ConfigError(
                f"subdomains {self.subdomains} are not among the {n} of {self.decomposition}; pass some of 0 to {n - 1}"
            )
        side = min(self.decomposition.image_shape)
        if not 0 <= self.padding < side:
            raise ConfigError(
                f"crop padding {self.padding} is not in [0, {side}) for these images; lower --crop-padding"
            )

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.decomposition.image_shape

    @property
    def grid_subdomains(self) -> tuple[int, ...]:
        """The own subdomains of the grid (with a window), in the order of :attr:`subdomains`."""
        return tuple(i for i in self.subdomains if i != self.decomposition.coarse_index)

    @property
    def holds_coarse(self) -> bool:
        """Whether the coarse level is among the own subdomains: then the whole images are read."""
        return self.decomposition.coarse_index in self.subdomains

    @property
    def subimage_shape(self) -> tuple[int, ...]:
        return self.decomposition.subimage_shape

    @cached_property
    def region_shape(self) -> tuple[int, ...]:
        return tuple(min(L, s + 2 * self.padding) for L, s in zip(self.image_shape, self.subimage_shape))

    @cached_property
    def _starts(self) -> torch.Tensor:
        """``(G, D)``: where each own grid subdomain's window starts."""
        windows = self.decomposition.windows()
        starts = [[w.start for w in windows[i]] for i in self.grid_subdomains]
        return torch.tensor(starts, dtype=torch.long).view(len(starts), len(self.image_shape))

    @cached_property
    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The distinct regions' origins ``(R, D)`` (the own grid subdomains' regions, then the mirrors not among
        them) and the region of each own grid subdomain unflipped and flipped."""
        last = len(self.image_shape) - 1
        origins: list[tuple[int, ...]] = []

        def region(starts: list[int]) -> int:
            origin = tuple(
                min(max(a - self.padding, 0), L - r) for a, L, r in zip(starts, self.image_shape, self.region_shape)
            )
            if origin not in origins:
                origins.append(origin)
            return origins.index(origin)

        starts = self._starts.tolist()
        direct = [region(a) for a in starts]
        width, size = self.image_shape[last], self.subimage_shape[last]
        mirror = [region([*a[:last], width - a[last] - size]) for a in starts] if self.flip else direct
        origin = torch.tensor(origins, dtype=torch.long).view(len(origins), len(self.image_shape))
        return origin, torch.tensor(direct, dtype=torch.long), torch.tensor(mirror, dtype=torch.long)

    @property
    def num_regions(self) -> int:
        return len(self._layout[0])

    def region_slices(self) -> list[tuple[slice, ...]]:
        """Each region as slices over the spatial axes, in region order."""
        return [
            tuple(slice(o, o + r) for o, r in zip(origin, self.region_shape)) for origin in self._layout[0].tolist()
        ]

    @property
    def fraction(self) -> float:
        """The regions' pixels over the whole image's: what a process holds of the data set, per image (the whole
        image, 1, for the coarse level's process)."""
        if self.holds_coarse:
            return 1.0
        return self.num_regions * math.prod(self.region_shape) / math.prod(self.image_shape)

    @property
    def holds_less(self) -> bool:
        """Whether the regions hold fewer pixels than the whole images (not so for wide overlaps, or for many
        subdomains per process with their mirrors)."""
        return self.fraction < 1

    def cut(self, images: torch.Tensor | np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """The regions of ``images[rows]`` (all rows by default): ``(n, R, C, *region_shape)`` of the same dtype.
        ``images`` may be an ``np.memmap``: only the regions' bytes of it are read."""
        array = images.numpy() if isinstance(images, torch.Tensor) else images
        first = slice(None) if rows is None else rows
        return np.stack([array[(first, slice(None), *where)] for where in self.region_slices()], 1)

    def regions(self, stored: torch.Tensor) -> Regions:
        """``stored`` ``(M, R, C, *region_shape)``, the output of :meth:`cut` on some device, as a source."""
        origins, direct, mirror = (t.to(stored.device) for t in self._layout)
        return Regions(stored, origins, direct, mirror)

    def whole(self, images: torch.Tensor) -> Regions:
        """Whole images ``(M, C, *image_shape)`` as a source: one region, at the origin, read by every subdomain."""
        zeros = torch.zeros(len(self.grid_subdomains), dtype=torch.long, device=images.device)
        origins = torch.zeros(1, len(self.image_shape), dtype=torch.long, device=images.device)
        return Regions(images.unsqueeze(1), origins, zeros, zeros)

    def extract(
        self,
        source: Regions,
        rows: torch.Tensor,
        shifts: torch.Tensor | None = None,
        flips: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The own grid subimages ``(B, G, C, *subimage_shape)`` (:attr:`grid_subdomains`) of the images ``rows`` of
        ``source``, shifted by ``shifts`` ``(B, D)`` (in ``[0, 2 * padding]``) and mirrored where ``flips`` ``(B,)``,
        as ``crop_and_flip`` then :meth:`Decomposition.split` would make them (None: unaugmented), by one gather."""
        flipped = self._flipped(flips, len(rows), source.images.device)
        region = torch.where(flipped[:, None], source.mirror[None], source.direct[None])  # (B, G)
        return self._gather(source, rows, region, self._starts, self.subimage_shape, shifts, flipped)

    def augmented(
        self, source: Regions, rows: torch.Tensor, shifts: torch.Tensor | None = None, flips: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The whole images ``(B, C, *image_shape)`` ``rows`` of ``source`` (:meth:`whole`) as the augmentation
        makes them, ``crop_and_flip(x, shifts, flips, padding)`` bit for bit: what the coarse level averages."""
        if source.images.shape[3:] != self.image_shape:
            raise ValueError("the coarse level's images are gathered from the whole images (OwnSubimages.whole)")
        flipped = self._flipped(flips, len(rows), source.images.device)
        region = torch.zeros(len(rows), 1, dtype=torch.long, device=source.images.device)
        starts = torch.zeros(1, len(self.image_shape), dtype=torch.long)
        return self._gather(source, rows, region, starts, self.image_shape, shifts, flipped)[:, 0]

    def combine(self, grid: torch.Tensor, coarse: torch.Tensor | None) -> torch.Tensor:
        """The own subimages ``(B, S, C, *subimage_shape)`` in the order of :attr:`subdomains`: the grid ones
        ``(B, G, ...)`` of :meth:`extract` (normalised) and, if held, the coarse one ``(B, C, ...)``, in its dtype."""
        if coarse is None:
            return grid
        grid = iter(grid.to(coarse.dtype).unbind(1))
        return torch.stack([coarse if i == self.decomposition.coarse_index else next(grid) for i in self.subdomains], 1)

    def _flipped(self, flips: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if flips is not None and self.flip:
            return flips.to(device)
        return torch.zeros(batch, dtype=torch.bool, device=device)

    def _gather(
        self,
        source: Regions,
        rows: torch.Tensor,
        region: torch.Tensor,
        starts: torch.Tensor,
        sizes: tuple[int, ...],
        shifts: torch.Tensor | None,
        flipped: torch.Tensor,
    ) -> torch.Tensor:
        """Windows ``(B, S, C, *sizes)`` starting at ``starts`` ``(S, D)`` of the images ``rows``, read from their
        ``region`` ``(B, S)``, augmented: the coordinates ``crop_and_flip`` computes, restricted to the windows."""
        device, batch, dims = source.images.device, len(rows), len(self.image_shape)
        starts = starts.to(device)
        index: list[torch.Tensor] = [
            rows.to(device).view(batch, *[1] * (dims + 1)),
            region.view(*region.shape, *[1] * dims),
        ]
        for axis, (length, size) in enumerate(zip(self.image_shape, sizes)):
            coords = starts[None, :, axis, None] + torch.arange(size, device=device)  # (1, S, size): image coordinates
            if axis == dims - 1:
                coords = torch.where(flipped[:, None, None], length - 1 - coords, coords)  # the mirrored window
            if shifts is not None:
                coords = (coords + shifts[:, axis, None, None].to(device) - self.padding).abs()  # reflect < 0
                coords = torch.where(coords >= length, 2 * (length - 1) - coords, coords)  # and reflect > L - 1
            coords = coords - source.origins[region, axis][..., None]  # into the region read
            shape = [*coords.shape[:2]] + [1] * dims
            shape[2 + axis] = size
            index.append(coords.reshape(shape))
        # channels last, so that the index tensors broadcast over (B, S, *subimage_shape)
        return source.images.movedim(2, -1)[tuple(index)].movedim(-1, 2).contiguous()
