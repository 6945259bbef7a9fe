"""``npz:PATH``: images and labels as numpy arrays in an .npz file (read with ``allow_pickle=False``).

Arrays. ``x_train, y_train`` with optional ``x_val, y_val`` and ``x_test, y_test`` (the MedMNIST convention), or
one unsplit set ``x, y`` or ``images, labels`` (val and test are then carved out, see ``splits``). Optional:
``class_names``, a string array; ``layout``, a string naming the image axes: NHW, NHWC, NCHW (2D) or NDHW, NDHWC,
NCDHW (3D volumes).

Without ``layout`` the shape decides: ``(n, H, W)`` is 2D gray; ``(n, H, W, C)`` with C in {1, 3, 4} is 2D
channels-last; any other 4D shape is a 3D gray volume ``(n, D, H, W)``; 5D is ``(n, D, H, W, C)`` if its last size
is 1 or 3, else ``(n, C, D, H, W)``. Pass ``layout`` where this guesses wrong.

Labels are ``(n,)`` or ``(n, 1)`` integers in ``0..K-1``; K is ``len(class_names)``, else the largest label + 1.
Pixels: uint8 as they are; bool as 0/255; other numbers are checked for NaN/inf and scaled by one rule for all
splits: values within [0, 1] are multiplied by 255, values within [0, 255] kept, both rounded; anything else is an
error asking to rescale.
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

LAYOUTS = ("NHW", "NHWC", "NCHW", "NDHW", "NDHWC", "NCDHW")
_UNSPLIT_NAMES = (("x", "y"), ("images", "labels"))


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
    raw = _split_arrays(named, file)
    layout = _layout(named, file)
    class_names = _strings(named["class_names"], "class_names", file) if "class_names" in named else None
    named_images = pixels_to_uint8(
        {f"x_{split}": _to_channels_first(x, layout, f"x_{split}", file) for split, (x, _) in raw.items()}, file
    )
    images = {split: named_images[f"x_{split}"] for split in raw}
    labels = {split: _labels(y, len(images[split]), f"y_{split}", file) for split, (_, y) in raw.items()}
    num_classes = len(class_names) if class_names else max(int(y.max(initial=0)) for y in labels.values()) + 1
    for split, y in labels.items():
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(
                f"{file}: y_{split} has labels in [{y.min()}, {y.max()}], outside 0..{num_classes - 1}"
                f" for {num_classes} classes; fix the labels or class_names"
            )
    return RawDataset(
        name=f"npz:{file.stem}",
        class_names=class_names or [str(k) for k in range(num_classes)],
        splits={split: (images[split], labels[split]) for split in raw},
        fingerprint=fingerprint(str(file.resolve()), file_stamp(file)),
        location=str(file),
    )


def _split_arrays(named: dict[str, np.ndarray], file: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` from the file's array names."""
    if "x_train" in named or "y_train" in named:
        splits = {}
        for split in ("train", "val", "test"):
            present = [name for name in (f"x_{split}", f"y_{split}") if name in named]
            if len(present) == 1:
                raise DatasetError(
                    f"{file} has {present[0]} but not its partner; store x_{split} and y_{split} together"
                )
            if present:
                splits[split] = (named[f"x_{split}"], named[f"y_{split}"])
        if "train" not in splits:
            raise DatasetError(f"{file} has no train split; store x_train and y_train")
        return splits
    for x, y in _UNSPLIT_NAMES:
        if x in named and y in named:
            return {"train": (named[x], named[y])}
    raise DatasetError(
        f"{file} holds arrays {sorted(named)}; expected x_train, y_train (optionally x_val, y_val, "
        "x_test, y_test), or x, y, or images, labels"
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


def _labels(y: np.ndarray, n: int, name: str, file: Path) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DatasetError(
            f"{file}: {name} has shape {y.shape} ({y.dtype}); store {n} integer labels, shape ({n},) or ({n}, 1)"
        )
    return y.astype(np.int64)
