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
