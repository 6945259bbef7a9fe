"""The containers every dataset is loaded into: :class:`ImageSet` (one split), :class:`DatasetSplits` (train, val,
test and their statistics) and :class:`RawDataset` (what a dataset module reads, before splitting)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ImageSet:
    """One split: uint8 images ``(n, C, H, W)`` or ``(n, C, D, H, W)`` and int64 labels ``(n,)``.

    ``images`` is a CPU tensor when the dataset is held in memory and a read-only ``np.memmap`` of the on-disk cache
    when it is streamed.
    """

    images: torch.Tensor | np.ndarray
    labels: torch.Tensor
    _device_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.labels)

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels on ``device``; copied there on the first call and cached, so loaders share one copy."""
        if isinstance(self.images, np.ndarray):
            raise TypeError("a streamed ImageSet (np.memmap images) is read batch by batch, not moved to a device")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._device_copies:
            self._device_copies[device] = (self.images.to(device), self.labels.to(device))
        return self._device_copies[device]


@dataclass
class DatasetSplits:
    """A dataset ready for training: three splits, class names and the train split's per-channel statistics."""

    name: str
    class_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]  # per channel, of the train split, in [0, 1] units (pixel / 255)
    std: tuple[float, ...]
    streaming: bool  # images are np.memmaps of the on-disk cache, read by a DataLoader

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

    ``splits`` maps a split name to ``(images, labels)``: uint8 ``(n, C, *spatial)`` arrays (possibly memmaps of the
    cache) and int64 ``(n,)`` arrays. ``fingerprint`` identifies the content, to key caches derived from it;
    ``location`` says where it was read from, for ``ddcnn datasets``.
    """

    name: str
    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    fingerprint: str
    location: str
