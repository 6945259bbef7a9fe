"""``npz:PATH``: images and labels as numpy arrays in an .npz file (read with ``allow_pickle=False``).

Arrays, in one of three forms, told apart by their names:

* MedMNIST's files as the ``medmnist`` package downloads them (e.g. ``adrenalmnist3d_64.npz``): ``train_images,
  train_labels, val_images, val_labels, test_images, test_labels``; images ``(n, H, W)`` (gray), ``(n, H, W, 3)``
  (RGB) or ``(n, D, H, W)`` (3D), labels ``(n, 1)``. Multi-label tasks (ChestMNIST, labels ``(n, 14)``) are refused:
  ddcnn trains single-label classifiers. The files hold no class names: classes are numbered.
* Split arrays ``x_train, y_train`` with optional ``x_val, y_val`` and ``x_test, y_test`` (the Keras convention, and
  that of the AdrenalMNIST3D repackaging in the shared data, which adds ``class_names``).
* One unsplit set ``x, y`` or ``images, labels`` (val and test are then carved out, see ``splits``).

Optional with any form: ``class_names``, a string array; ``layout``, a string naming the image axes: NHW, NHWC, NCHW
(2D) or NDHW, NDHWC, NCDHW (3D volumes).

Without ``layout`` the shape decides: ``(n, H, W)`` is 2D gray; ``(n, H, W, C)`` with C in {1, 3, 4} is 2D
channels-last; any other 4D shape is a 3D gray volume ``(n, D, H, W)``; 5D is ``(n, D, H, W, C)`` if its last size
is 1 or 3, else ``(n, C, D, H, W)``. Pass ``layout`` where this guesses wrong.

Every split must hold at least one image, all splits the same image shape and the same kind of pixel numbers (all
bool, all integers or all floats: one intensity rule serves them all), and one label per image.

Labels are ``(n,)`` or ``(n, 1)`` class indices in ``0..K-1``: integers, or floats with whole values. With
``class_names``, K is its length; without, K is the largest label + 1, and every class ``0..K-1`` must occur in some
split, so labels such as {0, 100000} are refused (before anything is allocated per class) rather than read as
100001 classes. Pixels go through ``--intensity`` (:mod:`ddcnn.data.intensity`), one rule for all splits: uint8 as
they are; bool as 0/255; values within [0, 1] or [0, 255] as 8-bit images (at 16 bits where 8 would lose levels);
12-bit, 16-bit and int16 (CT in Hounsfield units) values at 16 bits in their range; NaN/inf is an error.
:func:`pixels_to_uint8` is the rule of the 8-bit releases, which ``ddcnn predict`` applies to ``.npy`` files for the
models they trained.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DatasetError
from .cache import file_stamp, fingerprint
from .dataset import RawDataset
from .intensity import resolve_intensity

LAYOUTS = ("NHW", "NHWC", "NCHW", "NDHW", "NDHWC", "NCDHW")
_UNSPLIT_NAMES = (("x", "y"), ("images", "labels"))
_SPLIT_NAMES = {  # the split forms: a split -> the names of its images and labels
    "medmnist": {split: (f"{split}_images", f"{split}_labels") for split in ("train", "val", "test")},
    "x_train": {split: (f"x_{split}", f"y_{split}") for split in ("train", "val", "test")},
}


def load_npz(path: str | None, cfg: DataConfig) -> RawDataset:
    if path is None:
        raise ConfigError("npz needs a path: npz:PATH to an .npz file with x_train, y_train (see `ddcnn datasets`)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise DatasetError(f"{file} does not exist; pass npz:PATH to an existing .npz file")
    try:
        arrays = np.load(file, allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise DatasetError(
                f"{file} is a single .npy array, not an .npz archive; save it with "
                "np.savez(file, x_train=..., y_train=...)"
            )
        with arrays:
            named = {name: arrays[name] for name in arrays.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DatasetError(
            f"{file} is not a valid .npz file without pickled objects ({e}); save it with "
            "np.savez from plain numeric arrays"
        ) from None
    form, names = _split_names(named, file)
    raw = {split: (named[x], named[y]) for split, (x, y) in names.items()}
    layout = _layout(named, file)
    class_names = _strings(named["class_names"], "class_names", file) if "class_names" in named else None
    if class_names is not None and not class_names:
        raise DatasetError(f"{file}: class_names is empty; store one name per class or leave it out")
    channels_first = {split: _to_channels_first(x, layout, names[split][0], file) for split, (x, _) in raw.items()}
    _check_images(channels_first, {split: x for split, (x, _) in names.items()}, file)
    total = sum(len(x) for x in channels_first.values())
    if form == "medmnist":
        _refuse_multi_label(raw, names, file)
    labels = {
        split: _labels(y, len(channels_first[split]), names[split][1], file, class_names, total)
        for split, (_, y) in raw.items()
    }
    class_names = class_names or _numbered_classes(labels, file)
    arrays = {names[split][0]: x for split, x in channels_first.items()}
    intensity = resolve_intensity(cfg.intensity, arrays, [names["train"][0]], file)
    images = {split: x if intensity.is_identity else intensity.apply(x) for split, x in channels_first.items()}
    return RawDataset(
        name=f"npz:{file.stem}",
        class_names=class_names,
        splits={split: (np.ascontiguousarray(images[split]), labels[split]) for split in raw},
        fingerprint=fingerprint(str(file.resolve()), file_stamp(file), cfg.intensity),
        location=str(file),
        intensity=intensity,
    )


def _split_names(named: dict[str, np.ndarray], file: Path) -> tuple[str, dict[str, tuple[str, str]]]:
    """The file's form (``medmnist``, ``x_train`` or ``unsplit``) and ``{split: (images name, labels name)}``."""
    for form, splits in _SPLIT_NAMES.items():
        if not any(name in named for name in splits["train"]):
            continue
        found = {}
        for split, pair in splits.items():
            present = [name for name in pair if name in named]
            if len(present) == 1:
                raise DatasetError(
                    f"{file} has {present[0]} but not its partner; store {pair[0]} and {pair[1]} together"
                )
            if present:
                found[split] = pair
        if "train" not in found:
            raise DatasetError(f"{file} has no train split; store {' and '.join(splits['train'])}")
        return form, found
    for x, y in _UNSPLIT_NAMES:
        if x in named and y in named:
            return "unsplit", {"train": (x, y)}
    raise DatasetError(
        f"{file} holds arrays {sorted(named)}; expected train_images, train_labels (MedMNIST, optionally with val_ "
        "and test_), x_train, y_train (optionally x_val, y_val, x_test, y_test), or x, y, or images, labels"
    )


def _refuse_multi_label(
    raw: dict[str, tuple[np.ndarray, np.ndarray]], names: dict[str, tuple[str, str]], file: Path
) -> None:
    """A one-line :class:`DatasetError` for MedMNIST's multi-label tasks: labels ``(n, K)`` with K > 1."""
    for split, (_, y) in raw.items():
        if y.ndim == 2 and y.shape[1] > 1:
            raise DatasetError(
                f"{file}: {names[split][1]} holds {y.shape[1]} labels per image, a multi-label MedMNIST task (as "
                "ChestMNIST); ddcnn trains single-label classifiers, so multi-label tasks are not supported"
            )


def _strings(value: np.ndarray, name: str, file: Path) -> list[str]:
    if value.dtype.kind not in "US":
        raise DatasetError(
            f"{file}: {name} is a {value.dtype} array; store it as a string array, e.g. np.array(['cat', 'dog'])"
        )
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def _layout(named: dict[str, np.ndarray], file: Path) -> str | None:
    if "layout" not in named:
        return None
    values = _strings(named["layout"], "layout", file)
    layout = values[0].upper() if len(values) == 1 else None
    if layout not in LAYOUTS:
        raise DatasetError(f"{file}: layout {values} is not one of {', '.join(LAYOUTS)}")
    return layout


def _guess_layout(shape: tuple[int, ...]) -> str | None:
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        return "NHWC" if shape[-1] in (1, 3, 4) else "NDHW"
    if len(shape) == 5:
        return "NDHWC" if shape[-1] in (1, 3) else "NCDHW"
    return None


def _to_channels_first(x: np.ndarray, layout: str | None, name: str, file: Path) -> np.ndarray:
    """``x`` as ``(n, C, H, W)`` or ``(n, C, D, H, W)`` (still in its own dtype)."""
    layout = layout or _guess_layout(x.shape)
    if layout is None or len(layout) != x.ndim:
        raise DatasetError(
            f"{file}: {name} has shape {x.shape}, which is not an image or volume batch "
            f"({layout or 'N[C][D]HW[C]'}); store (n, H, W[, C]) or (n, D, H, W[, C]) or give layout"
        )
    if "C" not in layout:
        return x[:, None]
    return np.moveaxis(x, -1, 1) if layout.endswith("C") else x


def pixels_to_uint8(arrays: Mapping[str, np.ndarray], source: str | Path) -> dict[str, np.ndarray]:
    """The named image arrays as contiguous uint8, all scaled by one rule chosen from their joint value range (see
    the module docstring); :class:`DatasetError` naming ``source`` and the array for NaN/inf or out-of-range values.
    """
    if not all(x.dtype.kind in "biuf" for x in arrays.values()):
        dtypes = ", ".join(f"{name} {x.dtype}" for name, x in arrays.items())
        raise DatasetError(f"{source}: images of dtype {dtypes}; store numbers (uint8, or floats in [0, 1])")
    scaled = {name: x for name, x in arrays.items() if x.dtype.kind in "iuf" and x.dtype != np.uint8}
    low, high = 0.0, 0.0
    for name, x in scaled.items():
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DatasetError(f"{source} contains NaN/inf values in {name}; clean the data")
        if x.size:
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    if low < 0 or high > 255:
        raise DatasetError(f"{source}: images have values in [{low:g}, {high:g}]; rescale them to [0, 1] or [0, 255]")
    scale = 255.0 if high <= 1 else 1.0
    converted = {}
    for name, x in arrays.items():
        if name in scaled:
            x = np.rint(x * scale)
        elif x.dtype == np.bool_:
            x = x * np.uint8(255)
        converted[name] = np.ascontiguousarray(x, dtype=np.uint8)
    return converted


def _check_images(images: dict[str, np.ndarray], names: dict[str, str], file: Path) -> None:
    """Every split non-empty, of the train split's image shape ``(C, *spatial)`` and kind of pixel numbers;
    ``names``: each split's array name."""
    train = images["train"]
    for split, x in images.items():
        name = names[split]
        if len(x) == 0:
            raise DatasetError(f"{file}: {name} holds no images; store at least one image in it or leave it out")
        if 0 in x.shape:
            raise DatasetError(
                f"{file}: {name} holds images of shape {_image_shape(x)}, without pixels; store non-empty images"
            )
        if x.shape[1:] != train.shape[1:]:
            raise DatasetError(
                f"{file}: {name} holds images of shape {_image_shape(x)} but {names['train']} {_image_shape(train)} "
                "(channels x size); store every split at one image shape"
            )
        if _pixel_kind(x) != _pixel_kind(train):
            raise DatasetError(
                f"{file}: {name} is {x.dtype} but {names['train']} {train.dtype}; store every split as the same "
                "kind of numbers (all uint8, or all floats in [0, 1]) so one intensity rule fits them all"
            )


def _image_shape(x: np.ndarray) -> str:
    return " x ".join(map(str, x.shape[1:]))


def _pixel_kind(x: np.ndarray) -> str:
    """``bool``, ``integer`` or ``float`` (other dtypes: their own kind, refused by the intensity rule)."""
    return {"b": "bool", "i": "integer", "u": "integer", "f": "float"}.get(x.dtype.kind, x.dtype.kind)


def _labels(y: np.ndarray, n: int, name: str, file: Path, class_names: list[str] | None, total: int) -> np.ndarray:
    """``y`` as int64 class indices ``(n,)``, checked to be whole numbers below ``len(class_names)`` or, without
    class names, below ``total`` (the images in all splits: a larger label leaves some class without images)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(
            f"{file}: {name} has shape {y.shape}; store one class index per image, shape ({n},) or ({n}, 1) "
            "(one-hot labels: store their argmax)"
        )
    if len(y) != n:
        raise DatasetError(f"{file}: {name} holds {len(y)} labels for {n} images; store one label per image")
    if y.dtype.kind not in "biuf":
        raise DatasetError(f"{file}: {name} is a {y.dtype} array; store integer class indices 0..K-1")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DatasetError(f"{file}: {name} contains NaN/inf labels; store integer class indices 0..K-1")
        if (fractional := y[y != np.round(y)]).size:
            raise DatasetError(
                f"{file}: {name} holds non-integer labels (e.g. {fractional[0]:g}); store integer class indices 0..K-1"
            )
    low, high = int(y.min()), int(y.max())  # whole numbers; n > 0, as empty splits were refused
    if low < 0:
        raise DatasetError(f"{file}: {name} holds negative labels (down to {low}); store class indices 0..K-1")
    if class_names is not None and high >= len(class_names):
        raise DatasetError(
            f"{file}: {name} has labels in [{low}, {high}], outside 0..{len(class_names) - 1} for "
            f"{len(class_names)} classes; fix the labels or class_names"
        )
    if class_names is None and high >= total:
        raise DatasetError(
            f"{file}: {name} holds label {high}, but the dataset has only {total} images, so most of the classes "
            f"0..{high} would have none; relabel the classes 0..K-1 (e.g. np.unique(y, return_inverse=True))"
        )
    return y.astype(np.int64)


def _numbered_classes(labels: dict[str, np.ndarray], file: Path) -> list[str]:
    """Names ``"0"``, ``"1"``, ... for classes ``0..K-1`` (K the largest label + 1), if every one has images."""
    counts = np.bincount(np.concatenate(list(labels.values())))  # labels < the number of images: small
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if missing.size > 5 else "")
        raise DatasetError(
            f"{file}: labels run up to {len(counts) - 1} but classes {shown} ({missing.size} of {len(counts)}) have "
            "no images; relabel the classes 0..K-1 (e.g. np.unique(y, return_inverse=True)) or give class_names"
        )
    return [str(k) for k in range(len(counts))]
