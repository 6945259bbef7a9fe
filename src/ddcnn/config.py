"""Configuration as dataclasses. The library takes these; argparse and YAML exist only at the CLI edge.

A run's resolved configuration is written next to its results and into every checkpoint
(:func:`config_to_dict`), and can be read back (:func:`config_from_dict`), which refuses unknown keys.

Every option is declared once, with :func:`option`: its default, its help (meaning, unit, choices) and its group
(:data:`GROUPS`) live in the field's metadata, which the command line's flags and ``--help`` are made from.
:func:`inapplicable_options` names the options a run sets but does not read.
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
METHOD_NAMES = ("global", "local", "cnn_dnn", "coherent", "transfer")  # ddcnn.methods.METHODS


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


@dataclass
class DataConfig:
    dataset: str = option(
        "mnist5k", group="data",
        help="name or name:PATH: mnist5k, cifar10[:PATH], imagefolder:PATH, npz:PATH (`ddcnn datasets` lists them)",
    )
    image_size: int | None = option(
        None, group="data",
        help="side length in pixels that imagefolder images (and CIFAR-10 read from an image tree) are resized to; "
        "unset: the images' own size",
    )
    batch_size: int = option(
        64, group="training",
        help="training images per step, of the whole job (under torchrun --parallel data each process takes a "
        "share); also the aggregation phase's batch",
    )
    eval_batch_size: int = option(
        512, group="training", help="images per batch when evaluating and computing local probabilities (speed only)"
    )
    augment: bool = option(True, group="data", help="augment the training images (random crops, and flips with --flip)")
    crop_padding: int = option(
        2, group="data", help="random-crop translation in pixels, per axis (reflect-padded); 0 turns crops off"
    )
    flip: bool = option(
        False, group="data", help="random horizontal flips (last axis) of half the training images; off by default "
        "because it breaks digits",
    )
    val_fraction: float = option(
        0.1, group="data", help="fraction of the training data held out for validation, in [0, 1), where a dataset "
        "has no validation split",
    )
    test_fraction: float = option(
        0.2, group="data", help="fraction of all data held out for testing, in [0, 1), where a dataset has no test split"
    )
    split_seed: int = option(
        0, group="data", help="seed of the deterministic, stratified val and test splits (the same for every "
        "training seed)",
    )
    limit_train: int | None = option(
        None, group="data", help="train on only this many training images (stratified), for quick runs; unset: all"
    )
    cache_dir: str | None = option(
        None, group="data", help="folder of decoded images, extracted archives and streamed splits; unset: "
        "~/.cache/ddcnn",
    )
    max_memory_gb: float = option(
        4.0, group="data", help="datasets whose uint8 images take more GB (10^9 bytes) than this are streamed from "
        "the on-disk cache instead of held in memory",
    )
    num_workers: int = option(
        0, group="data", help="DataLoader worker processes reading a streamed dataset; 0: the main process "
        "(in-memory datasets use none)",
    )

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
    backbone: str = option(
        "vgg9", group="model", help="CNN family of the global and the local CNNs (`ddcnn models` lists them)"
    )
    width: float = option(1.0, group="model", help="channel-width multiplier of the backbone (0.5: half the channels)")
    grid: tuple[int, ...] = option(
        (1, 1), group="model", help="the decomposition: subdomains per axis, e.g. 2x2, or 2x2x2 for volumes; 1x1 is "
        "the global CNN",
    )
    overlap: int = option(
        0, group="model", help="delta: pixels each subdomain reaches into its neighbours (clipped at the image border)"
    )
    aggregator: str = option(
        "dnn", group="aggregation", help="how the local CNNs' probabilities become one prediction, for cnn_dnn, "
        "coherent and transfer (`ddcnn aggregators` lists them; dnn: the papers' DNN)",
    )
    dnn_hidden: tuple[int, ...] = option(
        (128, 128), group="aggregation", help="hidden layer sizes of the dnn aggregator, comma-separated"
    )
    dnn_activation: str = option(
        "relu", group="aggregation", help="activation of the dnn aggregator's hidden layers: relu, gelu, silu, tanh "
        "or leaky_relu",
    )
    dnn_dropout: float = option(
        0.1, group="aggregation", help="dropout probability after each hidden layer of the dnn aggregator, in [0, 1)"
    )
    dnn_batchnorm: bool = option(True, group="aggregation", help="batch norm in the dnn aggregator's hidden layers")

    def __post_init__(self) -> None:
        self.grid = parse_grid(self.grid)
        self.dnn_hidden = tuple(int(h) for h in self.dnn_hidden)
        check(self.width > 0 and math.isfinite(self.width), "width", self.width, "a positive multiplier")
        check(self.overlap >= 0, "overlap", self.overlap, "0 or more pixels")
        check(all(h >= 1 for h in self.dnn_hidden), "dnn_hidden", self.dnn_hidden, "positive layer sizes")
        check(0 <= self.dnn_dropout < 1, "dnn_dropout", self.dnn_dropout, "in [0, 1)")


@dataclass
class TrainConfig:
    epochs: int = option(
        5, group="training", help="epochs (passes over the training images) of the method's training; the local and "
        "aggregation phases: see --local-epochs and --dnn-epochs",
    )
    optimizer: str = option(
        "sgd", group="training", choices=OPTIMIZERS,
        help=f"the optimiser, {' or '.join(OPTIMIZERS)} (sgd with --momentum and --nesterov)",
    )
    lr: float = option(0.05, group="training", help="peak learning rate of the schedule")
    momentum: float = option(0.9, group="training", help="SGD momentum, in [0, 1) (adamw ignores it)")
    nesterov: bool = option(True, group="training", help="Nesterov momentum for sgd (adamw ignores it)")
    weight_decay: float = option(
        5e-4, group="training", help="weight decay of weight matrices and kernels (biases and norms have none)"
    )
    schedule: str = option(
        "onecycle", group="training", choices=SCHEDULES,
        help="learning rate per step: onecycle (linear warm-up, then linear decay to 0), cosine (warm-up, then cosine "
        "decay to 0) or constant",
    )
    warmup_fraction: float = option(
        0.2, group="training", help="fraction of all steps spent warming up from 0.1 x lr to lr, for onecycle and cosine"
    )
    label_smoothing: float = option(0.0, group="training", help="label smoothing of the cross-entropy, in [0, 1)")
    grad_clip: float | None = option(
        None, group="training", help="clip the gradient norm to this value; unset: no clipping"
    )
    seed: int = option(0, group="training", help="seed of the initialisation, the batch order and the augmentation")
    device: str = option(
        "auto", group="device", help="auto (CUDA if available, else the CPU), cpu, cuda or cuda:N"
    )
    channels_last: bool | None = option(
        None, group="device", help="channels-last memory format of inputs and convolutions (speed only); unset: "
        "inputs on CUDA, convolutions of batches of 32 or more",
    )
    amp: bool | None = option(
        None, group="device", help="bf16 autocast of float32 computations, on CUDA only; unset: on for CUDA"
    )
    compile: bool = option(
        False, group="device", help="torch.compile the model each training runs (compiling takes seconds to "
        "minutes before the first steps; benchmarks/README.md measures it)",
    )
    progress: bool = option(True, group="output", help="progress bars")
    checkpoint_every: int = option(
        1, group="output", help="epochs between checkpoints (the last epoch, and a stop by SIGTERM, always write one)"
    )
    threads: int | None = option(
        None, group="device", help="torch intra-op threads on the CPU; unset: torch's default"
    )
    parallel: str = option(
        "model", group="distributed", choices=PARALLEL_MODES,
        help="how the processes of torchrun share the work: model (the subdomains are spread over the processes: the "
        "method's own parallelism) or data (every process holds the whole model and a share of each batch: the "
        "baseline)",
    )
    dist_timeout: float = option(
        30.0, group="distributed", help="minutes a process waits for the others at a collective before the job fails"
    )
    dtype: str = option(
        "float32", group="device", choices=DTYPES,
        help="floating-point type of parameters, activations and gradients; float64 is slow, but runs that differ "
        "only in the order of floating-point sums (1 against N processes) agree to ~1e-12 instead of ~1e-4",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive learning rate")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or more")
        check(0 <= self.warmup_fraction <= 1, "warmup_fraction", self.warmup_fraction, "in [0, 1]")
        check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "in [0, 1)")
        check(_optional_positive(self.grad_clip), "grad_clip", self.grad_clip, "a positive norm or None")
        check(self.seed >= 0, "seed", self.seed, "0 or more")
        check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "at least 1 epoch")
        check(_optional_positive(self.threads), "threads", self.threads, "a positive count or None")
        check(self.dist_timeout > 0, "dist_timeout", self.dist_timeout, "positive minutes")


@dataclass
class SharedOptions:
    """The top-level options of both ``ddcnn train`` (:class:`RunConfig`) and ``ddcnn compare``
    (:class:`~ddcnn.compare.CompareConfig`), defined once here so that the two cannot drift apart: an option added
    here is a flag and a YAML key of both, and compare passes it to every phase."""

    resume: bool = option(
        False, group="output", help="continue from the checkpoints in --out: finished phases are loaded, not "
        "trained again, unfinished ones resumed; a changed configuration is refused (by compare: all but more "
        "grids, seeds or methods)",
    )
    aggregator_inputs: str = option(
        "train", group="aggregation", choices=AGGREGATOR_INPUTS,
        help="the local probabilities a trained aggregator learns from: train (the local CNNs on the training "
        "images, as in the papers), crossfit (out of fold: k more local "
        "phases on k-1 folds each, k times the cost), val (on the validation split), augmented (on augmented "
        "passes over the training images)",
    )
    crossfit_folds: int = option(
        3, group="aggregation", help="k, the folds of --aggregator-inputs crossfit (at least 2)"
    )
    augmented_passes: int = option(
        2, group="aggregation", help="passes over the training images of --aggregator-inputs augmented"
    )
    transfer_aggregator: bool = option(
        False, group="aggregation", help="transfer learning starts the aggregator from the aggregation phase's "
        "instead of at random",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.crossfit_folds >= 2, "crossfit_folds", self.crossfit_folds, "at least 2")
        check(self.augmented_passes >= 1, "augmented_passes", self.augmented_passes, "at least 1")


@dataclass
class RunConfig(SharedOptions):
    """One `ddcnn train` run: a method trained on one dataset with one model configuration."""

    method: str = option(
        "global", group="model", help=f"what is trained, one of {', '.join(METHOD_NAMES)} (see docs/method.md)"
    )
    out: str = option(
        "runs/default", group="output", help="run folder: checkpoints, logs, config.yaml, results.json and plots"
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    local_epochs: int | None = option(
        None, group="training", help="epochs of the local phase (of local, of cnn_dnn and transfer without "
        "--pretrained, and of each crossfit fold); unset: --epochs",
    )
    dnn_epochs: int | None = option(
        None, group="aggregation", help="epochs of the aggregation phase (a trained aggregator on the local "
        "probabilities); unset: --epochs",
    )
    pretrained: str | None = option(
        None, group="model", help="run folder or checkpoint of a local phase that cnn_dnn and transfer start from "
        "instead of training one (for transfer with --transfer-aggregator: the folder of its aggregation phase)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.local_epochs is None or self.local_epochs >= 1, "local_epochs", self.local_epochs, "at least 1")
        check(self.dnn_epochs is None or self.dnn_epochs >= 1, "dnn_epochs", self.dnn_epochs, "at least 1")


# -- options that do not apply ----------------------------------------------------------------------------------

# the model options of the aggregator: the aggregator, then those of the dnn aggregator
_AGGREGATOR_OPTIONS = ("aggregator", "dnn_hidden", "dnn_activation", "dnn_dropout", "dnn_batchnorm")


def inapplicable_options(cfg: RunConfig) -> list[str]:
    """One-line warnings about the options of ``cfg`` that have no effect for its method, aggregator, data or
    device (set, or changed from their defaults, but read by nothing this run does). Raises a ConfigError where two
    options contradict each other. An unknown method gives no warnings (the run refuses it)."""
    method = cfg.method
    if method not in METHOD_NAMES:
        return []
    messages = inapplicable_data_and_training(cfg.data, cfg.train)
    changed = changed_options(cfg)
    grid, model = format_grid(cfg.model.grid), cfg.model
    if method == "global":
        if math.prod(cfg.model.grid) > 1:
            messages.append(f"--grid {grid} has no effect with --method global: the global CNN sees whole images "
                            "(decompose with --method local, cnn_dnn, coherent or transfer)")
        elif model.overlap:
            messages.append("--overlap has no effect with --method global: the global CNN sees whole images")
    elif model.overlap and math.prod(cfg.model.grid) == 1:
        messages.append(f"--overlap has no effect on the grid {grid}: its one subdomain is the whole image")
    if cfg.pretrained is not None and method not in ("cnn_dnn", "transfer"):
        messages.append(f"--pretrained has no effect with --method {method}: only cnn_dnn and transfer start from a "
                        "pretrained local phase")
    uses_aggregator = method in ("cnn_dnn", "coherent", "transfer")
    if not uses_aggregator:
        messages += [f"--{_flag(name)} has no effect with --method {method}, which has no aggregator"
                     for name in sorted(changed) if name in _AGGREGATOR_OPTIONS]
    elif model.aggregator != "dnn":
        messages += [f"--{_flag(name)} has no effect with --aggregator {model.aggregator}: it is an option of the "
                     "dnn aggregator" for name in sorted(changed) if name in _AGGREGATOR_OPTIONS[1:]]
    if cfg.transfer_aggregator and method != "transfer":
        messages.append(f"--transfer-aggregator has no effect with --method {method}: only transfer starts from an "
                        "aggregation phase")
    elif cfg.transfer_aggregator and not _aggregator_has_state(model.aggregator):
        messages.append(f"--transfer-aggregator has no effect with --aggregator {model.aggregator}: it learns "
                        "nothing to transfer")
    aggregation_phase = method == "cnn_dnn" or (method == "transfer" and cfg.transfer_aggregator and not cfg.pretrained)
    trains_aggregator = aggregation_phase and _aggregator_is_trained(model.aggregator)
    why = (f"--method {method} trains no aggregator on local probabilities" if not aggregation_phase else
           f"--aggregator {model.aggregator} is not trained" if not trains_aggregator else "")
    messages += inapplicable_aggregation(cfg, changed, trains_aggregator, why, cfg.data.augment)
    trains_local = method == "local" or (method in ("cnn_dnn", "transfer") and not cfg.pretrained) or (
        trains_aggregator and cfg.aggregator_inputs == "crossfit"
    )
    if cfg.local_epochs is not None and not trains_local:
        reason = "--pretrained" if method in ("cnn_dnn", "transfer") else f"--method {method}"
        messages.append(f"--local-epochs has no effect with {reason}: no local phase is trained")
    return messages


def inapplicable_aggregation(
    cfg: SharedOptions, changed: set[str], trains_aggregator: bool, why: str, augment: bool
) -> list[str]:
    """Warnings about the options of the aggregation phase (``why``: the reason no aggregator is trained)."""
    epochs = ["dnn_epochs"] if getattr(cfg, "dnn_epochs", None) is not None else []
    if not trains_aggregator:
        names = [n for n in ("aggregator_inputs", "crossfit_folds", "augmented_passes") if n in changed]
        return [f"--{_flag(name)} has no effect: {why}" for name in epochs + names]
    messages = []
    if "crossfit_folds" in changed and cfg.aggregator_inputs != "crossfit":
        messages.append(f"--crossfit-folds has no effect with --aggregator-inputs {cfg.aggregator_inputs}: it is the "
                        "k of --aggregator-inputs crossfit")
    if "augmented_passes" in changed and cfg.aggregator_inputs != "augmented":
        messages.append(f"--augmented-passes has no effect with --aggregator-inputs {cfg.aggregator_inputs}: it is "
                        "an option of --aggregator-inputs augmented")
    if cfg.aggregator_inputs == "augmented" and not augment:
        messages.append("--aggregator-inputs augmented without --augment repeats the train inputs: the passes are "
                        "all alike")
    return messages


def inapplicable_data_and_training(data: DataConfig, train: TrainConfig) -> list[str]:
    """Warnings about options of the data and training sections that the dataset or device ignore."""
    messages = []
    if data.image_size is not None and _resizes(data.dataset) is False:
        messages.append(f"--image-size {data.image_size} has no effect on the dataset {data.dataset}: only imagefolder "
                        "datasets (and CIFAR-10 read from an image tree) are resized")
    if not data.augment:
        if data.flip:
            messages.append("--flip has no effect with --no-augment")
        if data.crop_padding != _default(DataConfig, "crop_padding"):
            messages.append("--crop-padding has no effect with --no-augment")
    if train.amp and train.dtype == "float64":
        raise ConfigError("amp (bf16 autocast) and dtype float64 contradict each other: autocast lowers only float32 "
                          "computations; drop --amp or use --dtype float32")
    if train.amp and _device_type(train.device) != "cuda":
        device = train.device + (f" ({_device_type(train.device)} here)" if train.device == "auto" else "")
        messages.append(f"--amp has no effect on the device {device}: bf16 autocast is used on CUDA only")
    if train.schedule == "constant" and train.warmup_fraction != _default(TrainConfig, "warmup_fraction"):
        messages.append("--warmup-fraction has no effect with --schedule constant")
    if train.optimizer == "adamw":
        if train.momentum != _default(TrainConfig, "momentum"):
            messages.append("--momentum has no effect with --optimizer adamw")
        if not train.nesterov:
            messages.append("--no-nesterov has no effect with --optimizer adamw")
    return messages


def changed_options(cfg: Any) -> set[str]:
    """The names of the top-level and model options of ``cfg`` that differ from their classes' defaults."""
    changed = {f.name for f in dataclasses.fields(cfg) if f.metadata and getattr(cfg, f.name) != field_default(f)}
    model = {f.name for f in dataclasses.fields(ModelConfig) if getattr(cfg.model, f.name) != field_default(f)}
    return changed | model


def _default(cls: type, name: str) -> Any:
    return field_default(next(f for f in dataclasses.fields(cls) if f.name == name))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _device_type(device: str) -> str:
    """``cuda`` or ``cpu`` (or another torch device type) that ``device`` resolves to."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.partition(":")[0]


def _aggregator_is_trained(name: str) -> bool:
    from .models.aggregators import aggregator_class

    return aggregator_class(name).trainable


def _aggregator_has_state(name: str) -> bool:
    """Whether aggregator ``name`` learns anything (trained parameters or fitted weights) that could be transferred."""
    from .models.aggregators import aggregator_class

    cls = aggregator_class(name)
    return cls.trainable or cls.fitted


def _resizes(dataset: str) -> bool | None:
    """Whether the reader of ``dataset`` resizes to ``image_size``: False for npz, mnist5k and the CIFAR-10 batches,
    True for imagefolder, None where only reading it tells (cifar10 from the cache, datasets registered by users)."""
    name, _, path = dataset.partition(":")
    name = name.strip().lower()
    if name in ("npz", "mnist5k"):
        return False
    if name == "imagefolder":
        return True
    if name == "cifar10" and path:
        root = Path(path).expanduser()
        if root.name == "cifar-10-python.tar.gz" or any(
            (folder / "data_batch_1").is_file() for folder in (root, root / "cifar-10-batches-py")
        ):
            return False
    return None


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
