"""``imagefolder:PATH``: a tree of image files, decoded once into the cache.

Layout. ``PATH/<split>/<class>/<image>`` with split folders ``train``, ``val`` (or ``valid``, ``validation``) and
``test``, or ``PATH/<class>/<image>`` with no split folders; a folder holding just one folder is descended into (as
``flower_photos.tgz`` unpacks). Images may sit in sub-folders of their class folder. Missing val and test splits are
carved from train (see ``splits``). Class names are the sorted class folder names, labels index into them. Only
files ending in .jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm count; other files and hidden entries
(``.DS_Store``, ``._x.jpg``) are ignored. ``PATH`` may also be a .tar(.gz), .tgz or .zip of such a tree.

Links. Symbolic links to folders and files are followed, except a link to a folder that contains it (``self -> .``,
``up -> ..``, or a chain of links back up), which would make the tree infinitely deep: it is skipped with a warning
naming it. An image file name whose link cannot be followed (it loops, or its target is missing) is an error naming
it.

Modes. If every image is grayscale (modes 1, L, LA, I;16) the dataset has 1 channel, else every image becomes RGB
(3 channels). Alpha (LA, RGBA, PA, P with transparency) is composited on black, so fully transparent pixels are black
whatever colour they store; palettes are expanded; 16-bit gray keeps its 8 high bits; CMYK and YCbCr are converted
by PIL. Other modes (I, F, ...) raise :class:`UnsupportedImageModeError`.

Size. Images are resized to ``cfg.image_size`` x ``cfg.image_size`` (bilinear, antialiased when shrinking; the
aspect ratio is not kept), or, when it is None, to the size of the first training image in sorted order.

Cache. The images are decoded once (on a thread pool) and written to
``<cache>/imagefolder/<name>-<key>/`` as ``<split>_images.npy``, ``<split>_labels.npy`` and ``meta.json``; the key
hashes the resolved path, every image's relative path, size and mtime, the image size and the decoding rules, so
editing the tree or changing ``image_size`` decodes again. The channel decision is a function of those files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..config import DataConfig
from ..errors import ConfigError, CorruptImageError, DatasetError, UnsupportedImageModeError
from .archive import archive_stem, extract_cached, is_archive
from .cache import allocate_npy, atomic_dir, cache_root, fingerprint, save_rows, verified_entry
from .dataset import RawDataset
from .splits import SPLITS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_GRAY_MODES = frozenset({"1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N"})
_COLOR_MODES = frozenset({"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "RGBA", "PA"})
_DECODING_VERSION = 1  # part of the cache key: bump it when the decoding rules above change


@dataclass(frozen=True)
class _ImageFile:
    path: str
    split: str
    row: int  # position within its split
    label: int
    stamp: tuple[int, int]  # (size, mtime in ns), for the cache key


def load_imagefolder(path: str | None, cfg: DataConfig) -> RawDataset:
    if path is None:
        raise ConfigError(
            "imagefolder needs a path: imagefolder:PATH, a folder of <split>/<class>/<image> or "
            "<class>/<image>, or an archive of one"
        )
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root} does not exist; pass imagefolder:PATH to an image folder or an archive of one")
    name = f"imagefolder:{archive_stem(root) if is_archive(root) else root.resolve().name}"
    if is_archive(root):
        root = extract_cached(root, cfg.cache_dir)
    elif not root.is_dir():
        raise DatasetError(f"{root} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive of images")
    return load_tree(root, cfg, name)


def load_tree(root: Path, cfg: DataConfig, name: str) -> RawDataset:
    """Read the image tree at ``root`` (decoding it into the cache the first time)."""
    if cfg.image_size is not None and cfg.image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels (or unset), got {cfg.image_size}")
    tree = _Tree(root.resolve())
    root = _descend_single_folder(tree)
    files, class_names = _scan_tree(root, tree)
    prefix = len(str(root)) + 1
    listing = [(f.split, f.path[prefix:], f.label, *f.stamp) for f in files]
    key = fingerprint(_DECODING_VERSION, str(root), cfg.image_size, listing)
    entry = cache_root(cfg.cache_dir) / "imagefolder" / f"{name.partition(':')[2] or name}-{key}"
    if not verified_entry(entry):
        _decode_to_cache(files, class_names, cfg.image_size, entry)
    meta = json.loads((entry / "meta.json").read_text())
    splits = {
        split: (np.load(entry / f"{split}_images.npy", mmap_mode="r"), np.load(entry / f"{split}_labels.npy"))
        for split in meta["splits"]
    }
    return RawDataset(name, meta["class_names"], splits, fingerprint=key, location=str(entry))


def _visible(folder: Path | str) -> list[os.DirEntry]:
    """The entries of ``folder`` that are not hidden (``.DS_Store``, ``._x.jpg``), sorted by name."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"folder {folder} cannot be read ({e.strerror}); check its permissions") from None


def _has_image_suffix(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class _Tree:
    """The folders of one image tree below ``root``, each listed once, walked without looping (see the module
    docstring, "Links")."""

    def __init__(self, root: Path):
        self.root = root
        self._listings: dict[str, list[tuple[os.DirEntry, bool]]] = {}

    def entries(self, folder: Path | str) -> list[tuple[os.DirEntry, bool]]:
        """``(entry, is_folder)`` for the visible sub-folders and image files of ``folder``, sorted by name."""
        key = str(folder)
        if key not in self._listings:
            above = self._folders_above(key)
            kinds = ((entry, self._kind(entry, above)) for entry in _visible(folder))
            self._listings[key] = [(entry, kind == "folder") for entry, kind in kinds if kind is not None]
        return self._listings[key]

    def folders(self, folder: Path | str) -> list[Path]:
        return [Path(entry.path) for entry, is_folder in self.entries(folder) if is_folder]

    def image_files(self, folder: Path | str) -> list[tuple[str, tuple[int, int]]]:
        """``(path, (size, mtime))`` of the image files below ``folder``, recursively, in sorted order."""
        found = []
        for entry, is_folder in self.entries(folder):
            if is_folder:
                found += self.image_files(entry.path)
            else:
                stat = entry.stat()
                found.append((entry.path, (stat.st_size, stat.st_mtime_ns)))
        return found

    def _folders_above(self, folder: str) -> set[str]:
        """The real paths of ``folder`` and of the folders between it and the root: where a link must not lead."""
        parts = Path(folder).relative_to(self.root).parts
        return {os.path.realpath(self.root.joinpath(*parts[:depth])) for depth in range(len(parts) + 1)}

    @staticmethod
    def _kind(entry: os.DirEntry, above: set[str]) -> str | None:
        """``"folder"``, ``"image"``, or None for an entry to skip."""
        if entry.is_symlink():
            try:
                os.stat(entry.path)
            except OSError as e:
                if _has_image_suffix(entry.name):
                    raise DatasetError(
                        f"{entry.path} is a symbolic link to {os.readlink(entry.path)} that cannot be followed "
                        f"({e.strerror}); fix or remove the link"
                    ) from None
                log.warning("skipping %s: a symbolic link that cannot be followed (%s)", entry.path, e.strerror)
                return None
        if entry.is_dir():
            if os.path.realpath(entry.path) in above:
                log.warning(
                    "skipping %s: a link to %s, a folder that contains it, so the tree would loop",
                    entry.path,
                    os.path.realpath(entry.path),
                )
                return None
            return "folder"
        return "image" if _has_image_suffix(entry.name) and entry.is_file() else None


def _descend_single_folder(tree: _Tree) -> Path:
    root = tree.root
    while True:
        entries = tree.entries(root)
        folders = [entry for entry, is_folder in entries if is_folder]
        if len(folders) != 1 or len(entries) > 1 or folders[0].name.lower() in SPLIT_FOLDERS:
            return root
        root = Path(folders[0].path)


def _split_folders(root: Path, tree: _Tree) -> dict[str, Path]:
    """``{split: folder}``; a root without split folders is one ``train`` split."""
    folders = tree.folders(root)
    splits = [f for f in folders if f.name.lower() in SPLIT_FOLDERS]
    if not splits:
        return {"train": root}
    others = [f.name for f in folders if f.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(f.name for f in splits)}) with other folders "
            f"({', '.join(others)}); move those out of it"
        )
    by_split: dict[str, Path] = {}
    for folder in splits:
        split = SPLIT_FOLDERS[folder.name.lower()]
        if split in by_split:
            raise DatasetError(
                f"{root} has two {split} split folders, {by_split[split].name} and {folder.name}; keep one"
            )
        by_split[split] = folder
    if "train" not in by_split:
        raise DatasetError(
            f"{root} has split folders ({', '.join(f.name for f in splits)}) but no train/; "
            "rename the training split's folder to train"
        )
    return {split: by_split[split] for split in SPLITS if split in by_split}


def _scan_tree(root: Path, tree: _Tree) -> tuple[list[_ImageFile], list[str]]:
    """Every image file, split by split (train first) and class by class; and the class names."""
    classes_per_split = {}
    for split, folder in _split_folders(root, tree).items():
        class_folders = tree.folders(folder)
        if not class_folders:
            raise DatasetError(f"{folder} holds no class folders; expected {folder}/<class>/<image>")
        classes_per_split[split] = {c.name: tree.image_files(c) for c in class_folders}
        for class_folder, images in zip(class_folders, classes_per_split[split].values()):
            if not images:
                raise DatasetError(
                    f"class folder {class_folder} holds no images "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
                )
    class_names = list(classes_per_split["train"])
    for split, classes in classes_per_split.items():
        missing, extra = sorted(set(class_names) - set(classes)), sorted(set(classes) - set(class_names))
        if missing or extra:
            raise DatasetError(
                f"class folders differ between splits of {root}: {split} lacks {missing} and has "
                f"{extra} beyond train's; every split needs the same class folders"
            )
    files = []
    for split, classes in classes_per_split.items():
        paths = [(path, label, stamp) for label, name in enumerate(class_names) for path, stamp in classes[name]]
        files += [_ImageFile(path, split, row, label, stamp) for row, (path, label, stamp) in enumerate(paths)]
    return files, class_names


def _decode_to_cache(files: list[_ImageFile], class_names: list[str], image_size: int | None, entry: Path) -> None:
    """Decode every image into ``entry``: one pass into 3-channel staging arrays (a gray image replicated, which is
    what converting it to RGB does), kept as they are, or cut to 1 channel if every image turned out gray."""
    log.info("decoding %d images into %s (once; later runs read the cache)", len(files), entry)
    width, height = (image_size, image_size) if image_size else _image_size(files[0].path)
    counts = {split: sum(f.split == split for f in files) for split in dict.fromkeys(f.split for f in files)}
    with atomic_dir(entry) as tmp:
        staging = {
            split: allocate_npy(tmp / f"{split}_staging.npy", np.uint8, (n, 3, height, width))
            for split, n in counts.items()
        }

        def decode_into_staging(file: _ImageFile) -> bool:
            image = decode_image(file.path, (width, height))
            staging[file.split][file.row] = image  # a gray (1, H, W) image fills all three channels
            return len(image) == 1

        all_gray = all(_parallel_map(decode_into_staging, files, desc="decoding images"))
        for split, n in counts.items():
            staging[split].flush()
            final = tmp / f"{split}_images.npy"
            if all_gray:
                save_rows(final, staging[split][:, :1], np.arange(n))
                (tmp / f"{split}_staging.npy").unlink()
            else:
                (tmp / f"{split}_staging.npy").rename(final)
            np.save(tmp / f"{split}_labels.npy", np.array([f.label for f in files if f.split == split]))
        meta = {"class_names": class_names, "splits": list(counts), "counts": counts, "channels": 1 if all_gray else 3}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _parallel_map(fn: Callable[[_ImageFile], bool], items: list[_ImageFile], desc: str) -> list[bool]:
    """``[fn(x) for x in items]`` on a thread pool, with a progress bar; the first exception cancels the rest.

    Threads overlap the parts of decoding and resizing that PIL runs without the GIL (most of the work for large
    images); unlike worker processes they need no imports, no pickling and no ``__main__`` guard.
    """
    pool = ThreadPoolExecutor()
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="img", disable=None))
    finally:
        pool.shutdown(cancel_futures=True)


def _image_size(path: str) -> tuple[int, int]:
    """(width, height), from the header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path} cannot be decoded ({e}); delete or replace it") from None


def decode_image(path: str | Path, size: tuple[int, int], channels: int | None = None) -> np.ndarray:
    """One image file as uint8 ``(C, H, W)``, converted as in an ``imagefolder`` dataset and resized to ``size``
    (width, height). ``channels``: 1 (gray) or 3 (RGB), or None for the image's own kind (1 if its mode is
    grayscale, else 3). Raises :class:`CorruptImageError` or :class:`UnsupportedImageModeError` naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode not in _GRAY_MODES | _COLOR_MODES:
                raise UnsupportedImageModeError(
                    f"{path} has image mode {img.mode}, which ddcnn does not convert; save it as 8-bit grayscale (L) "
                    "or RGB"
                )
            if channels is None:
                channels = 1 if img.mode in _GRAY_MODES else 3
            img = _to_8bit_opaque(img).convert("L" if channels == 1 else "RGB")
            if img.size != size:
                img = img.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path} cannot be decoded ({e}); delete or replace it") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _to_8bit_opaque(img: Image.Image) -> Image.Image:
    """``img`` without alpha (composited on black) and with at most 8 bits per channel."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        with_alpha = np.asarray(img.convert("LA" if img.mode == "LA" else "RGBA")).astype(np.uint16)
        color, alpha = with_alpha[..., :-1], with_alpha[..., -1:]
        composited = ((color * alpha + 127) // 255).astype(np.uint8)
        return Image.fromarray(composited[..., 0] if img.mode == "LA" else composited)
    return img
