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

Modes and intensities (:mod:`ddcnn.data.decode`). If every image is grayscale the dataset has 1 channel, else every
image becomes RGB (3 channels); alpha is composited on black. 16-bit gray images (I;16) keep their 16 bits (stored as
uint16) in a gray dataset; ``--intensity`` maps raw values to the stored levels (:mod:`ddcnn.data.intensity`).

Size. Images are resized to ``cfg.image_size`` x ``cfg.image_size`` (bilinear, antialiased when shrinking; the
aspect ratio is not kept), or, when it is None, to the size of the first training image in sorted order.

Cache. The images are decoded once (on a thread pool) and written to
``<cache>/imagefolder/<name>-<key>/`` as ``<split>_images.npy``, ``<split>_labels.npy`` and ``meta.json``; the key
hashes the resolved path, every image's relative path, size and mtime, the image size, ``--intensity`` and the
decoding rules, so editing the tree or changing ``image_size`` or the intensity decodes again. The channel decision
is a function of those files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import DataConfig
from ..errors import ConfigError, DatasetError
from .archive import archive_stem, extract_cached, is_archive
from .cache import cache_root
from .dataset import RawDataset
from .decode import ImageFile, decode_image, read_decoded
from .splits import SPLITS

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
__all__ = ["IMAGE_EXTENSIONS", "SPLIT_FOLDERS", "decode_image", "load_imagefolder", "load_tree"]


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
    folder = cache_root(cfg.cache_dir) / "imagefolder"
    return read_decoded(files, class_names, cfg, folder, name, str(root), listing)


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


def _scan_tree(root: Path, tree: _Tree) -> tuple[list[ImageFile], list[str]]:
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
        files += [ImageFile(path, split, row, label, stamp) for row, (path, label, stamp) in enumerate(paths)]
    return files, class_names
