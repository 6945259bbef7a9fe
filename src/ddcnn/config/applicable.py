"""The options a run sets but does not read (:func:`inapplicable_options`): one-line warnings, and a ConfigError where
two options contradict each other."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .options import METHOD_NAMES, field_default, format_grid
from .sections import DataConfig, ModelConfig, RunConfig, SharedOptions, TrainConfig

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
                            "(decompose with --method local, aggregation, coherent or transfer)")
        elif model.overlap:
            messages.append("--overlap has no effect with --method global: the global CNN sees whole images")
    elif model.overlap and math.prod(cfg.model.grid) == 1:
        messages.append(f"--overlap has no effect on the grid {grid}: its one subdomain is the whole image")
    if model.coarse and (method == "global" or math.prod(cfg.model.grid) == 1):
        messages.append(f"--coarse has no effect on the global CNN (--method global, or the grid {grid}): a coarse "
                        "level supplies the whole image to the subdomains of a finer grid")
    if model.local_width is not None and (method == "global" or math.prod(cfg.model.grid) == 1):
        messages.append("--local-width has no effect on the global CNN (--method global, or a 1x1 grid): it keeps "
                        "--width")
    if cfg.pretrained is not None and method not in ("aggregation", "transfer"):
        messages.append(f"--pretrained has no effect with --method {method}: only aggregation and transfer start from a "
                        "pretrained local phase")
    uses_aggregator = method in ("aggregation", "coherent", "transfer")
    if not uses_aggregator:
        messages += [f"--{_flag(name)} has no effect with --method {method}, which has no aggregator"
                     for name in sorted(changed) if name in (*_AGGREGATOR_OPTIONS, "local_output", "feature_dim")]
    elif model.aggregator != "dnn":
        messages += [f"--{_flag(name)} has no effect with --aggregator {model.aggregator}: it is an option of the "
                     "dnn aggregator" for name in sorted(changed) if name in _AGGREGATOR_OPTIONS[1:]]
    if uses_aggregator and "local_output" in changed and not _aggregator_is_trained(model.aggregator):
        messages.append(f"--local-output has no effect with --aggregator {model.aggregator}: it combines the local "
                        "probabilities (the trained aggregators dnn, linear and attention read logits or features)")
    if uses_aggregator and "feature_dim" in changed and (model.local_output != "features"
                                                         or not _aggregator_is_trained(model.aggregator)):
        messages.append(f"--feature-dim has no effect with --aggregator {model.aggregator} and --local-output "
                        f"{model.local_output}: it is the size of the local features that --local-output features "
                        "hands a trained aggregator")
    if cfg.transfer_aggregator and method != "transfer":
        messages.append(f"--transfer-aggregator has no effect with --method {method}: only transfer starts from an "
                        "aggregation phase")
    elif cfg.transfer_aggregator and not _aggregator_has_state(model.aggregator):
        messages.append(f"--transfer-aggregator has no effect with --aggregator {model.aggregator}: it learns "
                        "nothing to transfer")
    aggregation_phase = method == "aggregation" or (method == "transfer" and cfg.transfer_aggregator and not cfg.pretrained)
    trains_aggregator = aggregation_phase and _aggregator_is_trained(model.aggregator)
    why = (f"--method {method} trains no aggregator on local probabilities" if not aggregation_phase else
           f"--aggregator {model.aggregator} is not trained" if not trains_aggregator else "")
    messages += inapplicable_aggregation(cfg, changed, trains_aggregator, why, cfg.data.augment)
    trains_local = method == "local" or (method in ("aggregation", "transfer") and not cfg.pretrained) or (
        trains_aggregator and cfg.aggregator_inputs == "crossfit"
    )
    if method == "aggregation" and not trains_local:  # only the aggregator trains, with its own optimiser
        sgd = ("momentum", "nesterov") if cfg.train.optimizer == "sgd" else ()
        messages += [f"--{_flag(name)} has no effect with --method aggregation --pretrained: a trained aggregator "
                     "trains with adamw at --aggregator-lr" for name in ("optimizer", "lr", *sgd)
                     if getattr(cfg.train, name) != _default(TrainConfig, name)]
    if method == "aggregation" and not (trains_local or trains_aggregator):
        messages += [f"--{_flag(name)} {getattr(cfg.train, name)} has no effect with --method aggregation --pretrained "
                     f"--aggregator {model.aggregator}: nothing is trained" for name in ("class_weights", "sampler")
                     if getattr(cfg.train, name) != _default(TrainConfig, name)]
    if cfg.local_epochs is not None and not trains_local:
        reason = "--pretrained" if method in ("aggregation", "transfer") else f"--method {method}"
        messages.append(f"--local-epochs has no effect with {reason}: no local phase is trained")
    messages += _inapplicable_ddp_hook(cfg, trains_local)
    if model.init_weights is not None and not (method in ("global", "coherent") or trains_local):
        messages.append(f"--init-weights has no effect with --method {method} and --pretrained: no CNN is trained "
                        "from the start, the local CNNs come from --pretrained")
    return messages


def _inapplicable_ddp_hook(cfg: RunConfig, trains_local: bool) -> list[str]:
    """--ddp-hook acts on data-parallel training only: every training of --parallel data but the aggregator's (every
    process trains it alike), and in model parallelism the global CNN and the local phases (their processes that
    share a subdomain); with one process, the Trainer says so (ddcnn.distributed.ddp)."""
    hook, method, parallel = cfg.train.ddp_hook, cfg.method, cfg.train.parallel
    if hook == "none" or trains_local or method == "global":
        return []
    if parallel == "model" and method in ("coherent", "transfer"):
        why = "a CNN-DNN trained model parallel averages no gradients (use --parallel data)"
    elif method in ("coherent", "transfer"):
        return []
    else:
        why = "only the aggregator is trained, by every process alike"
    pretrained = " --pretrained" if cfg.pretrained else ""
    return [f"--ddp-hook {hook} has no effect with --method {method}{pretrained} --parallel {parallel}: {why}"]


def inapplicable_aggregation(
    cfg: SharedOptions, changed: set[str], trains_aggregator: bool, why: str, augment: bool
) -> list[str]:
    """Warnings about the options of the aggregation phase (``why``: the reason no aggregator is trained)."""
    epochs = ["aggregator_epochs"] if getattr(cfg, "aggregator_epochs", None) is not None else []
    if not trains_aggregator:
        options = ("aggregator_inputs", "crossfit_folds", "augmented_passes", "aggregator_batch_size", "aggregator_lr")
        names = [n for n in options if n in changed]
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
                        "and csv datasets (and CIFAR-10 read from an image tree) are resized")
    if data.volume_shape is not None and data.dataset.partition(":")[0].strip().lower() != "nifti":
        messages.append(f"--volume-shape {data.volume_shape} has no effect on the dataset {data.dataset}: only nifti "
                        "volumes are resampled")
    if not data.augment:
        if data.flip:
            messages.append("--flip has no effect with --no-augment")
        if data.crop_padding != _default(DataConfig, "crop_padding"):
            messages.append("--crop-padding has no effect with --no-augment")
    if train.amp and train.dtype == "float64":
        raise ConfigError("amp (bf16 autocast) and dtype float64 contradict each other: autocast lowers only float32 "
                          "computations; drop --amp or use --dtype float32")
    if train.amp is False and train.amp_dtype != "bfloat16":
        messages.append(f"--amp-dtype {train.amp_dtype} has no effect with --no-amp")
    if train.amp and _device_type(train.device) != "cuda":
        device = train.device + (f" ({_device_type(train.device)} here)" if train.device == "auto" else "")
        messages.append(f"--amp has no effect on the device {device}: bf16 autocast is used on CUDA only")
    if train.schedule == "constant" and train.warmup_fraction != _default(TrainConfig, "warmup_fraction"):
        messages.append("--warmup-fraction has no effect with --schedule constant")
    if train.ddp_hook != "powersgd" and train.powersgd_rank != _default(TrainConfig, "powersgd_rank"):
        messages.append(f"--powersgd-rank has no effect with --ddp-hook {train.ddp_hook}: it is the rank of "
                        "--ddp-hook powersgd")
    if train.class_weights != "none" and train.sampler != "uniform":
        messages.append(f"--class-weights {train.class_weights} with --sampler {train.sampler} corrects the class "
                        "imbalance twice (the sampler already gives every class 1/K of an epoch), so that the rare "
                        "classes outweigh the common ones; choose one of the two")
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
    from ..models.aggregators import aggregator_class

    return aggregator_class(name).trainable


def _aggregator_has_state(name: str) -> bool:
    """Whether aggregator ``name`` learns anything (trained parameters or fitted weights) that could be transferred."""
    from ..models.aggregators import aggregator_class

    cls = aggregator_class(name)
    return cls.trainable or cls.fitted


def _resizes(dataset: str) -> bool | None:
    """Whether the reader of ``dataset`` resizes to ``image_size``: False for npz, nifti, mnist5k and the CIFAR-10
    batches, True for imagefolder and csv, None where only reading it tells (cifar10 from the cache, datasets
    registered by users)."""
    name, _, path = dataset.partition(":")
    name = name.strip().lower()
    if name in ("npz", "nifti", "mnist5k"):
        return False
    if name in ("imagefolder", "csv"):
        return True
    if name == "cifar10" and path:
        root = Path(path).expanduser()
        if root.name == "cifar-10-python.tar.gz" or any(
            (folder / "data_batch_1").is_file() for folder in (root, root / "cifar-10-batches-py")
        ):
            return False
    return None
