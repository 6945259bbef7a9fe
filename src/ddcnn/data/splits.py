"""Deterministic stratified splits: which images of a dataset's own splits make up train, val and test.

A split the dataset lacks is carved from its train split, per class in proportion to the class sizes, with
``cfg.split_seed``: test first (``cfg.test_fraction`` of it), then val (``cfg.val_fraction`` of what remains). For a
dataset that ships only images and labels this is "test = test_fraction of all, val = val_fraction of the rest".
``cfg.limit_train`` finally keeps a stratified subset of the training images; val and test are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError

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
        taken = stratified_sample(
            labels["train"][train], round(fraction * len(train)), cfg.split_seed, _SEED_STREAMS[split]
        )
        plan[split] = ("train", train[taken])
        train = np.delete(train, taken)
    if cfg.limit_train is not None:
        train = train[
            stratified_sample(labels["train"][train], cfg.limit_train, cfg.split_seed, _SEED_STREAMS["limit_train"])
        ]
    plan["train"] = ("train", train)
    return {split: plan[split] for split in SPLITS}


def _check_split_config(cfg: DataConfig) -> None:
    for key in ("val_fraction", "test_fraction"):
        value = getattr(cfg, key)
        if not 0 <= value < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    if cfg.split_seed < 0:
        raise ConfigError(f"split_seed must be non-negative, got {cfg.split_seed}")
    if cfg.limit_train is not None and cfg.limit_train < 1:
        raise ConfigError(f"limit_train must be a positive number of images (or unset), got {cfg.limit_train}")
