"""The training modes of the method (see docs/method.md), each a function of an :class:`Experiment`.

================  =============================================================================================
method            what is trained
================  =============================================================================================
``global``        the backbone on whole images (a ``1x1`` grid): the baseline
``local``         the local phase: all local CNNs of a grid at once, each against the global label
``cnn_dnn``       the aggregation phase: the configured aggregator on the frozen local CNNs' probabilities
                  (:func:`aggregation_phase` does several aggregators on one set of probabilities)
``coherent``      the whole CNN-DNN end to end from random initialisation, the loss only on its output
``transfer``      coherent training started from the pretrained local CNNs (and, optionally, aggregator)
================  =============================================================================================

Everything a method writes lands in the run folder, named after the method: ``<method>.pt`` (checkpoint, its
``finished`` flag set once the phase is complete) and ``<method>_log.csv`` (one row per epoch). The aggregation
phase and transfer take the local CNNs from ``cfg.pretrained`` (a run folder holding ``local.pt``, or a checkpoint)
or, without it, train the local phase in the run folder first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .aggregation import AggregatorFit, LocalProbabilities, TensorLoader, fit_aggregator, local_probabilities
from .config import RunConfig, config_from_dict, config_to_dict, format_grid
from .data import DatasetSplits, ImageSet, list_datasets, load_dataset, make_loader
from .data.registry import parse_spec
from .decomposition import Decomposition
from .distributed import (
    DistContext,
    Parallel,
    data_parallel_bytes_per_step,
    primary_first,
    subdomain_gather_bytes_per_step,
    sum_over_whole_model,
)
from .errors import CheckpointError, ConfigError, UnknownNameError
from .models import LocalCNNs
from .models import list_models
from .models.aggregators import (
    Aggregator,
    WeightedAggregator,
    aggregator_class,
    aggregator_options,
    create_aggregator,
    list_dnn_activations,
)
from .models.cnn_dnn import CNNDNN, load_pretrained_aggregator, load_pretrained_local_cnns
from .plots import plot_confusion, plot_curves
from .run_folder import check_resume, run_folder_lock, write_config, write_results
from .train.callbacks import Callback
from .train.checkpoint import atomic_write_text, check_metadata, ensure_writable_folder, load_checkpoint, save_checkpoint
from .train.engine import (
    EpochEnd,
    EvalResult,
    FitResult,
    Trainer,
    compute_dtype,
    evaluate,
    format_bytes,
    resolve_device,
    seed_everything,
)
from .train.metrics import ClassificationReport, classification_report

log = logging.getLogger("ddcnn")


@dataclass
class Experiment:
    """What every training mode needs: the configuration, the data, the device, the run folder and, in a
    distributed run, this process's place in it (``dist``)."""

    cfg: RunConfig
    data: DatasetSplits
    device: torch.device
    run_dir: Path
    dist: DistContext = field(default_factory=DistContext)
    callbacks: Sequence[Callback] = ()  # the events of every phase's training (ddcnn.train.callbacks)
    _parallel: dict[int, Parallel] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, data: DatasetSplits | None = None, dist: DistContext | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> Experiment:
        """Set up ``cfg``'s device (``dist``'s, in a distributed run) and run folder; load its dataset unless
        ``data`` (already loaded) is given."""
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        dist = dist or DistContext(device=resolve_device(cfg.train.device))
        run_dir = ensure_writable_folder(cfg.out)
        if data is None:
            with primary_first(dist):  # the other processes read what rank 0 decoded into the cache
                data = load_dataset(cfg.data)
        return cls(cfg, data, dist.device, run_dir, dist, tuple(callbacks))

    def parallel(self, decomposition: Decomposition) -> Parallel:
        """How the local CNNs of ``decomposition`` are spread over this run's processes (``cfg.train.parallel``)."""
        n = decomposition.num_subdomains
        if n not in self._parallel:
            self._parallel[n] = Parallel(self.dist, n, self.cfg.train.parallel)
        return self._parallel[n]

    def loader(
        self,
        split: str,
        train: bool = False,
        seed: int | None = None,
        drop_last: bool | None = None,
        parallel: Parallel | None = None,
    ):
        """Batches of ``split``; with ``parallel``, this process's share of each (training) batch."""
        data = self.data
        batch_size = self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size
        return make_loader(
            getattr(data, split),
            batch_size=parallel.batch_size(batch_size) if parallel else batch_size,
            train=train,
            cfg=self.cfg.data,
            mean=data.mean,
            std=data.std,
            device=self.device,
            seed=self.cfg.train.seed if seed is None else seed,
            shard=parallel.shard if parallel else (0, 1),
            drop_last=drop_last,
        )

    def decomposition(self, grid: tuple[int, ...] | None = None) -> Decomposition:
        """The decomposition of this data set's images by ``grid`` (default: the configured one)."""
        grid = self.cfg.model.grid if grid is None else grid
        if math.prod(grid) == 1:  # the global CNN, whatever the number of axes
            return Decomposition((1,) * self.data.spatial_dims, self.data.image_shape, 0)
        return Decomposition(grid, self.data.image_shape, self.cfg.model.overlap)

    def meta(self, kind: str, decomposition: Decomposition, **extra: Any) -> dict[str, Any]:
        """What a checkpoint must record to rebuild its model and preprocess new images."""
        m = self.cfg.model
        return {
            "kind": kind,
            "backbone": m.backbone,
            "width": m.width,
            "grid": list(decomposition.grid),
            "overlap": decomposition.overlap,
            "in_channels": self.data.in_channels,
            "num_classes": self.data.num_classes,
            "image_shape": list(self.data.image_shape),
            "class_names": list(self.data.class_names),
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "dataset": self.data.name,
            **extra,
        }

    def with_data(self, **splits: ImageSet) -> Experiment:
        """This experiment on other train/val/test images (same classes, statistics and run folder)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **splits))


@dataclass
class MethodResult:
    """One trained model's numbers, one row of a comparison.

    ``train_seconds`` is the time of this method's own phase; for methods built on pretrained local CNNs
    (aggregators, transfer) ``extra["total_train_seconds"]`` adds the phases they start from.
    """

    method: str
    grid: str
    test: ClassificationReport
    val_accuracy: float
    parameters: int
    train_seconds: float
    images_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, **more: Any) -> dict[str, Any]:
        return {
            "method": self.method,
            "grid": self.grid,
            "test_accuracy": self.test.accuracy,
            "test_balanced_accuracy": self.test.balanced_accuracy,
            "test_auc": self.test.auc,
            "val_accuracy": self.val_accuracy,
            "parameters": self.parameters,
            "train_seconds": self.train_seconds,
            "images_per_second": self.images_per_second,
            **self.extra,
            **more,
        }


def count_parameters(model: nn.Module) -> int:
    """The parameters of ``model`` (of the whole model, where it is one process's share)."""
    return sum_over_whole_model(model, lambda p: p.numel())


def _communication(model: nn.Module, model_parallel_bytes: int) -> dict[str, int]:
    """What training ``model`` communicates per step: ``model_parallel_bytes`` in model parallelism (at most one
    process per subdomain), and the parameters' bytes in data parallelism, the baseline (docs/distributed.md)."""
    return {
        "model_parallel_bytes_per_step": model_parallel_bytes,
        "data_parallel_bytes_per_step": data_parallel_bytes_per_step(model),
    }


def checkpoint_finished(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of a completed phase (its ``finished`` flag)."""
    return path.is_file() and bool(load_checkpoint(path).get("finished"))


# -- building and training models -------------------------------------------------------------------------------


def build_local_cnns(exp: Experiment, decomposition: Decomposition) -> LocalCNNs:
    m = exp.cfg.model
    local_cnns = LocalCNNs(m.backbone, decomposition, exp.data.in_channels, exp.data.num_classes, m.width)
    return local_cnns.to(exp.device, compute_dtype(exp.cfg.train))


def build_aggregator(exp: Experiment, name: str, decomposition: Decomposition) -> Aggregator:
    options = aggregator_options(name, exp.cfg.model)
    aggregator = create_aggregator(name, decomposition.num_subdomains, exp.data.num_classes, **options)
    return aggregator.to(exp.device, compute_dtype(exp.cfg.train))


def _aggregator_meta(exp: Experiment, name: str) -> dict[str, Any]:
    """The ``meta`` entries :func:`model_from_checkpoint` needs to rebuild :func:`build_aggregator`'s ``name``."""
    options = aggregator_options(name, exp.cfg.model)
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return {"aggregator": name, "aggregator_options": options}


def _fit(
    exp: Experiment, model: nn.Module, name: str, epochs: int, meta: dict[str, Any], parallel: Parallel,
    epoch_end: EpochEnd | None = None,
) -> FitResult:
    """Train ``model`` (this process's share, per ``parallel``) on the experiment's images with checkpoints
    ``<name>.pt`` and log ``<name>_log.csv``; ``epoch_end``: see :class:`~ddcnn.train.engine.Trainer`."""
    log.info("%s: %s parameters, %d epochs", name, f"{count_parameters(model):,}", epochs)
    if exp.dist.distributed:
        log.info("%s: %s", name, parallel)
    checkpoint = exp.run_dir / f"{name}.pt"
    trainer = Trainer(
        model,
        exp.cfg.train,
        exp.device,
        epochs,
        checkpoint=checkpoint,
        log_csv=exp.run_dir / f"{name}_log.csv",
        meta=meta,
        config=config_to_dict(exp.cfg),
        desc=name,
        save=exp.dist.is_primary,
        parallel=parallel,
        epoch_end=epoch_end,
        callbacks=exp.callbacks,
        check_resumed=lambda state: check_resume(state.get("config"), exp.cfg, name, checkpoint),
    )
    return trainer.fit(exp.loader("train", train=True, parallel=parallel), exp.loader("val"), resume=exp.cfg.resume)


def train_local_cnns(
    exp: Experiment, decomposition: Decomposition, epochs: int, name: str, epoch_end: EpochEnd | None = None
) -> tuple[LocalCNNs, FitResult]:
    """Train the local CNNs of ``decomposition`` (all at once; ``1x1`` is the global CNN), with checkpoints; in a
    distributed run, this process's share of them (see :meth:`Experiment.parallel`). ``epoch_end(trainer, row)`` is
    called after every epoch and can end training early (see :class:`~ddcnn.train.engine.Trainer`)."""
    seed_everything(exp.cfg.train.seed)
    parallel = exp.parallel(decomposition)
    model = parallel.local_cnns(build_local_cnns(exp, decomposition))
    log.info("%s: %s", name, decomposition)
    meta = exp.meta("local_cnns", decomposition, method=name)
    fit = _fit(exp, model, name, epochs, meta, parallel, epoch_end)
    return model, fit


def _local_epochs(exp: Experiment) -> int:
    return exp.cfg.local_epochs or exp.cfg.train.epochs


def _report(result: EvalResult) -> ClassificationReport:
    probs = result.probabilities
    if probs.dim() == 3:  # local CNNs: the report of their mean probability (per-subdomain numbers kept apart)
        probs = probs.mean(1)
    return classification_report(result.labels, probs, loss=result.loss)


def _log_subdomains(name: str, history: list[dict[str, Any]]) -> None:
    """Each epoch's per-subdomain accuracies (the Trainer's log line has only their mean)."""
    for row in history:
        if "train_subdomain_accuracy" in row:
            text = " ".join(f"{a:.3f}" for a in row["train_subdomain_accuracy"])
            val = " ".join(f"{a:.3f}" for a in row.get("val_subdomain_accuracy", []))
            log.info("%s epoch %d per subdomain: train %s | val %s", name, row["epoch"], text, val)


def run_global(exp: Experiment) -> MethodResult:
    """The baseline: the backbone trained on whole images."""
    decomposition = exp.decomposition((1,))
    model, fit = train_local_cnns(exp, decomposition, exp.cfg.train.epochs, "global")
    parallel = exp.parallel(decomposition)
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True, parallel=parallel)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device, parallel=parallel)
    return MethodResult(
        "global", "1x1", _report(test), val.accuracy, count_parameters(model), fit.train_seconds,
        fit.images_per_second, fit.history,
        # one CNN has no model parallelism: its processes are data parallel either way
        extra={"total_train_seconds": fit.train_seconds, **_communication(model, data_parallel_bytes_per_step(model))},
    )


def run_local(exp: Experiment) -> MethodResult:
    """The local phase: each local CNN trained on its subimages against the global label, all at once.

    The report is that of the local CNNs' mean probability; ``extra`` holds each local CNN's own train (last
    epoch), val and test accuracy, in subdomain order.
    """
    decomposition = exp.decomposition()
    model, fit = train_local_cnns(exp, decomposition, _local_epochs(exp), "local")
    _log_subdomains("local", fit.history)
    parallel = exp.parallel(decomposition)
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True, parallel=parallel)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device, parallel=parallel)
    return MethodResult(
        "local", format_grid(decomposition.grid), _report(test), val.accuracy, count_parameters(model),
        fit.train_seconds, fit.images_per_second, fit.history,
        extra={
            "total_train_seconds": fit.train_seconds,
            "train_subdomain_accuracy": fit.history[-1].get("train_subdomain_accuracy"),
            "val_subdomain_accuracy": val.subdomain_accuracy,
            "test_subdomain_accuracy": test.subdomain_accuracy,
            **_communication(model, 0),
        },
    )


# -- the aggregation phase --------------------------------------------------------------------------------------


def _checkpoint_in(source: str | Path, stem: str) -> Path:
    """``source`` itself if it is a file, else ``source/<stem>.pt``."""
    path = Path(source)
    if path.is_dir():
        path = path / f"{stem}.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{path.parent} holds no {stem}.pt; pass a run folder of that phase or its checkpoint"
            )
    return path


def local_phase_checkpoint(exp: Experiment, decomposition: Decomposition) -> Path:
    """The local phase's checkpoint: from ``cfg.pretrained``, or trained (resumed, with ``cfg.resume``) now."""
    if exp.cfg.pretrained:
        return _checkpoint_in(exp.cfg.pretrained, "local")
    train_local_cnns(exp, decomposition, _local_epochs(exp), "local")
    return exp.run_dir / "local.pt"


def pretrained_local_cnns(exp: Experiment, decomposition: Decomposition) -> tuple[LocalCNNs, dict[str, Any]]:
    """The pretrained local CNNs (frozen, in eval mode) and their checkpoint (its ``path`` added)."""
    path = local_phase_checkpoint(exp, decomposition)
    state = load_checkpoint(path, map_location=exp.device)
    if not state.get("finished"):
        log.warning("local CNNs of %s are from an unfinished local phase (epoch %s)", path, state.get("epoch"))
    local_cnns = load_pretrained_local_cnns(state, build_local_cnns(exp, decomposition), str(path))
    return local_cnns.eval().requires_grad_(False), state | {"path": str(path)}


def _subset(split: ImageSet, rows: torch.Tensor) -> ImageSet:
    images = split.images[rows] if isinstance(split.images, torch.Tensor) else split.images[rows.numpy()]
    return ImageSet(torch.as_tensor(images), split.labels[rows])


def _crossfit_probabilities(exp: Experiment, decomposition: Decomposition) -> LocalProbabilities:
    """Out-of-fold local probabilities of every training image: the training images are cut into k folds; for
    each fold, local CNNs trained on the other k-1 (checkpoint ``crossfit<j>.pt``, validated on the held-out fold)
    predict it."""
    k = exp.cfg.crossfit_folds
    train = exp.data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(exp.cfg.train.seed))
    folds = [fold.sort().values for fold in order.chunk(k)]
    probabilities = torch.empty(len(train), decomposition.num_subdomains, exp.data.num_classes)
    for j, held_out in enumerate(folds):
        kept = torch.cat([f for i, f in enumerate(folds) if i != j]).sort().values
        fold_exp = exp.with_data(train=_subset(train, kept), val=_subset(train, held_out))
        local_cnns, _ = train_local_cnns(fold_exp, decomposition, _local_epochs(exp), f"crossfit{j}")
        fold = local_probabilities(
            local_cnns, fold_exp.loader("val"), exp.cfg.train, exp.device, fold_exp.parallel(decomposition)
        )
        probabilities[held_out] = fold.probabilities
    return LocalProbabilities(probabilities, train.labels.clone())


def aggregator_training_inputs(
    exp: Experiment, local_cnns: LocalCNNs, decomposition: Decomposition
) -> LocalProbabilities:
    """The local probabilities a trained aggregator learns from, per ``cfg.aggregator_inputs``:

    ``train``: the frozen local CNNs on the (unaugmented) training images, as in the papers; ``crossfit``:
    out-of-fold probabilities (:func:`_crossfit_probabilities`: k more local phases, each on k-1 folds); ``val``:
    the local CNNs on the validation split; ``augmented``: ``cfg.augmented_passes`` passes over the training
    images with the training augmentation of ``cfg.data`` (so, without augmentation, the ``train`` inputs repeated).
    """
    mode, cfg, parallel = exp.cfg.aggregator_inputs, exp.cfg.train, exp.parallel(decomposition)
    if mode == "train":
        return local_probabilities(local_cnns, exp.loader("train"), cfg, exp.device, parallel)
    if mode == "val":
        return local_probabilities(local_cnns, exp.loader("val"), cfg, exp.device, parallel)
    if mode == "augmented":
        loader = exp.loader("train", train=True, drop_last=False)
        passes = []
        for p in range(exp.cfg.augmented_passes):
            loader.set_epoch(p)
            passes.append(local_probabilities(local_cnns, loader, cfg, exp.device, parallel))
        return LocalProbabilities.cat(passes)
    return _crossfit_probabilities(exp, decomposition)


class _LocalInputs:
    """The frozen local CNNs' probabilities on each split an aggregation phase needs, each computed once, with the
    seconds it took (part of the training time of the aggregators that need it). In a distributed run each process
    computes its share of the local CNNs and the probabilities are gathered."""

    def __init__(self, exp: Experiment, local_cnns: LocalCNNs, decomposition: Decomposition):
        self.exp, self.decomposition = exp, decomposition
        self.parallel = exp.parallel(decomposition)
        self.local_cnns = self.parallel.local_cnns(local_cnns)
        self._cache: dict[str, tuple[LocalProbabilities, float]] = {}

    def get(self, split: str) -> tuple[LocalProbabilities, float]:
        """``split``: val, test, or train (the trained aggregators' inputs, see :func:`aggregator_training_inputs`)."""
        if split not in self._cache:
            start, sent = time.perf_counter(), self.parallel.communication.total
            if split == "train":
                data = aggregator_training_inputs(self.exp, self.local_cnns, self.decomposition)
            else:
                data = local_probabilities(
                    self.local_cnns, self.exp.loader(split), self.exp.cfg.train, self.exp.device, self.parallel
                )
            self._cache[split] = data, time.perf_counter() - start
            if self.exp.dist.distributed:
                sent = self.parallel.communication.total - sent
                log.info("aggregation inputs (%s): local probabilities of %d images gathered, sent %s (%s/image)",
                         split, len(data), format_bytes(sent), format_bytes(sent / max(len(data), 1)))
        return self._cache[split]


def aggregation_phase(exp: Experiment, aggregators: Sequence[str] | None = None) -> list[MethodResult]:
    """Fit or train each aggregator (default: the configured one) on the frozen local CNNs' probabilities.

    The local CNNs run once per split for all aggregators. Each aggregator's CNN-DNN is saved as
    ``<aggregator>.pt`` (a ``cnn_dnn`` checkpoint loadable by :func:`model_from_checkpoint`); with
    ``cfg.resume`` a finished one is loaded instead of fitted again.
    """
    decomposition = exp.decomposition()
    local_cnns, local_state = pretrained_local_cnns(exp, decomposition)
    inputs = _LocalInputs(exp, local_cnns, decomposition)
    results = []
    for name in aggregators or [exp.cfg.model.aggregator]:
        path = exp.run_dir / f"{name}.pt"
        if exp.cfg.resume and checkpoint_finished(path):
            aggregator = build_aggregator(exp, name, decomposition)
            state = load_checkpoint(path, map_location=exp.device)
            check_resume(state.get("config"), exp.cfg, name, path)
            load_pretrained_aggregator(state, aggregator, str(path))
            fit = AggregatorFit(state["history"], float(state["train_seconds"]), float(state["images_per_second"]))
            log.info("%s: finished in %s, not fitted again", name, path)
        else:
            aggregator, fit = _fit_aggregator(exp, name, inputs)
            meta = exp.meta("cnn_dnn", decomposition, method=name, local_checkpoint=local_state["path"],
                            **_aggregator_meta(exp, name))
            local_seconds = float(local_state.get("train_seconds", 0.0))
            if exp.dist.is_primary:
                save_checkpoint(
                    {
                        "model": CNNDNN(local_cnns, aggregator).state_dict(),
                        "meta": meta,
                        "config": config_to_dict(exp.cfg),
                        "history": fit.history,
                        "epoch": len(fit.history),
                        "train_seconds": fit.seconds,
                        "total_train_seconds": local_seconds + fit.seconds,
                        "images_per_second": fit.images_per_second,
                        "finished": True,
                    },
                    path,
                )
            exp.dist.barrier()  # the checkpoint is there for every process to read
        results.append(_aggregator_result(exp, aggregator, local_cnns, inputs, fit, local_state))
        log.info("%s %s test: %s", name, results[-1].grid, results[-1].test.summary())
    return results


def _fit_aggregator(exp: Experiment, name: str, inputs: _LocalInputs) -> tuple[Aggregator, AggregatorFit]:
    """Build aggregator ``name`` and fit or train it; the fit's ``seconds`` include computing the inputs it needs
    beyond the local phase (the training inputs of a trained one, the validation probabilities of a fitted one)."""
    seed_everything(exp.cfg.train.seed)
    aggregator = build_aggregator(exp, name, inputs.decomposition)
    val, val_seconds = inputs.get("val")
    train, train_seconds = inputs.get("train") if aggregator.trainable else (None, 0.0)
    fit = fit_aggregator(
        aggregator, train, val, exp.cfg.train, exp.device, epochs=exp.cfg.dnn_epochs or exp.cfg.train.epochs,
        batch_size=exp.cfg.data.batch_size,
        log_csv=exp.run_dir / f"{aggregator.name}_log.csv" if aggregator.trainable else None,
        save=exp.dist.is_primary,
        callbacks=exp.callbacks,
    )
    fit.seconds += train_seconds if aggregator.trainable else val_seconds if aggregator.fitted else 0.0
    return aggregator, fit


def _aggregator_result(
    exp: Experiment, aggregator: Aggregator, local_cnns: LocalCNNs, inputs: _LocalInputs, fit: AggregatorFit,
    local_state: dict[str, Any],
) -> MethodResult:
    batch, cfg = exp.cfg.data.eval_batch_size, exp.cfg.train
    test = evaluate(aggregator, TensorLoader.of(inputs.get("test")[0], batch, device=exp.device), cfg, exp.device,
                    collect=True)
    val = evaluate(aggregator, TensorLoader.of(inputs.get("val")[0], batch, device=exp.device), cfg, exp.device)
    local_seconds = float(local_state.get("train_seconds", 0.0))
    extra: dict[str, Any] = {
        "aggregator_parameters": count_parameters(aggregator),
        "local_train_seconds": local_seconds,
        "total_train_seconds": local_seconds + fit.seconds,
        **_communication(aggregator, 0),  # its inputs are gathered once (N*K numbers per image), not per step
    }
    if aggregator.trainable:
        extra["aggregator_inputs"] = exp.cfg.aggregator_inputs
    if isinstance(aggregator, WeightedAggregator):
        extra["subdomain_weights"] = aggregator.weights.tolist()
    return MethodResult(
        aggregator.name, format_grid(local_cnns.decomposition.grid), _report(test), val.accuracy,
        count_parameters(local_cnns) + extra["aggregator_parameters"], fit.seconds, fit.images_per_second,
        fit.history, extra,
    )


def run_cnn_dnn(exp: Experiment) -> MethodResult:
    """The aggregation phase of the configured aggregator (``cfg.model.aggregator``)."""
    return aggregation_phase(exp, [exp.cfg.model.aggregator])[0]


# -- end-to-end CNN-DNN training --------------------------------------------------------------------------------


def _train_cnn_dnn(exp: Experiment, model: CNNDNN, name: str, pretraining_seconds: float = 0.0) -> MethodResult:
    """Train the whole ``model`` end to end (loss on its output only) and report it, with its local CNNs'
    own test accuracies in ``extra``."""
    decomposition = model.local_cnns.decomposition
    parallel = exp.parallel(decomposition)
    meta = exp.meta("cnn_dnn", decomposition, method=name, **_aggregator_meta(exp, model.aggregator.name))
    fit = _fit(exp, model, name, exp.cfg.train.epochs, meta, parallel)
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True, parallel=parallel)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device, parallel=parallel)
    local_test = evaluate(model.local_cnns, exp.loader("test"), exp.cfg.train, exp.device, parallel=parallel)
    return MethodResult(
        name, format_grid(decomposition.grid), _report(test), val.accuracy, count_parameters(model),
        fit.train_seconds, fit.images_per_second, fit.history,
        extra={
            "aggregator_parameters": count_parameters(model.aggregator),
            "local_train_seconds": pretraining_seconds,
            "total_train_seconds": pretraining_seconds + fit.train_seconds,
            "test_subdomain_accuracy": local_test.subdomain_accuracy,
            **_communication(model, subdomain_gather_bytes_per_step(
                exp.cfg.data.batch_size, decomposition.num_subdomains, exp.data.num_classes,
                compute_dtype(exp.cfg.train).itemsize,
            )),
        },
    )


def run_coherent(exp: Experiment) -> MethodResult:
    """The coherent CNN-DNN: local CNNs and aggregator trained together from random initialisation."""
    decomposition = exp.decomposition()
    seed_everything(exp.cfg.train.seed)
    local_cnns = build_local_cnns(exp, decomposition)
    model = _cnn_dnn(exp, local_cnns, build_aggregator(exp, exp.cfg.model.aggregator, decomposition))
    return _train_cnn_dnn(exp, model, "coherent")


def _cnn_dnn(exp: Experiment, local_cnns: LocalCNNs, aggregator: Aggregator) -> CNNDNN:
    """The CNN-DNN of ``local_cnns`` (all subdomains) and ``aggregator`` as this process trains it: in a distributed
    run, its share of the local CNNs, their probabilities gathered from all processes."""
    parallel = exp.parallel(local_cnns.decomposition)
    return CNNDNN(parallel.local_cnns(local_cnns), aggregator, gather=parallel.subdomain_gather())


def _aggregation_checkpoint(exp: Experiment, name: str) -> Path:
    """Aggregator ``name``'s CNN-DNN checkpoint: next to ``cfg.pretrained``, or fitted in the run folder now."""
    if exp.cfg.pretrained:
        folder = Path(exp.cfg.pretrained)
        return _checkpoint_in(folder.parent if folder.is_file() else folder, name)
    path = exp.run_dir / f"{name}.pt"
    aggregation_phase(exp, [name])  # with cfg.resume, a finished one is kept
    return path


def run_transfer(exp: Experiment) -> MethodResult:
    """Transfer learning: the coherent CNN-DNN initialised with the pretrained local CNNs (and, with
    ``cfg.transfer_aggregator``, the aggregation phase's aggregator), then trained end to end."""
    decomposition = exp.decomposition()
    name = exp.cfg.model.aggregator
    if exp.cfg.transfer_aggregator:
        source = _aggregation_checkpoint(exp, name)
    else:
        source = local_phase_checkpoint(exp, decomposition)
    state = load_checkpoint(source, map_location=exp.device) | {"path": str(source)}
    seed_everything(exp.cfg.train.seed)
    pretrained = CNNDNN.from_pretrained(
        state, build_local_cnns(exp, decomposition), build_aggregator(exp, name, decomposition),
        with_aggregator=exp.cfg.transfer_aggregator,
    )
    model = _cnn_dnn(exp, pretrained.local_cnns, pretrained.aggregator)
    log.info("transfer: initialised from %s", source)
    pretraining = float(state.get("total_train_seconds", state.get("train_seconds", 0.0)))
    return _train_cnn_dnn(exp, model, "transfer", pretraining_seconds=pretraining)


METHODS: dict[str, Callable[[Experiment], MethodResult]] = {
    "global": run_global,
    "local": run_local,
    "cnn_dnn": run_cnn_dnn,
    "coherent": run_coherent,
    "transfer": run_transfer,
}


def list_methods() -> list[str]:
    return list(METHODS)


def check_names(cfg: RunConfig | Any, aggregators: Sequence[str] = ()) -> None:
    """Every name ``cfg`` (a RunConfig or CompareConfig) gives is a registered one: dataset, backbone, aggregators
    and DNN activation, checked before any data loads or model trains."""
    dataset, _ = parse_spec(cfg.data.dataset)
    if dataset not in list_datasets():
        raise UnknownNameError("dataset", dataset, list_datasets())
    if cfg.model.backbone not in list_models():
        raise UnknownNameError("backbone", cfg.model.backbone, list_models())
    for name in (cfg.model.aggregator, *aggregators):
        aggregator_class(name)
    if cfg.model.dnn_activation not in list_dnn_activations():
        raise UnknownNameError("DNN activation", cfg.model.dnn_activation, list_dnn_activations())


def run(cfg: RunConfig, dist: DistContext | None = None, callbacks: Sequence[Callback] = ()) -> MethodResult:
    """Train ``cfg.method`` and write config, results, confusion matrix and curves to ``cfg.out``; in a
    distributed run (``dist``), every process calls this and rank 0 writes. ``callbacks``: see
    :mod:`ddcnn.train.callbacks`. The run folder is this run's alone while it runs, and ``cfg.resume`` refuses a
    configuration that differs from the checkpoints' (:mod:`ddcnn.run_folder`)."""
    if cfg.method not in METHODS:
        raise UnknownNameError("method", cfg.method, METHODS)
    check_names(cfg)
    primary = dist is None or dist.is_primary
    with run_folder_lock(cfg.out) if primary else contextlib.nullcontext():
        if cfg.resume:
            check_resume_folder(cfg)
        exp = Experiment.from_config(cfg, dist=dist, callbacks=callbacks)
        if exp.dist.is_primary:
            write_config(cfg, exp.run_dir)
        result = METHODS[cfg.method](exp)
        if exp.dist.is_primary:
            write_result(exp, result)
    return result


def _phases_resumed(cfg: RunConfig) -> list[str]:
    """The phases whose checkpoints in the run folder ``cfg.method`` resumes (or loads, when finished)."""
    own = cfg.model.aggregator if cfg.method == "cnn_dnn" else cfg.method
    builds_on_local = cfg.method in ("cnn_dnn", "transfer") and not cfg.pretrained
    return [own, "local"] if builds_on_local else [own]


def check_resume_folder(cfg: RunConfig) -> None:
    """Before anything is written: refuse ``cfg.resume`` if a checkpoint it would continue was trained with a
    configuration that differs from ``cfg`` (see :func:`ddcnn.run_folder.check_resume`)."""
    for phase in _phases_resumed(cfg):
        path = Path(cfg.out) / f"{phase}.pt"
        if path.is_file():
            check_resume(load_checkpoint(path).get("config"), cfg, phase, path)


def write_result(exp: Experiment, result: MethodResult) -> None:
    """The method's row in ``results.json`` (kept with the rows of the folder's other phases), its confusion
    matrix PNG and its training curves PNG."""
    run_dir = exp.run_dir
    dataset = {"name": exp.data.name, "classes": exp.data.class_names, "image_shape": list(exp.data.image_shape)}
    row = result.row(per_class_accuracy=result.test.per_class_accuracy, confusion=result.test.confusion)
    write_results(run_dir, row, config_to_dict(exp.cfg), result.history, dataset)
    title = f"{result.method} {result.grid}: test accuracy {result.test.accuracy:.4f}"
    plot_confusion(result.test.confusion, exp.data.class_names, run_dir / f"confusion_{result.method}.png", title)
    if result.history:
        plot_curves({result.method: result.history}, run_dir / f"curves_{result.method}.png")
    log.info("%s %s test: %s", result.method, result.grid, result.test.summary())


# -- checkpoints back to models ---------------------------------------------------------------------------------


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint was written from (its ``meta``) and load its weights: local CNNs (``kind``
    ``local_cnns``, the global CNN included) or a CNN-DNN (``cnn_dnn``)."""
    meta = state["meta"]
    decomposition = Decomposition(tuple(meta["grid"]), tuple(meta["image_shape"]), meta["overlap"])
    model: nn.Module = LocalCNNs(
        meta["backbone"], decomposition, meta["in_channels"], meta["num_classes"], meta["width"]
    )
    if meta["kind"] == "cnn_dnn":
        aggregator = create_aggregator(
            meta["aggregator"], decomposition.num_subdomains, meta["num_classes"], **meta.get("aggregator_options", {})
        )
        model = CNNDNN(model, aggregator)
    elif meta["kind"] != "local_cnns":
        raise CheckpointError(f"checkpoint holds a {meta['kind']!r} model, which ddcnn cannot rebuild; pass a model "
                              "checkpoint (global.pt, local.pt, dnn.pt, coherent.pt, ...)")
    model.load_state_dict(state["model"])
    return model


def evaluate_checkpoint(
    path: str | Path, dataset: str | None = None, split: str = "test", device: str = "auto"
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``split`` of its own dataset (or ``dataset``); writes JSON and a confusion PNG
    next to the checkpoint and returns the report as a dict."""
    path = Path(path)
    state = load_checkpoint(path, require=("meta", "config"))
    cfg = config_from_dict(RunConfig, state["config"])
    if dataset:
        cfg.data.dataset = dataset
    cfg.train.device = device
    cfg.out = str(path.parent)
    exp = Experiment.from_config(cfg)
    meta = state["meta"]
    check_metadata(
        state,
        {
            "num_classes": exp.data.num_classes,
            "image_shape": list(exp.data.image_shape),
            "in_channels": exp.data.in_channels,
        },
        path,
    )
    model = model_from_checkpoint(state).to(exp.device)
    result = evaluate(model, exp.loader(split), cfg.train, exp.device, collect=True)
    report = _report(result)
    out = {
        "checkpoint": str(path),
        "method": meta.get("method", meta["kind"]),
        "grid": format_grid(tuple(meta["grid"])),
        "dataset": exp.data.name,
        "split": split,
        "images": len(result.labels),
        **dataclasses.asdict(report),
    }
    if isinstance(model, CNNDNN):  # each local CNN's own accuracy inside the CNN-DNN
        result = evaluate(model.local_cnns, exp.loader(split), cfg.train, exp.device)
    if result.subdomain_accuracy is not None and len(result.subdomain_accuracy) > 1:
        out["subdomain_accuracy"] = result.subdomain_accuracy
    stem = f"evaluation_{path.stem}_{split}"
    atomic_write_text(path.parent / f"{stem}.json", json.dumps(out, indent=2))
    title = f"{out['method']} {out['grid']} on {split}: accuracy {report.accuracy:.4f}"
    plot_confusion(report.confusion, exp.data.class_names, path.parent / f"{stem}_confusion.png", title)
    return out
