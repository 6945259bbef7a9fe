"""The options' vocabulary: :func:`option`, which declares a field with its help and group (:data:`GROUPS`); the
checks of values (:func:`check`, :func:`check_choices`); the choices the options accept; grids written as text."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
PARALLEL_MODES = ("model", "data")
DDP_HOOKS = ("none", "fp16", "powersgd")  # --ddp-hook: ddcnn.distributed.ddp
DTYPES = ("float32", "float64")
AMP_DTYPES = ("bfloat16", "float16")
AGGREGATOR_INPUTS = ("train", "crossfit", "val", "augmented")
# --local-output: what a trained aggregator reads of the local CNNs (ddcnn.models.aggregators)
LOCAL_OUTPUTS = ("probabilities", "logits", "features")
INPUT_SEPARATOR = ":"  # `dnn:logits` in ddcnn compare --methods: a trained aggregator with the input it reads
NORMALIZATIONS = ("data", "imagenet")  # --normalize: the training split's statistics, or ImageNet's
CLASS_WEIGHTS = ("none", "balanced")  # --class-weights: ddcnn.train.evaluation.balanced_class_weights
SAMPLERS = ("uniform", "balanced")  # --sampler: ddcnn.data.sampling
METHOD_NAMES = ("global", "local", "aggregation", "coherent", "transfer")  # ddcnn.methods.METHODS
RENAMED_KEYS = {"dnn_epochs": "aggregator_epochs"}  # ddcnn 0.1's names, read (with a warning) as today's
RENAMED_METHODS = {"cnn_dnn": "aggregation"}


def parse_grid(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"2x2"`` -> ``(2, 2)``, ``"2x2x2"`` -> ``(2, 2, 2)``; ``"1x1"`` is the global CNN."""
    if isinstance(text, (tuple, list)):
        parts = [int(p) for p in text]
    else:
        try:
            parts = [int(p) for p in str(text).lower().replace("*", "x").split("x")]
        except ValueError:
            raise ConfigError(f"grid {text!r} is not of the form 2x2 or 2x2x2 (subdomains per axis)") from None
    if len(parts) not in (2, 3) or any(p < 1 for p in parts):
        raise ConfigError(f"grid {text!r} must have 2 (image) or 3 (volume) positive entries, e.g. 2x2 or 2x2x2")
    return tuple(parts)


def split_input(method: str) -> tuple[str, str | None]:
    """``"dnn:logits"`` -> ``("dnn", "logits")``; ``"dnn"`` -> ``("dnn", None)`` (it reads ``--local-output``). The
    names are not checked here (:func:`ddcnn.models.aggregators.check_aggregator_input` does)."""
    base, separator, reads = method.partition(INPUT_SEPARATOR)
    return base, (reads if separator else None)


def method_file_stem(method: str) -> str:
    """The stem of a method's files in its run folder (``<stem>.pt``, ``<stem>_log.csv``): the method's name, with
    ``-`` for the ``:`` of an aggregator's input (``dnn:logits`` -> ``dnn-logits``), a character Windows refuses in
    file names and macOS shows as ``/``."""
    return method.replace(INPUT_SEPARATOR, "-")


def check(condition: bool, key: str, value: Any, requirement: str) -> None:
    """Raise a ConfigError naming ``key``, its ``value`` and the ``requirement`` it breaks, unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key} must be {requirement}, got {value!r}; fix the flag or the YAML key {key}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, value, f"one of {', '.join(choices)}")


def format_grid(grid: tuple[int, ...]) -> str:
    return "x".join(str(g) for g in grid)


def grid_order(grid: str) -> tuple[int, str]:
    """Sort key of grids written as text: by number of subdomains (``1x1``, the global CNN, first), then by name."""
    return math.prod(parse_grid(grid)), grid


# -- options: every field is declared with `option`, its help and its group in the field's metadata --------------

# the groups of `ddcnn train --help` and `ddcnn compare --help`, by what an option means to a user, in that order
GROUPS = {
    "data": "the dataset, its splits and augmentation",
    "model": "what is trained: backbone, decomposition, method",
    "training": "optimiser, schedule, batches, epochs and seeds",
    "aggregation": "the aggregator and the aggregation phase, in which it learns from the frozen local CNNs",
    "device": "where and in which precision the computation runs",
    "distributed": "runs under torchrun (docs/distributed.md)",
    "output": "the run folder: checkpoints, logs, progress and resuming",
}


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str,
    choices: tuple[str, ...] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field that documents itself: ``help`` (meaning, unit, what unset means) and ``group`` (a key of
    :data:`GROUPS`) are what ``--help`` shows; ``choices``, the values the field accepts, are checked by
    :func:`check_choices` and shown as the flag's metavar."""
    if group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {', '.join(GROUPS)}")
    metadata: dict[str, Any] = {"help": help, "group": group}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, default_factory=default_factory, metadata=metadata)


def check_choices(cfg: Any) -> None:
    """Check every field of the dataclass ``cfg`` declared with ``choices`` (see :func:`option`)."""
    for f in dataclasses.fields(cfg):
        if "choices" in f.metadata:
            check_choice(f.name, getattr(cfg, f.name), f.metadata["choices"])


def field_default(f: dataclasses.Field) -> Any:
    """The default value of dataclass field ``f``."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
