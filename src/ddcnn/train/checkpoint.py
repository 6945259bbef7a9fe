"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values (model, optimizer and scheduler state, epoch, step, RNG
states, the resolved config, metadata). :func:`save_checkpoint` writes it to a temporary file in the same folder,
flushes it to disk and renames it over the target, so a run killed at any moment leaves either the previous or the
new checkpoint, never a torn one. :func:`load_checkpoint` uses ``torch.load(weights_only=True)``, which refuses
pickled code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import CheckpointError, CheckpointMismatchError, DDCNNError


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once written completely (temp file, fsync, rename): a killed
    process leaves the previous file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text.encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` to ``path`` (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; errors name the file and what to do."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass a checkpoint file (.pt) inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or train a model first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values and was refused "
            f"({str(e).splitlines()[0][:120]}); only load checkpoints written by ddcnn"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); "
            "use an earlier checkpoint or retrain"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a ddcnn checkpoint (no model state); pass a file written by ddcnn")
    return state


def check_metadata(state: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointMismatchError when the checkpoint's backbone, grid, classes... differ from ``expected``."""
    meta = state.get("meta", {})
    for key, want in expected.items():
        have = meta.get(key)
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if have != want:
            raise CheckpointMismatchError(
                f"checkpoint {path} has {key} {have!r} but this run needs {want!r}; "
                f"use a checkpoint trained with the same {key} or change the configuration"
            )


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
