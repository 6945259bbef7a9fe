"""The on-disk cache (decoded images, extracted archives, streamed splits): where it lives, how entries are keyed,
and how they are written.

Every entry is a folder written under a temporary name and renamed into place when complete, so an interrupted run
never leaves an entry that looks complete, and concurrent runs (e.g. several ranks) cannot corrupt one another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CACHE_DIR = "~/.cache/ddcnn"
_ROWS_PER_CHUNK_BYTES = 64 * 2**20  # bytes copied at a time when writing arrays larger than memory


def cache_root(cache_dir: str | None) -> Path:
    """The cache folder: ``cache_dir``, or ``~/.cache/ddcnn`` when it is None."""
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts``, to key cache entries."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: Path) -> tuple[int, int]:
    """``(size, mtime in ns)``: enough to notice that a file was replaced or edited."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``final`` and rename it to ``final`` when the block succeeds.

    On an exception the temporary folder is removed. If ``final`` appeared meanwhile (a concurrent run finished
    first), that entry is kept and this one discarded: both hold the same content.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_rows(path: Path, source: np.ndarray, rows: np.ndarray) -> None:
    """Write ``source[rows]`` to the .npy file ``path`` a chunk at a time, so ``source`` may be a memmap larger
    than memory."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=source.dtype, shape=(len(rows), *source.shape[1:]))
    row_bytes = max(1, int(np.prod(source.shape[1:])) * source.itemsize)
    chunk = max(1, _ROWS_PER_CHUNK_BYTES // row_bytes)
    for start in range(0, len(rows), chunk):
        out[start : start + chunk] = source[rows[start : start + chunk]]
    out.flush()
