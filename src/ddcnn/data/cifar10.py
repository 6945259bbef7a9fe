"""``cifar10[:PATH]``: CIFAR-10 (Krizhevsky 2009), 32x32 RGB, 10 classes, 50,000 train and 10,000 test images.

``PATH`` may be the canonical ``cifar-10-batches-py`` folder (or a folder holding it or the archive), the canonical
``cifar-10-python.tar.gz`` (read in place), an ImageFolder tree ``train|test/<class>/<image>`` of it, or a .tar.gz
of such a tree (extracted once into the cache). Without ``PATH``, ``<cache>/cifar10``, where
:func:`download_cifar10` puts the archive, is read. Val is carved from train.

The batches are Python pickles, i.e. untrusted code: they are read with an unpickler that only rebuilds numpy
arrays and refuses every other global (``os.system``, ``eval``, ...).
"""

from __future__ import annotations

import codecs
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..config import DataConfig
from ..errors import DatasetError
from .archive import download, extract_cached, is_archive, open_tar, sha256_file
from .cache import cache_root, file_stamp, fingerprint
from .dataset import RawDataset
from .imagefolder import load_tree

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
_BATCHES_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"


def download_cifar10(dest: str | Path | None = None, *, url: str = CIFAR10_URL, sha256: str = CIFAR10_SHA256) -> Path:
    """Download the canonical archive into the folder ``dest`` (None: ``~/.cache/ddcnn/cifar10``, which plain
    ``cifar10`` reads) unless a verified copy is already there; return the archive's path."""
    archive = (Path(dest).expanduser() if dest is not None else cache_root(None) / "cifar10") / ARCHIVE_NAME
    if archive.is_file() and sha256_file(archive) == sha256.lower():
        return archive
    return download(url, archive, sha256)


def load_cifar10(path: str | None, cfg: DataConfig) -> RawDataset:
    root = Path(path).expanduser() if path is not None else cache_root(cfg.cache_dir) / "cifar10"
    if not root.exists():
        raise DatasetError(
            f"CIFAR-10 is not at {root}; pass cifar10:PATH to the cifar-10-batches-py folder, "
            f"{ARCHIVE_NAME} or an image tree of it, or download it with download_cifar10()"
        )
    if root.is_dir():
        batches = next((d for d in (root, root / _BATCHES_FOLDER) if (d / _TRAIN_BATCHES[0]).is_file()), None)
        if batches is not None:
            names = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
            missing = [name for name in names if not (batches / name).is_file()]
            if missing:
                raise DatasetError(f"{batches} lacks {', '.join(missing)}; the CIFAR-10 batches are incomplete")
            key = fingerprint(str(batches.resolve()), [file_stamp(batches / name) for name in names])
            return _from_batches(lambda name: (batches / name).open("rb"), key, str(batches))
        if (root / ARCHIVE_NAME).is_file():
            root = root / ARCHIVE_NAME
        else:
            return load_tree(root, cfg, "cifar10")
    if not is_archive(root):
        raise DatasetError(
            f"{root} is neither a folder nor an archive; pass the cifar-10-batches-py folder, "
            f"{ARCHIVE_NAME} or an image tree of CIFAR-10"
        )
    if not root.name.lower().endswith(".zip"):
        with open_tar(root) as tar:
            if _holds_batches(tar):
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                key = fingerprint(str(root.resolve()), file_stamp(root))
                return _from_batches(lambda name: _tar_member(tar, members, name, root), key, str(root))
    return load_tree(extract_cached(root, cfg.cache_dir), cfg, "cifar10")


def _holds_batches(tar: tarfile.TarFile) -> bool:
    """Whether the archive is the canonical one, judged by its first members so an image tree's thousands of
    members need not be listed."""
    names = {_META, _TEST_BATCH, *_TRAIN_BATCHES}
    return any(Path(member.name).name in names for _, member in zip(range(16), tar))


def _tar_member(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], name: str, archive: Path) -> IO[bytes]:
    if name not in members:
        raise DatasetError(f"{archive} lacks the CIFAR-10 batch {name}; it is incomplete, replace it")
    return tar.extractfile(members[name])


def _from_batches(open_batch: Callable[[str], IO[bytes]], key: str, location: str) -> RawDataset:
    """CIFAR-10 from its pickled batches; ``open_batch(name)`` opens one of them."""
    train = [_read_batch(open_batch, name, location) for name in _TRAIN_BATCHES]
    test = _read_batch(open_batch, _TEST_BATCH, location)
    meta = _unpickle(open_batch, _META, location)
    if "label_names" not in meta:
        raise DatasetError(f"{location}/{_META} lacks label_names; it is not a CIFAR-10 meta file, replace it")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"]]
    splits = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": test,
    }
    return RawDataset("cifar10", class_names, splits, fingerprint=key, location=location)


def _read_batch(open_batch: Callable[[str], IO[bytes]], name: str, location: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch as uint8 ``(n, 3, 32, 32)`` images (the rows are stored channel by channel) and int64 labels."""
    batch = _unpickle(open_batch, name, location)
    try:
        data = np.asarray(batch["data"])
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise DatasetError(
            f"{location}/{name} lacks valid data and labels entries; it is not a CIFAR-10 batch, replace it"
        ) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DatasetError(
            f"{location}/{name} holds data of shape {data.shape} ({data.dtype}) and "
            f"{labels.shape} labels, not uint8 (n, 3072) and (n,); replace it"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _unpickle(open_batch: Callable[[str], IO[bytes]], name: str, location: str) -> dict[str, Any]:
    """A batch file as a dict with str keys (the canonical files were written by Python 2: bytes keys)."""
    source = f"{location}/{name}"
    try:
        with open_batch(name) as f:
            obj = _RestrictedUnpickler(f, source).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
        raise DatasetError(f"{source} cannot be unpickled ({e}); it is damaged, replace it") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{source} holds a {type(obj).__name__}, not a CIFAR-10 batch dict; replace it")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """What pickled numpy arrays need, under numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names."""
    core = np._core if hasattr(np, "_core") else np.core
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


# Python 3's protocol-2 pickles encode bytes objects as _codecs.encode(str, "latin1")
_ALLOWED_GLOBALS = {**_numpy_globals(), ("_codecs", "encode"): codecs.encode}


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads only numpy arrays, dtypes and plain containers; any other global raises :class:`DatasetError`."""

    def __init__(self, file: IO[bytes], source: str):
        super().__init__(file, encoding="latin1")  # how numpy arrays pickled by Python 2 must be read
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self._source} asks to load {module}.{name}, which a CIFAR-10 batch never does; "
                "refusing this untrusted pickle, replace the file"
            ) from None
