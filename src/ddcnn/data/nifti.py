"""``nifti:PATH``: 3D volumes in NIfTI files (.nii, .nii.gz), read with nibabel (``pip install ddcnn[medical]``).

Layout. ``PATH/labels.csv`` with a header ``file,label[,split]`` (read as ``csv`` datasets read theirs:
``file`` relative to PATH, ``label`` a class name, ``split`` train, val or test), or, without it, class folders
``PATH/<class>/<volume>.nii[.gz]`` (sub-folders included, sorted; other and hidden files are ignored), optionally
inside split folders ``PATH/<split>/<class>/`` (``train``, ``val`` or ``valid`` or ``validation``, ``test``). The
splits a dataset lacks are carved from its training volumes (see ``splits``).

Orientation. Each volume is turned to the closest canonical orientation, RAS+ (``nibabel.as_closest_canonical``: its
axes permuted and flipped as its affine says, never interpolated), and stored as (D, H, W) = (z, y, x): D runs from
inferior to superior, H from posterior to anterior, W from left to right (so ``--flip`` mirrors left and right).
Voxel spacing is not used.

Channels. A 3D file is one channel; a 4D file (x, y, z, c) has c channels, as has a NIfTI vector (x, y, z, 1, c).
Every volume needs the same number.

Shapes. With ``--volume-shape DxHxW`` (z, y, x) a volume of another shape is resampled to it, trilinearly
(``torch.nn.functional.interpolate``, ``align_corners=False``) in float32 on the voxel grid: each volume is stretched
to fill the target, a different aspect ratio or voxel spacing is not corrected; volumes of whole values are rounded
back to whole values. Without it every volume must have one shape, else a one-line error names two that differ.

Values. What the file stores, after its scl_slope and scl_inter (nibabel's ``dataobj``), e.g. int16 Hounsfield
units; then ``--intensity`` (:mod:`ddcnn.data.intensity`: ``auto`` keeps every level of int16 and uint16 volumes at
16 bits; ``window:-1000,400`` is a CT window).

Cache. Decoded once (a thread pool reads the files) into ``<cache>/nifti/<name>-<key>/``; the key hashes the
resolved path, every volume's relative path, label, split, size and mtime, ``volume_shape``, ``intensity`` and the
reading rules; the manifest records the last three, so an entry made for others is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..config.sections import parse_volume_shape
from ..errors import ConfigError, DatasetError
from .cache import allocate_npy, atomic_dir, cache_root, fingerprint, save_rows, verified_entry
from .csvfile import LabelRow, labelled_files, read_label_table
from .dataset import RawDataset
from .decode import ImageFile, parallel_map
from .imagefolder import SPLIT_FOLDERS
from .intensity import Intensity, resolve_intensity

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABELS_FILE = "labels.csv"
_READING_VERSION = 1  # part of the cache key and manifest: bump it when the reading rules above change


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _nibabel() -> Any:
    """The nibabel module; a one-line :class:`DatasetError` saying how to install it where it is missing."""
    try:
        import nibabel as nib
    except ImportError:
        raise DatasetError(
            "NIfTI volumes are read with nibabel, which is not installed: pip install ddcnn[medical]"
        ) from None
    return nib


def load_nifti(path: str | None, cfg: DataConfig) -> RawDataset:
    if path is None:
        raise ConfigError(
            "nifti needs a folder: nifti:PATH, holding labels.csv (file,label[,split]) or class folders of "
            ".nii/.nii.gz volumes"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"{root} is not a folder; pass nifti:PATH to a folder with labels.csv or class folders of .nii/.nii.gz "
            "volumes"
        )
    _nibabel()  # before anything is listed: the one error that matters without it
    root = root.resolve()
    files, class_names = labelled_files(_rows(root))
    listing = [(f.split, os.path.relpath(f.path, root), f.label, *f.stamp) for f in files]
    key = fingerprint(_READING_VERSION, str(root), cfg.volume_shape, cfg.intensity, listing)
    entry = cache_root(cfg.cache_dir) / "nifti" / f"{root.name}-{key}"
    made_with = {"reading": _READING_VERSION, "intensity": cfg.intensity, "volume_shape": cfg.volume_shape}
    if not verified_entry(entry, made_with):
        shape = parse_volume_shape(cfg.volume_shape)
        _read_to_cache(files, class_names, shape, entry, cfg.intensity, made_with, str(root))
    meta = json.loads((entry / "meta.json").read_text())
    splits = {
        split: (np.load(entry / f"{split}_images.npy", mmap_mode="r"), np.load(entry / f"{split}_labels.npy"))
        for split in meta["splits"]
    }
    intensity = Intensity.from_dict(meta["intensity"])
    return RawDataset(f"nifti:{root.name}", meta["class_names"], splits, key, str(entry), intensity)


def _rows(root: Path) -> list[LabelRow]:
    """The volumes of ``root`` with their labels (and splits): from labels.csv, else from class folders."""
    if (root / LABELS_FILE).is_file():
        rows = read_label_table(root / LABELS_FILE, root, what="volume")
        for row in rows:
            if not is_nifti(row.path):
                raise DatasetError(
                    f"{root / LABELS_FILE} line {row.line} lists {row.path.name}, which is not a .nii or .nii.gz "
                    "file; list NIfTI volumes only"
                )
        return rows
    folders = _folders(root)
    if not folders:
        raise DatasetError(
            f"{root} holds neither {LABELS_FILE} (file,label[,split]) nor class folders of .nii/.nii.gz volumes; add "
            "one of them"
        )
    splits = [f for f in folders if f.name.lower() in SPLIT_FOLDERS]
    if not splits:
        return _class_rows(folders, None)
    if len(splits) < len(folders) or "train" not in {SPLIT_FOLDERS[f.name.lower()] for f in splits}:
        raise DatasetError(
            f"{root} mixes split folders ({', '.join(f.name for f in splits)}) with class folders, or has no train/; "
            "use <split>/<class>/ with a train/ folder, or <class>/ alone"
        )
    return [row for split in splits for row in _class_rows(_folders(split), SPLIT_FOLDERS[split.name.lower()])]


def _folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_rows(folders: list[Path], split: str | None) -> list[LabelRow]:
    """A row per volume below each class folder (sub-folders included, sorted by path)."""
    rows = []
    for folder in folders:
        volumes = sorted(p for p in folder.rglob("*") if is_nifti(p) and p.is_file() and not p.name.startswith("."))
        if not volumes:
            raise DatasetError(
                f"class folder {folder} holds no .nii or .nii.gz volumes; add volumes or remove the folder"
            )
        rows += [LabelRow(0, volume, folder.name, split) for volume in volumes]
    return rows


def read_volume(path: str | Path, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.dtype]:
    """One NIfTI file as ``(C, D, H, W)`` values (see the module docstring: orientation, channels), resampled to
    ``shape`` (D, H, W) if given and different, and the dtype the file stores them in. One-line
    :class:`DatasetError` naming the file if it cannot be read."""
    nib = _nibabel()
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    errors = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asanyarray(image.dataobj)
    except errors as e:
        raise DatasetError(f"{path} is not a readable NIfTI volume ({e}); replace it or remove it") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4 or data.dtype.kind not in "biuf":
        raise DatasetError(
            f"{path} holds a {data.dtype} array of shape {data.shape}; ddcnn reads numeric 3D volumes (x, y, z) or "
            "4D ones with the channels last (x, y, z, c)"
        )
    volume = np.ascontiguousarray(data.transpose(3, 2, 1, 0))  # (c, z, y, x)
    if shape is not None and volume.shape[1:] != tuple(shape):
        volume = resample(volume, tuple(shape))
    return volume, data.dtype


def resample(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``volume`` ``(C, D, H, W)`` on the voxel grid ``shape`` (D, H, W): trilinear, in float32; whole values stay
    whole (rounded)."""
    whole = volume.dtype.kind in "biu" or bool((volume == np.rint(volume)).all())
    x = torch.from_numpy(volume.astype(np.float32))[None]
    out = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)[0].numpy()
    return np.rint(out) if whole else out


def _read_to_cache(
    files: list[ImageFile],
    class_names: list[str],
    shape: tuple[int, int, int] | None,
    entry: Path,
    rule: str,
    made_with: dict[str, Any],
    source: str,
) -> None:
    """Read every volume into float32 staging arrays, then write the levels of ``rule`` (``--intensity``);
    ``source``: the dataset's folder, for errors."""
    log.info("reading %d NIfTI volumes into %s (once; later runs read the cache)", len(files), entry)
    first, _ = read_volume(files[0].path, shape)
    channels, spatial = first.shape[0], first.shape[1:]
    counts = {split: sum(f.split == split for f in files) for split in dict.fromkeys(f.split for f in files)}
    meta = dict(made_with)
    with atomic_dir(entry, meta) as tmp:
        staging = {
            split: allocate_npy(tmp / f"{split}_staging.npy", np.float32, (n, channels, *spatial))
            for split, n in counts.items()
        }

        def read_into_staging(file: ImageFile) -> np.dtype:
            volume, dtype = read_volume(file.path, shape)
            if volume.shape[0] != channels:
                raise DatasetError(
                    f"{file.path} has {volume.shape[0]} channel(s) but {files[0].path} {channels}; store every "
                    "volume with the same channels"
                )
            if volume.shape[1:] != spatial:
                raise DatasetError(
                    f"{file.path} has {_shape(volume.shape[1:])} voxels (z x y x x, RAS) but {files[0].path} "
                    f"{_shape(spatial)}; pass --volume-shape DxHxW (e.g. 64x64x64) to resample them to one grid"
                )
            staging[file.split][file.row] = volume
            return dtype

        dtypes = parallel_map(read_into_staging, files, desc="reading volumes", unit="vol")
        intensity = resolve_intensity(rule, staging, ["train"], source, np.result_type(*dtypes))
        for split, n in counts.items():
            save_rows(tmp / f"{split}_images.npy", staging[split], np.arange(n), intensity.apply, intensity.dtype)
            (tmp / f"{split}_staging.npy").unlink()
            np.save(tmp / f"{split}_labels.npy", np.array([f.label for f in files if f.split == split]))
        info = {"class_names": class_names, "splits": list(counts), "counts": counts, "channels": channels}
        (tmp / "meta.json").write_text(json.dumps({**info, "intensity": intensity.to_dict()}, indent=1))
        meta.update(dtype=str(intensity.dtype), resolved=intensity.to_dict())


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
