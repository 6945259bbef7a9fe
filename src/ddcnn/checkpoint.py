"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values (model, optimizer and scheduler state, epoch, step, RNG
states, the resolved config, metadata). :func:`save_checkpoint` writes it to a temporary file in the same folder,
flushes it to disk and renames it over the target, so a run killed at any moment leaves either the previous or the
new checkpoint, never a torn one. :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, which refuses
pickled code.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CheckpointError, DDCNNError, DiskFullError


DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class _RecordingFile:
    """A binary file that remembers the first OSError of its writes: torch.save reports a failed write (a full
    disk) as a RuntimeError of its own ("unexpected pos"), without the cause."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once written completely (temp file, fsync, rename): a killed
    process leaves the previous file or the new one, never a torn one. A full disk (ENOSPC, EDQUOT) is a
    :class:`DiskFullError` naming the folder; the previous file is left as it was and the temporary one removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise
    f = _RecordingFile(os.fdopen(fd, "wb"))
    try:
        with f.file:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(f.error or e, path)
        raise


def _raise_if_disk_full(error: BaseException, path: Path) -> None:
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        raise DiskFullError(
            f"cannot write {path}: its disk is full ({error.strerror}); free space there or choose another --out "
            "(the previous complete file, if any, is kept)"
        ) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text.encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` to ``path`` (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", require: Iterable[str] = ()
) -> dict[str, Any]:
    """Read a checkpoint safely: a dict with a ``model`` entry and each key in ``require`` (e.g. ``("spec",
    "config")``), else a :class:`CheckpointError` that names the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file (.pt) inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or train a model first")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); use an earlier checkpoint or retrain")
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive; a truncated one still starts so
            raise CheckpointError(
                f"{path} is not a torch checkpoint (not the zip archive torch.save writes); pass a .pt file written "
                "by ddcnn"
            )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values and was refused "
            f"({_unpickling_reason(e)}); only load checkpoints written by ddcnn"
        ) from None
    except Exception as e:  # noqa: BLE001 - untrusted input: whatever torch fails on reading it is the file's fault
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_first_sentence(str(e)) or type(e).__name__}); it is corrupt or "
            "truncated, use an earlier checkpoint or retrain"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a ddcnn checkpoint (a dict with the model state); "
            "pass a .pt file written by ddcnn"
        )
    require_keys(state, path, ("model", *require))
    return state


def require_keys(state: dict[str, Any], path: str | Path, keys: Iterable[str]) -> None:
    """:class:`CheckpointError` naming the keys of ``keys`` that the checkpoint ``state`` (read from ``path``)
    lacks: a file written by something other than ddcnn, or by a ddcnn that stored less."""
    missing = [key for key in keys if key not in state]
    if missing:
        held = sorted(map(str, state))
        shown = ", ".join(map(repr, held[:5])) + (", ..." if len(held) > 5 else "") if held else "nothing"
        raise CheckpointError(
            f"{path} lacks {', '.join(map(repr, missing))}, so it is not a ddcnn checkpoint (it holds {shown}); "
            "pass a .pt file written by ddcnn"
        )


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """The part of torch's long weights-only message that says what was refused."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    return _first_sentence(found.group(1) if found else str(error))


def _first_sentence(text: str) -> str:
    """The first sentence of an error message, without torch's ``[enforce fail at file.cc:N]`` prefix."""
    text = re.sub(r"^\s*\[enforce fail at [^\]]*\][\s.]*", "", text)
    return re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0][:120]


def rng_state() -> dict[str, Any]:
    """The RNG states that influence training (torch CPU/CUDA, numpy, random) as checkpointable values."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def ensure_writable_folder(path: str | Path) -> Path:
    """Create ``path`` if needed and check that files can be written there, before any training starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".ddcnn-write-test-"):
            pass
    except OSError as e:
        raise DDCNNError(
            f"output folder {path} is not writable ({e.strerror or e}); choose another --out or free the disk"
        ) from None
    return path
