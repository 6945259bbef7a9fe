"""From a :class:`RawDataset` to :class:`DatasetSplits`: carve the splits, hold them in memory or stream them from
the cache, and measure the train split's per-channel mean and std.

A dataset whose stored images (uint8, or uint16) take more than ``cfg.max_memory_gb`` (10^9 bytes) is streamed:
each split is written once to ``<cache>/streams/<name>-<key>/<split>_images.npy`` and opened as a read-only
``np.memmap``. Otherwise every split is a CPU tensor of that dtype.

Whatever module read it, a dataset is checked before anything is carved or copied: at least two classes, every split
of it non-empty and of one image shape, labels in ``0..K-1``. A class left without training images by the carving is
named in a warning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DatasetError
from .cache import atomic_dir, cache_root, fingerprint, save_rows, verified_entry
from .dataset import DatasetSplits, ImageSet, RawDataset, stored_levels
from .intensity import IDENTITY
from .splits import plan_splits

log = logging.getLogger(__name__)

_STATS_CHUNK_VALUES = 2**24  # pixel values summed at a time


def assemble(raw: RawDataset, cfg: DataConfig) -> DatasetSplits:
    if cfg.max_memory_gb <= 0:
        raise ConfigError(f"max_memory_gb must be positive, got {cfg.max_memory_gb}")
    _check_raw(raw)
    plan = plan_splits({split: labels for split, (_, labels) in raw.splits.items()}, cfg)
    _check_train_classes(raw, raw.splits[plan["train"][0]][1][plan["train"][1]])
    bytes_per_image = {split: int(np.prod(x.shape[1:])) * x.itemsize for split, (x, _) in raw.splits.items()}
    nbytes = sum(bytes_per_image[source] * len(rows) for source, rows in plan.values())
    streaming = nbytes > cfg.max_memory_gb * 1e9
    if streaming:
        log.info(
            "%s takes %.2f GB > max_memory_gb=%g: streaming it from the cache",
            raw.name,
            nbytes / 1e9,
            cfg.max_memory_gb,
        )
        images = _stream(raw, plan, cfg)
    else:
        images = {
            split: torch.from_numpy(np.ascontiguousarray(raw.splits[source][0][rows]))
            for split, (source, rows) in plan.items()
        }
    sets = {
        split: ImageSet(images[split], torch.from_numpy(raw.splits[source][1][rows].astype(np.int64)))
        for split, (source, rows) in plan.items()
    }
    mean, std = channel_stats(sets["train"].images)
    return DatasetSplits(
        name=raw.name,
        class_names=list(raw.class_names),
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        mean=mean,
        std=std,
        streaming=streaming,
        intensity=raw.intensity or IDENTITY,
    )


def _check_raw(raw: RawDataset) -> None:
    """:class:`DatasetError` unless ``raw`` has two classes or more, and every split images of the train split's
    shape, as many labels as images (at least one) and labels in ``0..K-1``."""
    if len(raw.class_names) < 2:
        classes = f"only 1 class ({raw.class_names[0]})" if raw.class_names else "no classes"
        raise DatasetError(f"{raw.name} has {classes}; a classifier needs at least 2, add images of another class")
    shape = raw.splits["train"][0].shape[1:]
    for split, (images, labels) in raw.splits.items():
        if len(images) == 0 or len(images) != len(labels):
            raise DatasetError(
                f"{raw.name}: its {split} split holds {len(images)} images and {len(labels)} labels; "
                "every split needs at least one image and one label per image"
            )
        if images.shape[1:] != shape:
            raise DatasetError(
                f"{raw.name}: its {split} split holds images of shape {tuple(images.shape[1:])} but train "
                f"{tuple(shape)}; every split needs one image shape"
            )
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= len(raw.class_names):
            raise DatasetError(
                f"{raw.name}: its {split} split has labels in [{low}, {high}], outside 0..{len(raw.class_names) - 1} "
                f"for {len(raw.class_names)} classes; fix the labels"
            )


def _check_train_classes(raw: RawDataset, train_labels: np.ndarray) -> None:
    """:class:`DatasetError` if no training image is left after carving val and test; a warning naming the classes
    without one (the model cannot learn them, though it trains)."""
    if len(train_labels) == 0:
        raise DatasetError(
            f"{raw.name} has no training images left after carving val and test; "
            "add images or lower val_fraction/test_fraction"
        )
    counts = np.bincount(train_labels, minlength=len(raw.class_names))
    empty = [raw.class_names[k] for k in np.flatnonzero(counts == 0)]
    if empty:
        log.warning(
            "%s: %d class(es) (%s) have no training images after carving val and test, so the model cannot learn "
            "them; add images of them, lower val_fraction/test_fraction or raise limit_train",
            raw.name,
            len(empty),
            ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )


def _stream(raw: RawDataset, plan: dict[str, tuple[str, np.ndarray]], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Each split as a read-only memmap: the dataset's own cache file where the split is all of it, else a file of
    its rows written once to the cache (keyed by the content and the rows taken)."""
    memmaps, to_write = {}, {}
    for split, (source, rows) in plan.items():
        images = raw.splits[source][0]
        if isinstance(images, np.memmap) and np.array_equal(rows, np.arange(len(images))):
            memmaps[split] = images
        else:
            to_write[split] = (images, rows)
    if to_write:
        digests = {split: hashlib.sha256(rows.tobytes()).hexdigest() for split, (_, rows) in to_write.items()}
        safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw.name)
        entry = cache_root(cfg.cache_dir) / "streams" / f"{safe_name}-{fingerprint(raw.fingerprint, digests)}"
        if not verified_entry(entry):
            with atomic_dir(entry) as tmp:
                for split, (images, rows) in to_write.items():
                    save_rows(tmp / f"{split}_images.npy", images, rows)
        memmaps |= {split: np.load(entry / f"{split}_images.npy", mmap_mode="r") for split in to_write}
    return memmaps


def channel_stats(images: torch.Tensor | np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 or uint16 ``(n, C, ...)`` images, in [0, 1] units (level /
    255, or / 65535).

    Exact integer sums (a chunk's in uint64, their total in Python integers), taken a chunk at a time so ``images``
    may be a memmap larger than memory. A constant channel gets std 1 rather than 0, so normalising never divides by
    zero.
    """
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    levels = stored_levels(array)
    channels, axes = array.shape[1], (0, *range(2, array.ndim))
    chunk = max(1, _STATS_CHUNK_VALUES // max(1, int(np.prod(array.shape[1:]))))
    total, squares = [0] * channels, [0] * channels
    for start in range(0, len(array), chunk):
        block = np.asarray(array[start : start + chunk])
        sums = block.sum(axis=axes, dtype=np.uint64)
        sums_of_squares = np.square(block, dtype=np.uint32).sum(axis=axes, dtype=np.uint64)
        total = [t + int(v) for t, v in zip(total, sums)]
        squares = [q + int(v) for q, v in zip(squares, sums_of_squares)]
    count = array.size // channels
    mean = [t / count / levels for t in total]
    # count * sum(x^2) - sum(x)^2 is exact in integers: no cancellation where the std is small against the mean
    std = [math.sqrt(max(count * q - t * t, 0) / count**2) / levels for t, q in zip(total, squares)]
    return tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std)
