"""Deterministic stratified splits: which images of a dataset's own splits make up train, val and test.

A split the dataset lacks is carved from its train split, per class in proportion to the class sizes, with
``cfg.split_seed``: test first (``cfg.test_fraction`` of it), then val (``cfg.val_fraction`` of what remains). For a
dataset that ships only images and labels this is "test = test_fraction of all, val = val_fraction of the rest".
``cfg.limit_train`` finally keeps a stratified subset of the training images; val and test are unaffected.

A positive fraction carves at least one image, also where it rounds to none (0.1 of 4 images); only 0 leaves its split
empty. A ``limit_train`` below the number of classes is an error; one above the training images available keeps them
all, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SEED_STREAMS = {"test": 0, "val": 1, "limit_train": 2}  # an independent random stream per carving step


def stratified_sample(labels: np.ndarray, count: int, seed: int, stream: int = 0) -> np.ndarray:
    """Sorted positions of ``count`` entries of ``labels``, drawn per class in proportion to the class sizes.

    Class quotas are rounded by largest remainder, so they add up to exactly ``count``. ``(seed, stream)`` seeds the
    draw; different streams give independent draws from one seed.
    """
    if count <= 0 or len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    count = min(count, len(labels))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quota = counts * (count / len(labels))
    take = np.floor(quota).astype(np.int64)
    largest_remainders = np.argsort(-(quota - take), kind="stable")
    take[largest_remainders[: count - int(take.sum())]] += 1
    rng = np.random.default_rng([seed, stream])
    chosen = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(take)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def plan_splits(labels: Mapping[str, np.ndarray], cfg: DataConfig) -> dict[str, tuple[str, np.ndarray]]:
    """For each of train, val and test: the dataset split it is taken from and the (sorted) positions in it.

    ``labels`` maps the dataset's own split names (``train`` required, ``val``/``test`` optional) to their labels.
    """
    _check_split_config(cfg)
    train = np.arange(len(labels["train"]))
    plan: dict[str, tuple[str, np.ndarray]] = {}
    for split, fraction in (("test", cfg.test_fraction), ("val", cfg.val_fraction)):
        if split in labels:
            plan[split] = (split, np.arange(len(labels[split])))
            continue
        count = max(1, round(fraction * len(train))) if fraction > 0 else 0  # else 0.1 of 4 images: an empty split
        taken = stratified_sample(labels["train"][train], count, cfg.split_seed, _SEED_STREAMS[split])
        plan[split] = ("train", train[taken])
        train = np.delete(train, taken)
    if cfg.limit_train is not None:
        train = train[_limit_train(labels["train"][train], cfg)]
    plan["train"] = ("train", train)
    return {split: plan[split] for split in SPLITS}


def _limit_train(labels: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Positions of the ``cfg.limit_train`` training images kept, a stratified sample of ``labels``."""
    classes = len(np.unique(labels))
    if cfg.limit_train < classes:
        raise ConfigError(
            f"limit_train={cfg.limit_train} is fewer images than the {classes} classes, so some class would have "
            f"no training image; set limit_train to at least {classes}"
        )
    if cfg.limit_train > len(labels):
        log.warning("limit_train=%d exceeds the %d training images; using all of them", cfg.limit_train, len(labels))
    return stratified_sample(labels, cfg.limit_train, cfg.split_seed, _SEED_STREAMS["limit_train"])


def _check_split_config(cfg: DataConfig) -> None:
    for key in ("val_fraction", "test_fraction"):
        value = getattr(cfg, key)
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if cfg.split_seed < 0:
        raise ConfigError(f"split_seed must be non-negative, got {cfg.split_seed}")
    if cfg.limit_train is not None and cfg.limit_train < 1:
        raise ConfigError(f"limit_train must be a positive number of images (or unset), got {cfg.limit_train}")
