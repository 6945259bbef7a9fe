"""Image files to arrays, for ``imagefolder`` and ``csv`` datasets and for ``ddcnn predict``: :func:`decode_raw` (one
file, 16-bit gray kept), :func:`decode_image` (one file at 8 bits) and :func:`decode_to_cache` (a list of files,
decoded once into a cache entry through the ``--intensity`` transform).

Modes. If every image is grayscale (modes 1, L, LA, I;16, and I with values in 0..65535) the dataset has 1 channel,
else every image becomes RGB (3 channels). Alpha (LA, RGBA, PA, P with transparency) is composited on black, so fully
transparent pixels are black whatever colour they store; palettes are expanded; CMYK and YCbCr are converted by PIL.
16-bit gray images (I;16, and I) keep their 16 bits, resized in float32 and rounded; if one image of a gray dataset
is 16-bit, its 8-bit images are read in the 16-bit range (times 257, so 255 stays white). In a dataset with colour
images, 16-bit ones keep their 8 high bits (with a warning naming one). Other modes (F, ...) raise
:class:`UnsupportedImageModeError`.

Size. Images are resized to ``size`` (bilinear, antialiased when shrinking; the aspect ratio is not kept).

Intensities. 8-bit images under ``--intensity auto`` or ``none`` are stored as they are (uint8); otherwise the raw
values (8- or 16-bit) go through :func:`~ddcnn.data.intensity.resolve_intensity` (the train split's values for a
percentile) and are stored as uint8 or uint16 levels. The cache entry's ``meta.json`` records the transform, and
its manifest the rule and the dtype (:mod:`ddcnn.data.manifest`), so an entry made for another ``--intensity`` is
rebuilt.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..config import DataConfig
from ..errors import CorruptImageError, UnsupportedImageModeError
from .cache import allocate_npy, atomic_dir, fingerprint, save_rows, verified_entry
from .dataset import RawDataset
from .intensity import IDENTITY, Intensity, resolve_intensity

log = logging.getLogger(__name__)

_GRAY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I"})
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # kept at 16 bits
_COLOR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "RGBA", "PA"})
DECODING_VERSION = 2  # part of cache keys and manifests: bump it when the decoding rules above change (2: 16 bits)
_8_TO_16 = 257  # 255 * 257 = 65535: an 8-bit level in the 16-bit range
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ImageFile:
    path: str
    split: str
    row: int  # position within its split
    label: int
    stamp: tuple[int, int]  # (size, mtime in ns), for the cache key


def decode_raw(path: str | Path, size: tuple[int, int], channels: int | None = None) -> np.ndarray:
    """One image file as ``(C, H, W)`` resized to ``size`` (width, height): uint16 for a 16-bit gray image (unless
    ``channels`` is 3), else uint8. ``channels``: 1 (gray) or 3 (RGB), or None for the image's own kind. Raises
    :class:`CorruptImageError` or :class:`UnsupportedImageModeError` naming the file."""
    return _decode(path, size, channels, keep_16_bits=True)


def decode_image(path: str | Path, size: tuple[int, int], channels: int | None = None) -> np.ndarray:
    """One image file as uint8 ``(C, H, W)``, as :func:`decode_raw` but with 16-bit images cut to their 8 high bits
    (what a model trained on 8-bit images takes)."""
    return _decode(path, size, channels, keep_16_bits=False)


def _decode(path: str | Path, size: tuple[int, int], channels: int | None, keep_16_bits: bool) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in _GRAY_MODES | _COLOR_MODES:
                raise UnsupportedImageModeError(
                    f"{path} has image mode {img.mode}, which ddcnn does not convert; save it as 8-bit grayscale (L), "
                    "16-bit grayscale (I;16) or RGB"
                )
            if channels is None:
                channels = 1 if img.mode in _GRAY_MODES else 3
            if img.mode in _WIDE_MODES:
                wide = _wide_values(img, path, size)
                if keep_16_bits and channels == 1:
                    return wide[None]
                img = Image.fromarray((wide >> 8).astype(np.uint8))
            img = _to_8bit_opaque(img).convert("L" if channels == 1 else "RGB")
            if img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path} cannot be decoded ({e}); delete or replace it") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _wide_values(img: Image.Image, path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A 16-bit gray image as uint16 ``(H, W)`` of ``size``, resized in float32 and rounded."""
    values = np.asarray(img)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UnsupportedImageModeError(
            f"{path} is a 32-bit integer image with values in [{values.min()}, {values.max()}], beyond 16 bits; save "
            "it as 16-bit grayscale (I;16) with values in 0..65535"
        )
    if values.shape[::-1] != size:
        resized = Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
        values = np.clip(np.rint(np.asarray(resized)), 0, 65535)
    return values.astype(np.uint16)


def _to_8bit_opaque(img: Image.Image) -> Image.Image:
    """``img`` without alpha (composited on black), with 8 bits per channel."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        with_alpha = np.asarray(img.convert("LA" if img.mode == "LA" else "RGBA")).astype(np.uint16)
        color, alpha = with_alpha[..., :-1], with_alpha[..., -1:]
        composited = ((color * alpha + 127) // 255).astype(np.uint8)
        return Image.fromarray(composited[..., 0] if img.mode == "LA" else composited)
    return img


def image_size(path: str) -> tuple[int, int]:
    """(width, height), from the header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path} cannot be decoded ({e}); delete or replace it") from None


def image_values(path: str | Path, size: tuple[int, int], channels: int, intensity: Intensity) -> np.ndarray:
    """One image file's raw values as a dataset of ``intensity`` read them (16-bit images kept, and 8-bit ones in
    the 16-bit range where that dataset had 16-bit images): what ``ddcnn predict`` gives a model that records a
    transform."""
    values = decode_raw(path, size, channels)
    if intensity.source_dtype == "uint16" and values.dtype == np.uint8:
        return values.astype(np.uint16) * np.uint16(_8_TO_16)
    return values


def parallel_map(fn: Callable[[T], R], items: Sequence[T], desc: str, unit: str = "img") -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, with a progress bar; the first exception cancels the rest.

    Threads overlap the parts of decoding and resizing that PIL (and zlib) run without the GIL (most of the work for
    large images); unlike worker processes they need no imports, no pickling and no ``__main__`` guard.
    """
    pool = ThreadPoolExecutor()
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit=unit, disable=None))
    finally:
        pool.shutdown(cancel_futures=True)


def read_decoded(
    files: list[ImageFile],
    class_names: list[str],
    cfg: DataConfig,
    folder: Path,
    name: str,
    source: str,
    listing: list,
) -> RawDataset:
    """The image ``files`` (train first) as a dataset, decoded into ``folder/<name>-<key>/`` the first time. The key
    hashes ``source`` (the dataset's resolved path), ``listing`` (what identifies the files: paths, labels, splits,
    sizes, mtimes), ``cfg.image_size``, ``cfg.intensity`` and the decoding rules."""
    key = fingerprint(DECODING_VERSION, source, cfg.image_size, cfg.intensity, listing)
    entry = folder / f"{name.partition(':')[2] or name}-{key}"
    if not verified_entry(entry, {"decoding": DECODING_VERSION, "intensity": cfg.intensity}):
        size = (cfg.image_size, cfg.image_size) if cfg.image_size else image_size(files[0].path)
        decode_to_cache(files, class_names, size, entry, cfg.intensity, source)
    meta = json.loads((entry / "meta.json").read_text())
    splits = {
        split: (np.load(entry / f"{split}_images.npy", mmap_mode="r"), np.load(entry / f"{split}_labels.npy"))
        for split in meta["splits"]
    }
    intensity = Intensity.from_dict(meta["intensity"])
    return RawDataset(name, meta["class_names"], splits, fingerprint=key, location=str(entry), intensity=intensity)


def decode_to_cache(
    files: list[ImageFile], class_names: list[str], size: tuple[int, int], entry: Path, rule: str, source: str
) -> None:
    """Decode every image into ``entry``: one pass into 3-channel uint8 staging arrays (a gray image replicated,
    which is what converting it to RGB does) and, for 16-bit images, 1-channel uint16 ones; then the stored levels
    of ``rule`` (``--intensity``) written from them. ``source``: the dataset, as errors name it."""
    log.info("decoding %d images into %s (once; later runs read the cache)", len(files), entry)
    width, height = size
    counts = {split: sum(f.split == split for f in files) for split in dict.fromkeys(f.split for f in files)}
    meta = {"decoding": DECODING_VERSION, "intensity": rule}
    with atomic_dir(entry, meta) as tmp:
        staging = {
            split: allocate_npy(tmp / f"{split}_staging.npy", np.uint8, (n, 3, height, width))
            for split, n in counts.items()
        }
        wide: dict[str, np.ndarray] = {}  # 16-bit rows, allocated when the first 16-bit image turns up
        lock = threading.Lock()

        def decode_into_staging(file: ImageFile) -> tuple[bool, bool]:
            image = decode_raw(file.path, (width, height))
            if image.dtype == np.uint16:
                with lock:
                    if not wide:
                        wide.update(_allocate_wide(tmp, counts, (height, width)))
                wide[file.split][file.row] = image
                return True, True
            staging[file.split][file.row] = image  # a gray (1, H, W) image fills all three channels
            return len(image) == 1, False

        kinds = parallel_map(decode_into_staging, files, desc="decoding images")
        all_gray = all(gray for gray, _ in kinds)
        sixteen = {f.split: [] for f in files}
        for file, (_, is_wide) in zip(files, kinds):
            sixteen[file.split].append(is_wide)
        channels = 1 if all_gray else 3
        raw = {split: staging[split][:, :channels] for split in counts}
        if wide and all_gray:
            for split in counts:
                _widen_8_bit_rows(wide[split], staging[split], np.array(sixteen[split]))
            raw = wide
        elif wide:
            first = next(f for f, (_, is_wide) in zip(files, kinds) if is_wide)
            log.warning(
                "%s is a 16-bit gray image in a dataset with colour images: it keeps its 8 high bits, as "
                "RGB (convert the colour images to gray to keep 16 bits)",
                first.path,
            )
            for split in counts:
                _narrow_16_bit_rows(wide[split], staging[split], np.array(sixteen[split]))
        intensity = _store(raw, tmp, rule, staging, channels, source)
        for split in counts:
            (tmp / f"{split}_staging.npy").unlink(missing_ok=True)
            (tmp / f"{split}_wide.npy").unlink(missing_ok=True)
            np.save(tmp / f"{split}_labels.npy", np.array([f.label for f in files if f.split == split]))
        info = {"class_names": class_names, "splits": list(counts), "counts": counts, "channels": channels}
        (tmp / "meta.json").write_text(json.dumps({**info, "intensity": intensity.to_dict()}, indent=1))
        meta.update(dtype=str(intensity.dtype), resolved=intensity.to_dict())


def _allocate_wide(tmp: Path, counts: dict[str, int], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    return {split: allocate_npy(tmp / f"{split}_wide.npy", np.uint16, (n, 1, *shape)) for split, n in counts.items()}


def _widen_8_bit_rows(wide: np.ndarray, staging: np.ndarray, is_wide: np.ndarray) -> None:
    """Fill the rows of ``wide`` that 8-bit gray images left empty with their levels in the 16-bit range."""
    for row in np.flatnonzero(~is_wide):
        wide[row, 0] = staging[row, 0].astype(np.uint16) * np.uint16(_8_TO_16)
    wide.flush()


def _narrow_16_bit_rows(wide: np.ndarray, staging: np.ndarray, is_wide: np.ndarray) -> None:
    """Fill the rows of ``staging`` that 16-bit images left empty with their 8 high bits, in all three channels."""
    for row in np.flatnonzero(is_wide):
        staging[row] = (wide[row] >> 8).astype(np.uint8)


def _store(
    raw: dict[str, np.ndarray], tmp: Path, rule: str, staging: dict[str, np.ndarray], channels: int, source: str
) -> Intensity:
    """Write ``<split>_images.npy`` from the raw values, through the transform of ``rule``; return it."""
    eight_bit = all(x.dtype == np.uint8 for x in raw.values())
    if eight_bit and rule in ("auto", "none"):  # the levels are the values: keep (or cut) the staging files
        for split, values in raw.items():
            staging[split].flush()
            if channels == 1:
                save_rows(tmp / f"{split}_images.npy", values, np.arange(len(values)))
            else:
                (tmp / f"{split}_staging.npy").rename(tmp / f"{split}_images.npy")
        return Intensity(rule, IDENTITY.low, IDENTITY.high, IDENTITY.levels, "uint8")
    intensity = resolve_intensity(rule, raw, ["train"], source)
    for split, values in raw.items():
        save_rows(tmp / f"{split}_images.npy", values, np.arange(len(values)), intensity.apply, intensity.dtype)
    return intensity
