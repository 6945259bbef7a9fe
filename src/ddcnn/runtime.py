"""What every part of a run sets up the same way: the device, the seeds, the floating-point type and autocast; and
what a run records of where it ran (:func:`provenance`).

A leaf module: it imports only the configuration, so that models, the training loop and the distributed code can
all use it without importing one another.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TrainConfig
from .errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_amp(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.amp is None else bool(cfg.amp and device.type == "cuda")


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``cfg.amp_dtype`` where ``cfg.amp`` applies (CUDA), else nothing."""
    if use_amp(cfg, device):
        return torch.autocast(device_type=device.type, dtype=getattr(torch, cfg.amp_dtype))
    return contextlib.nullcontext()


def grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler float16 autocast needs (its small gradients underflow otherwise); None for bfloat16, which
    has float32's range, and without autocast."""
    if use_amp(cfg, device) and cfg.amp_dtype == "float16":
        return torch.amp.GradScaler(device.type)
    return None


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The floating-point type of parameters and activations (``cfg.dtype``; autocast may lower it, see --amp)."""
    return getattr(torch, cfg.dtype)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is of a lower precision (bf16 autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def provenance(device: str | torch.device | None = None) -> dict[str, Any]:
    """What a results file records of where it was made: the ddcnn, torch and Python versions, the device (``auto``
    resolved, with the GPU's name on CUDA) and the git commit of ddcnn's source where it runs from a checkout
    (None otherwise). Never raises: what cannot be found out is None."""
    from . import __version__

    info: dict[str, Any] = {
        "ddcnn": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": None,
        "git_commit": _git_commit(),
    }
    try:
        resolved = resolve_device(str(device)) if device is not None and str(device) == "auto" else device
        if resolved is not None:
            resolved = torch.device(resolved)
            info["device"] = str(resolved)
            if resolved.type == "cuda" and torch.cuda.is_available():
                info["device_name"] = torch.cuda.get_device_name(resolved)
    except Exception:  # noqa: BLE001 - provenance never fails a run
        pass
    return info


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout ddcnn's source is in; None where it is installed, not a checkout, or
    git is missing or slow."""
    package = Path(__file__).resolve().parent
    if "site-packages" in package.parts or "dist-packages" in package.parts:
        return None  # an installed copy: a git repository around it (a venv in a project) is not ddcnn's
    try:
        done = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None
