"""Batches for training and evaluation, reproducible to the sample.

Each epoch's order and augmentation are drawn only from CPU ``torch.Generator``s seeded from ``(seed, epoch)``
(augmentation also from the rank), never from the global RNG, so a resumed run replays exactly the same batches and
a CPU run draws what a GPU run draws.

In-memory splits are moved to the device once as one tensor (cached on the :class:`ImageSet`) and batched by
indexing it, as in KellerJordan/cifar10-airbench. Streamed splits (``np.memmap``) are read by a standard
``DataLoader`` whose sampler yields exactly the same index batches. Either way augmentation and normalisation then
run on the device for the whole batch at once:

* random crop: each sample is shifted by up to ``crop_padding`` pixels along every spatial axis (3D too), the
  uncovered border filled by *reflection* (no artificial black frame, which would differ from the zero background
  in some datasets and not in others); implemented as one gather with per-sample indices;
* horizontal flip (last axis) of a random half of the batch, folded into the same gather via ``torch.where``;
* ``x = (level / levels - mean) / std`` as float32, ``levels`` 255 for uint8 images and 65535 for uint16 ones
  (held on the device as int16 offset by -32768, see :func:`~ddcnn.data.dataset.device_form`, and shifted back
  here, exactly, in float32).

A loader of a process's own subimages (``subimages=``, the model-parallel local phase) yields, bit for bit, what the
decomposition would cut from those batches for its subdomains, but holds on the device only the regions of the
images those subimages (and their augmentation) read, cut once, and gathers the subimages from them by the same
coordinates (:mod:`ddcnn.data.subimages`). The coarse level's subimage it averages from the normalised whole images,
in ``dtype`` (the model's), as the model would average them itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from ..decomposition import Decomposition
from ..errors import ConfigError
from .cache import reopen_array
from .dataset import OFFSET_16, ImageSet, device_form, stored_levels
from .sampling import epoch_order
from .subimages import OwnSubimages, Regions

_ORDER_STREAM = 0  # the random stream that orders an epoch; stream 1 + rank augments it


def make_loader(
    split: ImageSet,
    *,
    batch_size: int,
    train: bool,
    cfg: DataConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    drop_last: bool | None = None,
    sampler: str = "uniform",
    subimages: tuple[Decomposition, Sequence[int]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> BatchLoader:
    """A loader over ``split``: shuffled, augmented (if ``cfg.augment``) and without the last partial batch (unless
    ``drop_last=False``) when ``train``; in fixed order, unaugmented and complete otherwise.

    ``shard=(rank, world)`` gives this rank its part of every epoch, for data-parallel training: all ranks draw the
    same permutation; training shards are disjoint and of equal size (the ``n % world`` samples at the end of the
    permutation are left out of that epoch), evaluation shards cover every sample exactly once. ``sampler``: how a
    training epoch is drawn, a permutation or class-balanced (:mod:`ddcnn.data.sampling`), sharded alike.

    ``subimages=(decomposition, subdomains)``: yield only the subimages of those subdomains, ``(B, S, C,
    *subimage_shape)``, exactly as the whole images' batches cut by ``decomposition`` (a process's share of the local
    CNNs in the model-parallel local phase); the loader then holds and augments only those
    (:mod:`ddcnn.data.subimages`). ``dtype``: the floating-point type of the model, in which the subimages of a
    share that holds the coarse level come (it averages the whole images in it, as the model would).
    """
    return BatchLoader(
        split,
        batch_size=batch_size,
        shuffle=train,
        augment=train and cfg.augment,
        crop_padding=cfg.crop_padding,
        flip=cfg.flip,
        mean=mean,
        std=std,
        device=torch.device(device),
        seed=seed,
        shard=shard,
        drop_last=train if drop_last is None else drop_last,
        num_workers=cfg.num_workers,
        sampler=sampler,
        subimages=subimages,
        dtype=dtype,
    )


class BatchLoader:
    """Yields ``(x, y)``: float32 normalised images ``(B, C, H, W)`` or ``(B, C, D, H, W)`` (with ``subimages``:
    subimages ``(B, S, C, *subimage_shape)``) and int64 labels, both on ``device``. Call :meth:`set_epoch` before
    each epoch; iterating twice without it repeats the epoch.

    An epoch is made in three steps: its sample indices (:meth:`_epoch_indices`, the sampler's), its augmentation
    (:meth:`_draw_augmentation`), then its batches of stored levels, augmented (:meth:`_read_images` for whole
    images, :meth:`_read_subimages` for a process's own subimages), which :meth:`__iter__` normalises.
    """

    def __init__(
        self,
        split: ImageSet,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        crop_padding: int,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        seed: int,
        shard: tuple[int, int],
        drop_last: bool,
        num_workers: int,
        sampler: str = "uniform",
        subimages: tuple[Decomposition, Sequence[int]] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        rank, world = shard
        channels, *spatial = split.images.shape[1:]
        if batch_size < 1:
            raise ConfigError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world:
            raise ConfigError(f"shard {shard} is not (rank, world) with 0 <= rank < world")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
        if augment and not 0 <= crop_padding < min(spatial):
            raise ConfigError(
                f"crop_padding must be in [0, {min(spatial)}) for images of size "
                f"{'x'.join(map(str, spatial))}, got {crop_padding}"
            )
        self.split, self.batch_size, self.shuffle, self.device = split, batch_size, shuffle, device
        self.crop_padding = crop_padding if augment else 0
        self.flip = flip and augment
        self.augment = bool(self.crop_padding or self.flip)
        self.seed, self.rank, self.world, self.drop_last = seed, rank, world, drop_last
        self.num_workers, self.sampler = num_workers, sampler
        if sampler != "uniform" and not shuffle:
            raise ConfigError(f"sampler {sampler} draws training epochs; an evaluation loader takes every image once")
        self.epoch = 0
        # shuffled shards are cut to equal size; evaluation shards differ by at most one sample
        shard_size = len(split) // world if shuffle else len(range(rank, len(split), world))
        if drop_last and shard_size < batch_size:
            raise ConfigError(
                f"batch size {batch_size} exceeds the {shard_size} images per rank, so an epoch "
                "without its last partial batch would be empty; lower the batch size"
            )
        self.num_samples = (shard_size // batch_size) * batch_size if drop_last else shard_size  # per epoch
        self.own = None if subimages is None else _own_subimages(subimages, spatial, self.crop_padding, self.flip)
        self.dtype = dtype  # of the coarse level's subimages, averaged as the model would average them
        std_t = torch.tensor(std, dtype=torch.float32)
        levels = stored_levels(split.images)
        self._offset = float(OFFSET_16) if levels == 65535 else 0.0  # the int16 device form of uint16 levels
        self._scale = (1.0 / (float(levels) * std_t)).to(device)  # per channel
        self._shift = (torch.tensor(mean, dtype=torch.float32) / std_t).to(device)
        self._streamed = isinstance(split.images, np.ndarray)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._epoch_indices()
        augmentation = self._draw_augmentation(len(indices)) if self.augment else None
        if self.own is None:
            for x, y in self._read_images(indices, augmentation):
                yield self._normalise(x), y
            return
        average = self.own.decomposition.coarse_subimage
        for grid, whole, y in self._read_subimages(indices, augmentation):
            coarse = None if whole is None else average(self._normalise(whole).to(self.dtype))
            yield self.own.combine(self._normalise(grid), coarse), y

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Stored levels ``(B, [S,] C, *spatial)`` as float32 ``(level / levels - mean) / std``, channel by channel."""
        view = (-1,) + (1,) * (self.split.images.ndim - 2)  # (C, 1, ...): broadcast over the leading axes
        x = x.float().add_(self._offset) if self._offset else x.float()
        return x.mul_(self._scale.view(view)).sub_(self._shift.view(view))

    def _batch_augmentation(
        self, augmentation: tuple[torch.Tensor, torch.Tensor] | None, batch: int, size: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The shifts and flips of the ``batch``-th batch (of ``size`` samples) of the epoch's ``augmentation``."""
        if augmentation is None:
            return None, None
        rows = slice(batch * self.batch_size, batch * self.batch_size + size)
        return augmentation[0][rows], augmentation[1][rows]

    def _read_images(
        self, indices: torch.Tensor, augmentation: tuple[torch.Tensor, torch.Tensor] | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches of whole images (stored levels), shifted and flipped by :func:`crop_and_flip`."""
        for i, (x, y) in enumerate(self._stream(indices) if self._streamed else self._index(indices)):
            shifts, flips = self._batch_augmentation(augmentation, i, len(y))
            yield (x if shifts is None else crop_and_flip(x, shifts, flips, self.crop_padding)), y

    def _read_subimages(
        self, indices: torch.Tensor, augmentation: tuple[torch.Tensor, torch.Tensor] | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """The epoch's batches of this process's grid subimages (stored levels), gathered, shifted and flipped as
        :meth:`_read_images` then the decomposition would make them, from the regions that hold them (held on the
        device once, or read batch by batch from a streamed split) or from the whole images where those are held
        anyway: on the CPU, where the images are their own device copy, or where the regions would hold more (the
        coarse level's process: then also the augmented whole images it averages, else None)."""
        own = self.own
        assert own is not None
        if self._streamed:
            batches: Iterator[tuple[Regions, torch.Tensor, torch.Tensor]] = (
                (own.regions(x) if own.holds_less else own.whole(x), torch.arange(len(y), device=self.device), y)
                for x, y in self._stream(indices, own if own.holds_less else None)
            )
        else:
            zero_copy = self.device.type == "cpu" and self.split.images.dtype == torch.uint8
            if own.holds_less and not zero_copy:
                regions, labels = self.split.subimages_on_device(self.device, own)
                source = own.regions(regions)
            else:
                images, labels = self.split.on_device(self.device)
                source = own.whole(images)
            batches = ((source, rows, labels[rows]) for rows in indices.to(self.device).split(self.batch_size))
        for i, (source, rows, y) in enumerate(batches):
            shifts, flips = self._batch_augmentation(augmentation, i, len(y))
            whole = own.augmented(source, rows, shifts, flips) if own.holds_coarse else None
            yield own.extract(source, rows, shifts, flips), whole, y

    def _epoch_indices(self) -> torch.Tensor:
        """This rank's sample indices for the epoch, in batch order (CPU int64)."""
        n = len(self.split)
        if self.shuffle:
            generator = _generator(self.seed, self.epoch, _ORDER_STREAM)
            order = epoch_order(self.split.labels, generator, self.sampler)[: n - n % self.world]
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world][: self.num_samples]

    def _draw_augmentation(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's per-sample shifts ``(n, spatial dims)`` in ``[0, 2 * crop_padding]`` and flip flags ``(n,)``,
        on the device; each only drawn if enabled (else zeros)."""
        generator = _generator(self.seed, self.epoch, 1 + self.rank)
        shifts = torch.full((n, self.split.images.ndim - 2), self.crop_padding)
        flips = torch.zeros(n, dtype=torch.bool)
        if self.crop_padding:
            shifts = torch.randint(0, 2 * self.crop_padding + 1, shifts.shape, generator=generator)
        if self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        return shifts.to(self.device), flips.to(self.device)

    def _index(self, indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split.on_device(self.device)
        for rows in indices.to(self.device).split(self.batch_size):
            yield images[rows], labels[rows]

    def _stream(
        self, indices: torch.Tensor, own: OwnSubimages | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the memmapped split read by a DataLoader: whole images, or (with ``own``) its regions only."""
        loader = DataLoader(
            _MemmapBatches(self.split.images, self.split.labels, own),
            sampler=indices.split(self.batch_size),
            batch_size=None,  # the sampler yields whole batches of indices
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # else DataLoader seeds its workers from the global RNG
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def crop_and_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Translated (reflect-padded) and flipped copies of a batch ``(B, C, *spatial)``, made by one gather.

    Sample ``b`` is the window at offset ``shifts[b]`` (per spatial axis, in ``[0, 2 * padding]``) of the sample
    reflect-padded by ``padding`` on every side, mirrored along the last axis where ``flips[b]``.
    """
    batch, _, *spatial = x.shape
    index: list[torch.Tensor] = [torch.arange(batch, device=x.device).view(batch, *([1] * len(spatial)))]
    for axis, size in enumerate(spatial):
        coords = (torch.arange(size, device=x.device) + shifts[:, axis : axis + 1] - padding).abs()  # reflect < 0
        coords = torch.where(coords >= size, 2 * (size - 1) - coords, coords)  # and reflect > size - 1
        if axis == len(spatial) - 1:
            coords = torch.where(flips[:, None], coords.flip(1), coords)
        shape = [batch] + [1] * len(spatial)
        shape[1 + axis] = size
        index.append(coords.reshape(shape))
    # moving channels last lets the per-sample index tensors broadcast over (B, *spatial)
    return x.movedim(1, -1)[tuple(index)].movedim(-1, 1).contiguous()


class _MemmapBatches(Dataset):
    """Batches of a memmapped split, indexed by a tensor of sample indices. Workers reopen the file rather than
    receive a pickled copy of the array."""

    def __init__(self, images: np.ndarray, labels: torch.Tensor, own: OwnSubimages | None = None):
        self._path = getattr(images, "filename", None)  # None: a plain array, pickled to the workers
        self._images: np.ndarray | None = images
        self._shape, self._dtype = images.shape, images.dtype
        self._labels, self._own = labels, own  # own: read only its regions, (B, R, C, *region_shape)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None} if self._path else self.__dict__

    def __getitem__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            self._images = reopen_array(self._path, self._shape, self._dtype)
        if self._own is not None:
            return device_form(self._own.cut(self._images, rows.numpy())), self._labels[rows]
        return device_form(np.ascontiguousarray(self._images[rows.numpy()])), self._labels[rows]


def _own_subimages(
    subimages: tuple[Decomposition, Sequence[int]], spatial: Sequence[int], padding: int, flip: bool
) -> OwnSubimages:
    """The :class:`OwnSubimages` of ``(decomposition, subdomains)`` over images of shape ``spatial``, read
    through the loader's augmentation (crop ``padding``, ``flip``)."""
    decomposition, subdomains = subimages
    if tuple(decomposition.image_shape) != tuple(spatial):
        raise ConfigError(
            f"the decomposition is of images {'x'.join(map(str, decomposition.image_shape))} but the split's are "
            f"{'x'.join(map(str, spatial))}; build it for the split's images"
        )
    return OwnSubimages(decomposition, tuple(subdomains), padding, flip)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one ``(seed, epoch, stream)``, the three mixed by numpy's SeedSequence hash."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
