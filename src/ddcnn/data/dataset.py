"""The containers every dataset is loaded into: :class:`ImageSet` (one split), :class:`DatasetSplits` (train, val,
test and their statistics) and :class:`RawDataset` (what a dataset module reads, before splitting).

Images are stored levels (:mod:`ddcnn.data.intensity`): uint8 (0..255) or, where 8 bits would lose levels, uint16
(0..65535). On a device, uint16 images are held as int16 offset by -32768 (:func:`device_form`): the same bytes, in
a dtype every kernel (indexing, gathers, flips, on CPU and CUDA) supports, which torch's uint16 is not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .intensity import IDENTITY, Intensity
from .subimages import OwnSubimages

log = logging.getLogger(__name__)

OFFSET_16 = 32768  # a uint16 level q is held on devices as the int16 q - OFFSET_16
_LEVELS = {torch.uint8: 255, torch.uint16: 65535, np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def stored_levels(images: torch.Tensor | np.ndarray) -> int:
    """The largest stored level of ``images``: 255 (uint8) or 65535 (uint16); TypeError for other dtypes."""
    try:
        return _LEVELS[images.dtype]
    except KeyError:
        raise TypeError(f"images are stored as uint8 or uint16, not {images.dtype}") from None


def device_form(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``images`` as a tensor a device can index: uint8 as it is, uint16 as int16 offset by -:data:`OFFSET_16`
    (the top bit flipped, so the order of the levels is kept)."""
    if images.dtype in (torch.uint16, np.uint16):
        array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return torch.from_numpy(array.view(np.int16) ^ np.int16(-OFFSET_16))
    return torch.as_tensor(images)


@dataclass
class ImageSet:
    """One split: uint8 or uint16 images ``(n, C, H, W)`` or ``(n, C, D, H, W)`` and int64 labels ``(n,)``.

    ``images`` is a CPU tensor when the dataset is held in memory and a read-only ``np.memmap`` of the on-disk cache
    when it is streamed.
    """

    images: torch.Tensor | np.ndarray
    labels: torch.Tensor
    _device_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _subimage_copies: dict[tuple[torch.device, OwnSubimages], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.labels)

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (in :func:`device_form`) and labels on ``device``; copied there on the first call and cached, so
        loaders share one copy."""
        if isinstance(self.images, np.ndarray):
            raise TypeError("a streamed ImageSet (np.memmap images) is read batch by batch, not moved to a device")
        device = _index_device(device)
        if device not in self._device_copies:
            self._device_copies[device] = (device_form(self.images).to(device), self.labels.to(device))
        return self._device_copies[device]

    def subimages_on_device(self, device: torch.device, own: OwnSubimages) -> tuple[torch.Tensor, torch.Tensor]:
        """The regions of ``own`` (a process's subimages with the margin its augmentation reads) of every image
        ``(n, R, C, *region_shape)`` in :func:`device_form`, and the labels, on ``device``: cut once from the host
        images on the first call and cached, so that the device never holds the whole images."""
        if isinstance(self.images, np.ndarray):
            raise TypeError("a streamed ImageSet (np.memmap images) is read batch by batch, not moved to a device")
        device = _index_device(device)
        if (device, own) not in self._subimage_copies:
            regions = device_form(own.cut(self.images)).to(device)
            self._subimage_copies[device, own] = (regions, self.labels.to(device))
            shape, megabytes = "x".join(map(str, own.region_shape)), regions.nbytes / 1e6
            log.info(
                "subimages of subdomains %s on %s: %d regions of %s, %.2f of every image (%.1f MB)",
                own.subdomains,
                device,
                own.num_regions,
                shape,
                own.fraction,
                megabytes,
            )
        return self._subimage_copies[device, own]


def _index_device(device: torch.device | str) -> torch.device:
    """``device`` with its index (``cuda`` is ``cuda:<current>``), so that one device is one cache key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class DatasetSplits:
    """A dataset ready for training: three splits, class names and the train split's per-channel statistics."""

    name: str
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]  # per channel, of the train split, in [0, 1] units (level / 255, or / 65535)
    std: tuple[float, ...]
    streaming: bool  # images are np.memmaps of the on-disk cache, read by a DataLoader
    intensity: Intensity = IDENTITY  # how raw values became the stored levels (IDENTITY: uint8 values as they are)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return len(self.image_shape)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Spatial sizes: ``(H, W)`` or ``(D, H, W)``."""
        return tuple(int(s) for s in self.train.images.shape[2:])


@dataclass
class RawDataset:
    """A dataset as its module reads it: the splits it ships with (``train`` always, ``val`` and ``test`` where it
    has them), before missing splits are carved out and before the in-memory/streaming decision.

    ``splits`` maps a split name to ``(images, labels)``: uint8 or uint16 ``(n, C, *spatial)`` arrays of stored
    levels (possibly memmaps of the cache) and int64 ``(n,)`` arrays. ``fingerprint`` identifies the content, to key
    caches derived from it; ``location`` says where it was read from, for ``ddcnn datasets``; ``intensity`` how raw
    values became the levels (None: the images were 8-bit, their levels the raw values).
    """

    name: str
    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    fingerprint: str
    location: str
    intensity: Intensity | None = None
