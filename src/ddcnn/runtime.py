"""What every part of a run sets up the same way: the device, the seeds, the floating-point type and autocast.

A leaf module: it imports only the configuration, so that models, the training loop and the distributed code can
all use it without importing one another.
"""

from __future__ import annotations

import contextlib
import random

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
    if use_amp(cfg, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The floating-point type of parameters and activations (``cfg.dtype``; autocast may lower it, see --amp)."""
    return getattr(torch, cfg.dtype)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is of a lower precision (bf16 autocast); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
