"""The on-disk cache (decoded images, extracted archives, streamed splits): where it lives, how entries are keyed,
written and checked.

Writing. Every entry is a folder written under a temporary name (``.<entry>.XXXX.tmp`` beside it) and renamed into
place when complete, so an interrupted run never leaves an entry that looks complete, and concurrent runs (e.g.
several ranks) cannot corrupt one another. Just before the rename its manifest, ``.ddcnn-entry.json``, records every
file's size and sha256 (and inode, mtime and ctime). Arrays are written with ordinary file writes, or into files
whose blocks are allocated first (:func:`allocate_npy`), never through a memmap onto a sparse file, which on a full
disk kills the process with SIGBUS. A full disk or quota (ENOSPC, EDQUOT) ends the run with a one-line
:class:`DiskFullError` naming the folder, a cache folder that cannot be created or written (checked before anything
is decoded) with a one-line :class:`CacheNotWritableError`; either way the temporary folder is removed.

Checking. Each time an entry is opened (:func:`verified_entry`) its files are compared with the manifest
(:mod:`ddcnn.data.manifest` says what is compared and when checksums are recomputed), and the settings it was made
with (the manifest's ``meta``: the intensity transform, the dtype) with those asked for. A damaged or stale entry is
logged as one warning naming it and what is wrong, removed, and rebuilt from the source; it is never read. An entry without a
manifest (written before ddcnn checked its cache) counts as damaged, so it is rebuilt once.

Leftovers. A writing run holds an flock on ``.ddcnn-lock`` in its temporary folder. Whenever a cache folder is used,
the temporary folders in it whose lock no process holds (their run was killed) are removed, and so are those without
a lock (an older ddcnn, a file system without locks) untouched for ``STALE_AFTER_S`` (a day).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..checkpoint import DISK_FULL
from ..errors import CacheNotWritableError, DatasetError, DiskFullError
from .manifest import entry_problem, write_manifest

try:
    import fcntl
except ImportError:  # Windows: stale temporary folders are recognised by their age alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/ddcnn"
STALE_AFTER_S = 24 * 3600  # a temporary folder without a lock, untouched this long, was left by a killed run
_LOCK = ".ddcnn-lock"
_CHUNK_BYTES = 64 * 2**20  # bytes copied at a time when writing arrays larger than memory
_NO_FALLOCATE = {errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EINVAL, errno.ENOSYS}
_own_temporaries: set[Path] = set()  # this process's temporary folders, never swept as stale


def cache_root(cache_dir: str | None) -> Path:
    """The cache folder: ``cache_dir``, or ``~/.cache/ddcnn`` when it is None."""
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``, to key cache entries."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: Path) -> tuple[int, int]:
    """``(size, mtime in ns)``: enough to notice that a file was replaced or edited."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns


# -- writing ------------------------------------------------------------------------------------------------------


@contextmanager
def atomic_dir(final: Path, meta: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final``; when the block succeeds, record its manifest (with
    ``meta`` as it is when the block ends: what the content was made with, see :mod:`.manifest`) and rename it to
    ``final``.

    Before the block, :class:`CacheNotWritableError` if the folder cannot be created or written. An ENOSPC or
    EDQUOT error, also one another error was raised from (an archive reader's :class:`DatasetError`), becomes a
    :class:`DiskFullError`. On any exception the temporary folder is removed. If ``final`` appeared meanwhile (a
    concurrent run finished first), that entry is kept and this one discarded: both hold the same content.
    """
    tmp = _make_temporary(final)
    lock = None
    try:
        lock = _hold_lock(tmp)
        yield tmp
        (tmp / _LOCK).unlink(missing_ok=True)
        write_manifest(tmp, meta)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    except Exception as e:
        full = _disk_full_cause(e)
        if full is None or isinstance(e, DiskFullError):
            raise
        raise _disk_full_error(final.parent, full) from None
    finally:
        if lock is not None:
            os.close(lock)
        _own_temporaries.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _make_temporary(final: Path) -> Path:
    """A new temporary folder beside ``final``, after sweeping stale ones; one-line errors if that fails."""
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder))
    except OSError as e:
        if e.errno in DISK_FULL:
            raise _disk_full_error(folder, e) from None
        reason = "part of that path is a file" if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror or e
        raise CacheNotWritableError(
            f"the cache folder {folder} is not writable ({reason}); pass a writable --cache-dir"
        ) from None
    _own_temporaries.add(tmp)
    return tmp


def _hold_lock(tmp: Path) -> int | None:
    """An open file descriptor holding an flock on ``tmp/.ddcnn-lock`` (None where locks are not available): what
    tells other runs that ``tmp`` is in use. The file is locked under another name and renamed, so no one sees it
    unlocked."""
    if fcntl is None:
        return None
    part = tmp / f"{_LOCK}.part"
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(part, tmp / _LOCK)
    except OSError:  # e.g. ENOLCK on NFS without a lock daemon: the folder's age alone marks it stale
        os.close(fd)
        part.unlink(missing_ok=True)
        return None
    return fd


def _disk_full_error(folder: Path, error: OSError) -> DiskFullError:
    return DiskFullError(
        f"the cache folder {folder} is full ({error.strerror or os.strerror(error.errno)}); free space on that disk "
        "or pass --cache-dir a folder on a disk with room (the partial files were removed)"
    )


def _disk_full_cause(error: BaseException | None) -> OSError | None:
    """The ENOSPC or EDQUOT error behind ``error``: itself, or its cause or context (kept even by ``from None``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def allocate_npy(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of zeros for a ``shape`` ``dtype`` array, opened as a writable memmap once all its blocks
    are allocated. Writing through a memmap into unallocated (sparse) blocks kills the process with SIGBUS when the
    disk is full; allocating first raises an OSError (ENOSPC, EDQUOT) here instead."""
    dtype = np.dtype(dtype)
    with open(path, "wb") as f:
        _write_npy_header(f, dtype, shape)
        f.flush()
        _allocate(f, f.tell() + math.prod(shape) * dtype.itemsize)
    return np.lib.format.open_memmap(path, mode="r+")


def _allocate(f: IO[bytes], size: int) -> None:
    """Extend the open file ``f`` to ``size`` bytes of allocated blocks: ``posix_fallocate``, else (macOS, a file
    system without it) by writing zeros."""
    try:
        os.posix_fallocate(f.fileno(), 0, size)
        return
    except AttributeError:
        pass
    except OSError as e:
        if e.errno not in _NO_FALLOCATE:
            raise
    f.seek(0, os.SEEK_END)
    zeros = memoryview(bytes(min(_CHUNK_BYTES, size)))
    while (left := size - f.tell()) > 0:
        f.write(zeros[:left])
    f.flush()


def save_rows(
    path: Path,
    source: np.ndarray,
    rows: np.ndarray,
    convert: Callable[[np.ndarray], np.ndarray] | None = None,
    dtype: Any = None,
) -> None:
    """Write ``source[rows]`` to the .npy file ``path`` a chunk at a time, so ``source`` may be a memmap larger
    than memory; ``convert`` (e.g. an intensity transform) maps each chunk to the ``dtype`` written. Ordinary
    writes: a full disk raises an OSError, never SIGBUS."""
    dtype = np.dtype(source.dtype if dtype is None else dtype)
    row_bytes = max(1, math.prod(source.shape[1:]) * max(source.itemsize, dtype.itemsize, 4 if convert else 1))
    chunk = max(1, _CHUNK_BYTES // row_bytes)
    with open(path, "wb") as f:
        _write_npy_header(f, dtype, (len(rows), *source.shape[1:]))
        for start in range(0, len(rows), chunk):
            block = np.asarray(source[rows[start : start + chunk]])
            _write_block(f, np.ascontiguousarray(convert(block) if convert else block, dtype=dtype))


def _write_npy_header(f: IO[bytes], dtype: np.dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(map(int, shape))}
    np.lib.format.write_array_header_1_0(f, header)


def _write_block(f: IO[bytes], block: np.ndarray) -> None:
    f.write(memoryview(block).cast("B"))


# -- checking -----------------------------------------------------------------------------------------------------


def verified_entry(entry: Path, expect: Mapping[str, Any] | None = None) -> bool:
    """Whether ``entry`` is a complete cache entry that matches its manifest (see the module docstring), made with
    the settings ``expect`` gives (those recorded as its ``meta``; another value makes it stale, to be rebuilt).

    A damaged entry is logged (one warning naming it and what is wrong) and removed, and False returned so the
    caller rebuilds it; a missing one returns False. Also sweeps stale temporary folders beside ``entry``.
    """
    remove_stale_temporaries(entry.parent)
    try:
        inode = os.lstat(entry).st_ino
    except OSError:
        return False
    problem = entry_problem(entry, expect) if entry.is_dir() else "it is not a folder"
    if problem is None:
        return True
    log.warning("cache entry %s cannot be used: %s; removing it and rebuilding it from the source", entry, problem)
    _discard(entry, inode)
    return False


def _discard(entry: Path, inode: int) -> None:
    """Remove the damaged ``entry``, unless a concurrent run replaced it meanwhile: renamed aside first (so no
    reader finds it half deleted), then deleted. :class:`CacheNotWritableError` if it cannot be renamed."""
    aside = entry.with_name(f".{entry.name}.{os.getpid()}-{time.monotonic_ns()}.damaged.tmp")
    try:
        if os.lstat(entry).st_ino != inode:
            return
        os.rename(entry, aside)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CacheNotWritableError(
            f"the damaged cache entry {entry} cannot be removed ({e.strerror}); delete it, or pass a writable "
            "--cache-dir"
        ) from None
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary folders (``.*.tmp``) in ``folder`` that killed runs left behind: those whose lock no
    process holds, and those without a lock untouched for ``STALE_AFTER_S``. Returns the folders removed."""
    try:
        candidates = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    except OSError:
        return []
    removed = []
    for tmp in candidates:
        if tmp not in _own_temporaries and tmp.is_dir() and _abandoned(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                removed.append(tmp)
    if removed:
        log.info("removed %d temporary folder(s) left in %s by killed runs", len(removed), folder)
    return removed


def _abandoned(tmp: Path) -> bool:
    """Whether no run is writing the temporary folder ``tmp``."""
    try:
        fd = os.open(tmp / _LOCK, os.O_RDWR) if fcntl is not None else None
    except FileNotFoundError:
        fd = None
    except OSError:
        return False
    if fd is None:
        return time.time() - _last_change(tmp) > STALE_AFTER_S
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held: its run is alive
        return False
    finally:
        os.close(fd)


def _last_change(folder: Path) -> float:
    """The newest mtime of ``folder`` and what is directly in it."""
    try:
        with os.scandir(folder) as entries:
            return max([folder.stat().st_mtime, *(e.stat(follow_symlinks=False).st_mtime for e in entries)])
    except OSError:
        return time.time()


# -- reading ------------------------------------------------------------------------------------------------------


def reopen_array(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The .npy cache file ``path`` memmapped read-only again (a loader worker does this), checked to still hold a
    ``shape`` ``dtype`` array: :class:`DatasetError` if it vanished or changed meanwhile."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DatasetError(f"the cache file {path} vanished or was damaged while in use ({e}); run again") from None
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise DatasetError(
            f"the cache file {path} now holds a {array.dtype} array of shape {array.shape}, not the {dtype} "
            f"{tuple(shape)} opened at the start; another run rebuilt it, run again"
        )
    return array
