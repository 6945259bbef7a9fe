"""The data section of a run's configuration (:class:`DataConfig`: the dataset, its splits, batches and
augmentation) and the rules of its texts (``--intensity``, ``--volume-shape``); re-exported by
:mod:`ddcnn.config.sections`. Every value is checked when the dataclass is built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .options import NORMALIZATIONS, check, check_choices, option


def optional_positive(value: float | None) -> bool:
    """Whether ``value`` is unset (None) or positive: the check of the options where None means 'not set'."""
    return value is None or value > 0


INTENSITY_FORMS = "auto, none, window:LO,HI (LO < HI) or percentile:P1,P99 (0 <= P1 < P99 <= 100)"


def parse_intensity(text: str) -> tuple[str, tuple[float, float] | None]:
    """``"window:-1000,400"`` -> ``("window", (-1000.0, 400.0))``, ``"auto"`` -> ``("auto", None)``: the rule of
    ``--intensity`` (:mod:`ddcnn.data.intensity` says what each does); ConfigError for any other text."""
    name, _, values = str(text).strip().lower().partition(":")
    if name in ("auto", "none") and not values:
        return name, None
    try:
        low, high = (float(v) for v in values.split(","))
    except ValueError:
        low = high = math.nan
    bounds = (0 <= low and high <= 100) if name == "percentile" else name == "window"
    if not (bounds and math.isfinite(low) and math.isfinite(high) and low < high):
        check(False, "intensity", text, f"one of {INTENSITY_FORMS}")
    return name, (low, high)


def parse_volume_shape(text: str | tuple[int, ...] | list[int] | None) -> tuple[int, int, int] | None:
    """``"64x64x64"`` (or ``[64, 64, 64]``, as YAML may give it) -> ``(64, 64, 64)`` (D x H x W voxels); None stays
    None."""
    if text is None:
        return None
    parts = text if isinstance(text, (tuple, list)) else re.split(r"[x*,]", str(text).lower().strip("[]() "))
    try:
        shape = tuple(int(v) for v in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        check(False, "volume_shape", text, "three positive voxel counts DxHxW, e.g. 64x64x64, or unset")
    return shape  # type: ignore[return-value]


@dataclass
class DataConfig:
    dataset: str = option(
        "mnist5k", group="data",
        help="name or name:PATH: mnist5k, cifar10[:PATH], imagefolder:PATH, csv:FILE, npz:PATH, nifti:PATH "
        "(`ddcnn datasets` lists them)",
    )
    image_size: int | None = option(
        None, group="data",
        help="side length in pixels that imagefolder images (and CIFAR-10 read from an image tree) are resized to; "
        "unset: the images' own size",
    )
    batch_size: int = option(
        64, group="training",
        help="training images per step, of the whole job (under torchrun --parallel data each process takes a "
        "share); the aggregation phase has its own, --aggregator-batch-size",
    )
    eval_batch_size: int = option(
        512, group="training", help="images per batch when evaluating and computing local probabilities (speed only)"
    )
    augment: bool = option(True, group="data", help="augment the training images (random crops, and flips with --flip)")
    crop_padding: int = option(
        2, group="data", help="random-crop translation in pixels, per axis (reflect-padded); 0 turns crops off"
    )
    flip: bool = option(
        False, group="data", help="random horizontal flips (last axis) of half the training images; off by default "
        "because it breaks digits",
    )
    normalize: str = option(
        "data", group="data", choices=NORMALIZATIONS,
        help="the per-channel mean and std that inputs are normalised with, in training and inside the trained model "
        "(ddcnn.load, predict, export): data (the training split's) or imagenet (ImageNet's, which pretrained "
        "weights expect, see --init-weights; for 1-channel images the mean of its three means and of its three stds)",
    )
    val_fraction: float = option(
        0.1, group="data", help="fraction of the training data held out for validation, in [0, 1), where a dataset "
        "has no validation split",
    )
    test_fraction: float = option(
        0.2, group="data",
        help="fraction of all data held out for testing, in [0, 1), where a dataset has no test split",
    )
    split_seed: int = option(
        0, group="data", help="seed of the deterministic, stratified val and test splits (the same for every "
        "training seed)",
    )
    limit_train: int | None = option(
        None, group="data", help="train on only this many training images (stratified), for quick runs; unset: all"
    )
    cache_dir: str | None = option(
        None, group="data", help="folder of decoded images, extracted archives and streamed splits; unset: "
        "~/.cache/ddcnn",
    )
    max_memory_gb: float = option(
        4.0, group="data", help="datasets whose stored images (uint8, or uint16) take more GB (10^9 bytes) than "
        "this are streamed from the on-disk cache instead of held in memory",
    )
    num_workers: int = option(
        0, group="data", help="DataLoader worker processes reading a streamed dataset; 0: the main process "
        "(in-memory datasets use none)",
    )
    intensity: str = option(
        "auto", group="data",
        help="how raw values become stored levels (docs: ddcnn.data.intensity): auto (8-bit data as is, integers "
        "in their 16-bit range, else the min..max), none (fixed ranges only), window:LO,HI (CT windowing: LO..HI, "
        "e.g. Hounsfield units -1000,400, mapped to [0, 1], clipped) or percentile:P1,P99 (those percentiles of "
        "the train split as the window); 16 bits are stored where 8 would lose levels",
    )
    volume_shape: str | None = option(
        None, group="data",
        help="DxHxW voxel grid that nifti volumes are resampled to (trilinear), e.g. 64x64x64; unset: their own "
        "shape, which must then be one for all",
    )

    def __post_init__(self) -> None:
        rule, values = parse_intensity(self.intensity)
        self.intensity = rule if values is None else f"{rule}:{values[0]:g},{values[1]:g}"
        shape = parse_volume_shape(self.volume_shape)
        self.volume_shape = None if shape is None else "x".join(map(str, shape))
        check(optional_positive(self.image_size), "image_size", self.image_size, "a positive side length or None")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "at least 1")
        check(self.crop_padding >= 0, "crop_padding", self.crop_padding, "0 or more pixels")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "in [0, 1)")
        check(self.split_seed >= 0, "split_seed", self.split_seed, "0 or more")
        check(optional_positive(self.limit_train), "limit_train", self.limit_train, "a positive count or None")
        check(self.max_memory_gb > 0, "max_memory_gb", self.max_memory_gb, "positive")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "0 or more")
        check_choices(self)
