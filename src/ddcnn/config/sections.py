"""The sections of a run's configuration (data, model, train) and the options of ``ddcnn train`` (:class:`RunConfig`),
those shared with ``ddcnn compare`` in :class:`SharedOptions`. Every value is checked when the dataclass is built.
The data section, :class:`DataConfig`, lives in :mod:`~ddcnn.config.data_section` and is re-exported here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .data_section import INTENSITY_FORMS, DataConfig, optional_positive, parse_intensity, parse_volume_shape
from .options import (
    AGGREGATOR_INPUTS,
    AMP_DTYPES,
    CLASS_WEIGHTS,
    DDP_HOOKS,
    DTYPES,
    LOCAL_OUTPUTS,
    METHOD_NAMES,
    OPTIMIZERS,
    PARALLEL_MODES,
    RENAMED_METHODS,
    SAMPLERS,
    SCHEDULES,
    check,
    check_choices,
    option,
    parse_grid,
)

__all__ = [
    "INTENSITY_FORMS",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "SharedOptions",
    "TrainConfig",
    "parse_intensity",
    "parse_volume_shape",
]


@dataclass
class ModelConfig:
    backbone: str = option(
        "vgg9", group="model", help="CNN family of the global and the local CNNs (`ddcnn models` lists them), or your "
        "own: package.module:function returning an nn.Module (docs/backbones.md)",
    )
    width: float = option(1.0, group="model", help="channel-width multiplier of the backbone (0.5: half the channels)")
    local_width: float | None = option(None, group="model", help="channel-width multiplier of the local CNNs only "
                                       "(the global CNN keeps --width): proportionally smaller ones; unset: --width")
    grid: tuple[int, ...] = option(
        (1, 1), group="model", help="the decomposition: subdomains per axis, e.g. 2x2, or 2x2x2 for volumes; 1x1 is "
        "the global CNN",
    )
    overlap: int = option(
        0, group="model", help="delta: pixels each subdomain reaches into its neighbours (clipped at the image border)"
    )
    coarse: bool = option(
        False, group="model", help="a coarse level (a two-level CNN-DNN): one more local CNN, on the whole image "
        "averaged down to the subimage shape (by the grid's factor), trained in the local phase like the others and "
        "read by the aggregator with them; for local, aggregation, coherent and transfer on a grid finer than 1x1",
    )
    aggregator: str = option(
        "dnn", group="aggregation", help="how the local CNNs' probabilities become one prediction, for aggregation, "
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
    local_output: str = option("probabilities", group="aggregation", choices=LOCAL_OUTPUTS, help="what of the local "
                               "CNNs the trained aggregators (dnn, linear, attention) read: probabilities, logits, or "
                               "features (each local CNN's pooled features, --feature-dim numbers)")
    feature_dim: int | None = option(
        None, group="aggregation", help="with --local-output features: the numbers per subdomain, D. A local CNN's "
        "last feature map (the one its head reads) is averaged over its spatial axes to its C channels, then C to "
        "D by averaging adjacent channels (adaptive average pooling); no parameters. At most C; unset: all C",
    )
    init_weights: str | None = option(
        None, group="model", help="a file of pretrained weights that the global CNN and every local CNN start from "
        "instead of at random: a torchvision or timm state dict (.safetensors, or .pt/.pth read with weights_only) "
        "of resnet18, resnet50, densenet121 or densenet169 at --width 1, 2D; the classifier starts fresh, the first "
        "convolution is summed over RGB for 1-channel images. Read by global, local, coherent and every local phase "
        "(not with --pretrained); pair it with --normalize imagenet",
    )
    init_weights_sha256: str | None = option(
        None, group="model", help="the sha256 the --init-weights file must have; unset: the run records the file's "
        "own (config.yaml, checkpoints), so that --resume refuses a changed file",
    )

    def __post_init__(self) -> None:
        self.grid = parse_grid(self.grid)
        self.dnn_hidden = tuple(int(h) for h in self.dnn_hidden)
        check(self.width > 0 and math.isfinite(self.width), "width", self.width, "a positive multiplier")
        check(self.local_width is None or 0 < self.local_width < math.inf, "local_width", self.local_width,
              "a positive multiplier or None")
        check(self.overlap >= 0, "overlap", self.overlap, "0 or more pixels")
        check(all(h >= 1 for h in self.dnn_hidden), "dnn_hidden", self.dnn_hidden, "positive layer sizes")
        check(0 <= self.dnn_dropout < 1, "dnn_dropout", self.dnn_dropout, "in [0, 1)")
        dim = self.feature_dim
        check(dim is None or dim >= 1, "feature_dim", dim, "at least 1, or unset")
        check_choices(self)
        if self.init_weights_sha256 is not None:
            self.init_weights_sha256 = str(self.init_weights_sha256).strip().lower()
            check(bool(re.fullmatch(r"[0-9a-f]{64}", self.init_weights_sha256)), "init_weights_sha256",
                  self.init_weights_sha256, "64 hexadecimal digits (a sha256)")
            check(self.init_weights is not None, "init_weights_sha256", self.init_weights_sha256, "given with "
                  "--init-weights (the file it is the sha256 of)")

    def width_of(self, num_subdomains: int) -> float:
        """The CNNs' width on a grid: ``width`` for the global CNN (1 subdomain), else ``local_width`` or ``width``."""
        return self.width if num_subdomains == 1 or self.local_width is None else self.local_width


@dataclass
class TrainConfig:
    epochs: int = option(
        5, group="training", help="epochs (passes over the training images) of the method's training; the local and "
        "aggregation phases: see --local-epochs and --aggregator-epochs",
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
        0.2, group="training",
        help="fraction of all steps spent warming up from 0.1 x lr to lr, for onecycle and cosine",
    )
    label_smoothing: float = option(0.0, group="training", help="label smoothing of the cross-entropy, in [0, 1)")
    class_weights: str = option(
        "none", group="training", choices=CLASS_WEIGHTS,
        help="class weights of the training loss, for imbalanced classes: none, or balanced (class k weighs n / (K * "
        "n_k), as scikit-learn's 'balanced', from the labels of the images being trained on): each image's "
        "cross-entropy times its class's weight, summed and divided by the batch size. For every training of the "
        "run: global, local phase, coherent, transfer and a trained aggregator (weighted by its own training inputs' "
        "labels); the logged train loss is the weighted one, val and test losses are not weighted",
    )
    sampler: str = option(
        "uniform", group="training", choices=SAMPLERS,
        help="how an epoch draws its training images: uniform (a permutation, every image once) or balanced (as "
        "many draws as images, with replacement, every class equally likely; ddcnn.data.sampling), for every "
        "training of the run, a trained aggregator's too",
    )
    accumulate: int = option(
        1, group="training", help="gradient accumulation: micro-batches of --batch-size per optimizer step, for the "
        "step of a batch N times larger in the memory of one (batch norm still sees the micro-batches)",
    )
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
        None, group="device", help="autocast of float32 computations (see --amp-dtype), on CUDA only; unset: on for "
        "CUDA"
    )
    amp_dtype: str = option(
        "bfloat16", group="device", choices=AMP_DTYPES,
        help="what --amp computes in: bfloat16, or float16 for GPUs without bfloat16 (V100, T4), for which the loss "
        "is scaled (torch.amp.GradScaler) so that small gradients do not vanish",
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
    ddp_hook: str = option(
        "none", group="distributed", choices=DDP_HOOKS, help="DDP's communication hook for data-parallel gradients: "
        "none (as they are), fp16 (half the bytes of float32) or powersgd (low-rank factors of each weight's, with "
        "error feedback, after the first 10% of the steps; see --powersgd-rank and docs/distributed.md)",
    )
    powersgd_rank: int = option(2, group="distributed", help="rank of --ddp-hook powersgd's factors (torch advises 1-4)")
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
        check(optional_positive(self.grad_clip), "grad_clip", self.grad_clip, "a positive norm or None")
        check(self.seed >= 0, "seed", self.seed, "0 or more")
        check(self.accumulate >= 1, "accumulate", self.accumulate, "at least 1 micro-batch per optimizer step")
        check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "at least 1 epoch")
        check(optional_positive(self.threads), "threads", self.threads, "a positive count or None")
        check(self.dist_timeout > 0, "dist_timeout", self.dist_timeout, "positive minutes")
        check(self.powersgd_rank >= 1, "powersgd_rank", self.powersgd_rank, "at least 1")


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
    aggregator_batch_size: int = option(512, group="aggregation", help="probability vectors (N*K numbers each) per "
                                        "step of a trained aggregator in the aggregation phase, which uses adamw")
    aggregator_lr: float | None = option(None, group="aggregation", help="peak learning rate of the aggregation "
                                         "phase's adamw; unset: the aggregator's own (dnn 0.01, linear 0.1, "
                                         "attention 0.003)")

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.crossfit_folds >= 2, "crossfit_folds", self.crossfit_folds, "at least 2")
        check(self.augmented_passes >= 1, "augmented_passes", self.augmented_passes, "at least 1")
        check(self.aggregator_batch_size >= 1, "aggregator_batch_size", self.aggregator_batch_size, "at least 1")
        check(optional_positive(self.aggregator_lr), "aggregator_lr", self.aggregator_lr, "positive or None")


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
        None, group="training", help="epochs of the local phase (of local, of aggregation and transfer without "
        "--pretrained, and of each crossfit fold); unset: --epochs",
    )
    aggregator_epochs: int | None = option(
        None, group="aggregation", help="epochs of the aggregation phase (a trained aggregator on the local "
        "probabilities); unset: --epochs",
    )
    pretrained: str | None = option(
        None, group="model", help="run folder or checkpoint of a local phase that aggregation and transfer start from "
        "instead of training one (for transfer with --transfer-aggregator: the folder of its aggregation phase)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = RENAMED_METHODS.get(self.method, self.method)  # ddcnn 0.1's cnn_dnn is aggregation
        check(self.local_epochs is None or self.local_epochs >= 1, "local_epochs", self.local_epochs, "at least 1")
        check(
            self.aggregator_epochs is None or self.aggregator_epochs >= 1, "aggregator_epochs", self.aggregator_epochs,
            "at least 1",
        )
