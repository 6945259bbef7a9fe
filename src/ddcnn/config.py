"""Configuration as dataclasses. The library takes these; argparse and YAML exist only at the CLI edge.

A run's resolved configuration is written next to its results and into every checkpoint
(:func:`config_to_dict`), and can be read back (:func:`config_from_dict`), which refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")
PARALLEL_MODES = ("model", "data")
DTYPES = ("float32", "float64")
AGGREGATOR_INPUTS = ("train", "crossfit", "val", "augmented")


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


def check(condition: bool, key: str, value: Any, requirement: str) -> None:
    """Raise a ConfigError naming ``key``, its ``value`` and the ``requirement`` it breaks, unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key} must be {requirement}, got {value!r}; fix the flag or the YAML key {key}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, value, f"one of {', '.join(choices)}")


def _optional_positive(value: float | None) -> bool:
    return value is None or value > 0


def format_grid(grid: tuple[int, ...]) -> str:
    return "x".join(str(g) for g in grid)


def grid_order(grid: str) -> tuple[int, str]:
    """Sort key of grids written as text: by number of subdomains (``1x1``, the global CNN, first), then by name."""
    return math.prod(parse_grid(grid)), grid


@dataclass
class DataConfig:
    dataset: str = "mnist5k"  # name or name:PATH, see `ddcnn datasets`
    image_size: int | None = None  # resize (imagefolder) to this side length; None: the dataset's own size
    batch_size: int = 64
    eval_batch_size: int = 512
    augment: bool = True
    crop_padding: int = 2  # random-crop translation in pixels (per axis); 0 turns it off
    flip: bool = False  # random horizontal flip (last axis); off by default: it breaks digits
    val_fraction: float = 0.1  # of the training data, where a dataset has no validation split
    test_fraction: float = 0.2  # of all data, where a dataset has no test split
    split_seed: int = 0  # seed of the deterministic stratified splits
    limit_train: int | None = None  # use only this many training images (stratified), for quick runs
    cache_dir: str | None = None  # decoded-image cache; None: ~/.cache/ddcnn
    max_memory_gb: float = 4.0  # datasets larger than this stream from the on-disk cache
    num_workers: int = 0  # DataLoader workers when streaming

    def __post_init__(self) -> None:
        check(_optional_positive(self.image_size), "image_size", self.image_size, "a positive side length or None")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "at least 1")
        check(self.crop_padding >= 0, "crop_padding", self.crop_padding, "0 or more pixels")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "in [0, 1)")
        check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "in [0, 1)")
        check(self.split_seed >= 0, "split_seed", self.split_seed, "0 or more")
        check(_optional_positive(self.limit_train), "limit_train", self.limit_train, "a positive count or None")
        check(self.max_memory_gb > 0, "max_memory_gb", self.max_memory_gb, "positive")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "0 or more")


@dataclass
class ModelConfig:
    backbone: str = "vgg9"  # see `ddcnn models`
    width: float = 1.0  # channel-width multiplier of the backbone
    grid: tuple[int, ...] = (1, 1)  # subdomains per axis; (1, 1) is the global CNN
    overlap: int = 0  # delta: pixels each subdomain reaches into its neighbours
    aggregator: str = "dnn"  # see `ddcnn aggregators`
    dnn_hidden: tuple[int, ...] = (128, 128)  # hidden sizes of the DNN aggregator
    dnn_activation: str = "relu"
    dnn_dropout: float = 0.1
    dnn_batchnorm: bool = True

    def __post_init__(self) -> None:
        self.grid = parse_grid(self.grid)
        self.dnn_hidden = tuple(int(h) for h in self.dnn_hidden)
        check(self.width > 0 and math.isfinite(self.width), "width", self.width, "a positive multiplier")
        check(self.overlap >= 0, "overlap", self.overlap, "0 or more pixels")
        check(all(h >= 1 for h in self.dnn_hidden), "dnn_hidden", self.dnn_hidden, "positive layer sizes")
        check(0 <= self.dnn_dropout < 1, "dnn_dropout", self.dnn_dropout, "in [0, 1)")


@dataclass
class TrainConfig:
    epochs: int = 5
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_fraction: float = 0.2  # of all steps, for onecycle and cosine
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    channels_last: bool | None = None  # inputs and convolutions; None: inputs on CUDA, convolutions of batches >= 32
    amp: bool | None = None  # bf16 autocast; None: on for CUDA
    compile: bool = False  # torch.compile the model (measure the compile time)
    progress: bool = True  # progress bars
    checkpoint_every: int = 1  # epochs between checkpoints
    threads: int | None = None  # torch intra-op threads on CPU; None: torch's default
    # under torchrun (docs/distributed.md): model: the subdomains are spread over the processes (the method's own
    # parallelism); data: every process holds the whole model and a share of each batch (the baseline)
    parallel: str = "model"
    dist_timeout: float = 30.0  # minutes a process waits for the others at a collective before the job fails
    # floating-point type of parameters, activations and gradients: float32, or float64 (slow), in which runs that
    # differ only in the order of floating-point sums (1 against N processes) agree to ~1e-12 instead of ~1e-4
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive learning rate")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or more")
        check_choice("schedule", self.schedule, SCHEDULES)
        check(0 <= self.warmup_fraction <= 1, "warmup_fraction", self.warmup_fraction, "in [0, 1]")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        check(_optional_positive(self.grad_clip), "grad_clip", self.grad_clip, "a positive norm or None")
        check(self.seed >= 0, "seed", self.seed, "0 or more")
        check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "at least 1 epoch")
        check(_optional_positive(self.threads), "threads", self.threads, "a positive count or None")
        check_choice("parallel", self.parallel, PARALLEL_MODES)
        check(self.dist_timeout > 0, "dist_timeout", self.dist_timeout, "positive minutes")
        check_choice("dtype", self.dtype, DTYPES)


@dataclass
class RunConfig:
    """One `ddcnn train` run: a method trained on one dataset with one model configuration."""

    method: str = "global"  # global | local | cnn_dnn | coherent | transfer
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    local_epochs: int | None = None  # local phase; None: train.epochs
    dnn_epochs: int | None = None  # aggregation phase; None: train.epochs
    pretrained: str | None = None  # run folder or checkpoint of the local phase, for cnn_dnn and transfer
    # aggregation phase (ours, the papers use "train"): the local probabilities a trained aggregator learns from.
    # train: on the training images; crossfit: out-of-fold, k local phases on k-1 folds each (k times the cost);
    # val: on the validation split; augmented: on augmented passes over the training images
    aggregator_inputs: str = "train"
    crossfit_folds: int = 3  # k of aggregator_inputs=crossfit
    augmented_passes: int = 2  # passes of aggregator_inputs=augmented
    transfer_aggregator: bool = False  # transfer: start the aggregator from the aggregation phase's, not at random
    resume: bool = False

    def __post_init__(self) -> None:
        check(self.local_epochs is None or self.local_epochs >= 1, "local_epochs", self.local_epochs, "at least 1")
        check(self.dnn_epochs is None or self.dnn_epochs >= 1, "dnn_epochs", self.dnn_epochs, "at least 1")
        check_choice("aggregator_inputs", self.aggregator_inputs, AGGREGATOR_INPUTS)
        check(self.crossfit_folds >= 2, "crossfit_folds", self.crossfit_folds, "at least 2")
        check(self.augmented_passes >= 1, "augmented_passes", self.augmented_passes, "at least 1")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Coerce a YAML/JSON value to a field's annotated type; raise ConfigError when it cannot be."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, str) and key.endswith("grid"):
            return parse_grid(value)
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
        return config_from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation in (int, float, str):
        if isinstance(value, bool) and annotation is not str:
            raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}")
        if annotation is not str and isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}")
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} must be {annotation.__name__}, got {value!r}") from None
    return value


def config_from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are a ConfigError naming the known ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; known keys{' of ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (validated later by :func:`config_from_dict`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data
