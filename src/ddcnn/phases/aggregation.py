"""The aggregation phase: the frozen local CNNs' probabilities in, a fitted or trained aggregator out.

The local CNNs run once over each split an aggregator needs (:class:`~ddcnn.phases.local_outputs.LocalInputs`), in
inference mode (and on the CPU in cache-sized chunks, :mod:`~ddcnn.phases.local_outputs`); what they produce,
``(n, N, K)`` probabilities (and logits or pooled features ``(n, N, D)``, for aggregators that read them:
``cfg.model.local_output``, or the input a method ``dnn:features`` names), is small, so it stays in memory and an
aggregator trains on it with the same :class:`~ddcnn.train.engine.Trainer` as every other model, fed by a
:class:`TensorLoader`. What a trained aggregator learns from is ``cfg.aggregator_inputs`` (which images,
:func:`aggregator_training_inputs`); how it trains is :func:`aggregator_train_config`: AdamW on batches of
``cfg.aggregator_batch_size`` (512): the local CNNs' SGD at their batch of 64 spent 8 us per probability vector
and epoch, mostly on per-step overhead, this 3.8 us, at the same test accuracy (the dnn on CIFAR-10, 2x2 and 4x4,
benchmarks/README.md).

Its cost is the inference pass of the local CNNs over the training images (a third of a training epoch's
arithmetic, inherent to the method: the local CNNs are frozen once the local phase ends) and the aggregator's
epochs, each a fraction of a percent of a local epoch (``benchmarks/bench_overheads.py`` measures both).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import RunConfig, TrainConfig, config_to_dict, format_grid
from ..config.options import method_file_stem
from ..data.sampling import epoch_order
from ..models import LocalCNNs
from ..models.aggregators import Aggregator
from ..models.closed_form import WeightedAggregator
from ..models.cnn_dnn import CNNDNN, load_pretrained_aggregator
from ..run_folder import check_resume
from ..runtime import seed_everything
from ..train.callbacks import Callback
from ..train.engine import FitResult, Trainer
from ..train.evaluation import evaluate, training_class_weights
from .context import (
    Experiment,
    MethodResult,
    build_aggregator,
    checkpoint_finished,
    communication_per_step,
    count_parameters,
    method_report,
)
from .local import pretrained_local_cnns
from .local_outputs import (  # noqa: F401 (_Chunks, local_probabilities, aggregator_training_inputs: reached here)
    LocalInputs,
    LocalProbabilities,
    _Chunks,
    aggregator_training_inputs,
    kept_for,
    local_probabilities,
)

log = logging.getLogger(__name__)


class TensorLoader:
    """Batches ``(x[rows], y[rows])`` of in-memory tensors, the loader interface :class:`Trainer` expects.

    With ``shuffle``, each epoch's order is a permutation drawn from ``(seed, epoch)`` only (call
    :meth:`set_epoch`), so a resumed run sees the same batches; the last partial batch is then dropped (a batch
    of one would break batch norm); ``sampler`` balanced draws it class-balanced instead (:mod:`ddcnn.data.sampling`).
    Without ``shuffle``, every row in order.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        sampler: str = "uniform",
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x.to(device), y.to(device)
        self.sampler, self._labels = sampler, y.cpu()
        self.batch_size, self.shuffle, self.seed, self.epoch = max(1, batch_size), shuffle, seed, 0
        if shuffle and len(y) > self.batch_size:
            self.num_samples = len(y) // self.batch_size * self.batch_size
        else:
            self.num_samples = len(y)

    @classmethod
    def of(
        cls, data: LocalProbabilities, batch_size: int, local_output: str = "probabilities", **kwargs
    ) -> TensorLoader:
        """Batches of what an aggregator with ``local_output`` reads, with the labels."""
        return cls(data.inputs(local_output), data.labels, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
            order = epoch_order(self._labels, torch.Generator().manual_seed(int(seed)), self.sampler)
        else:
            order = torch.arange(len(self.y))
        for rows in order[: self.num_samples].to(self.x.device).split(self.batch_size):
            yield self.x.index_select(0, rows), self.y.index_select(0, rows)  # a row copy, faster than x[rows]


def aggregator_train_config(cfg: RunConfig, aggregator: Aggregator) -> TrainConfig:
    """How a trained aggregator trains in the aggregation phase: AdamW at ``cfg.aggregator_lr`` (unset: the
    aggregator's :attr:`~ddcnn.models.aggregators.Aggregator.default_lr`); the schedule, warm-up, weight decay,
    label smoothing, clipping, seed, dtype and device are the run's (``cfg.train``).

    Why not the run's optimiser: at the large batches that make this phase cheap (``cfg.aggregator_batch_size``),
    SGD at the learning rate scaled with the batch (0.8 at 1024) underfitted the dnn of a 4x4 grid (1% lower CIFAR-10
    test accuracy than at batch 64), AdamW at 0.01 did not; the linear aggregator needs 0.1 (its own default).
    """
    return dataclasses.replace(cfg.train, optimizer="adamw", lr=cfg.aggregator_lr or aggregator.default_lr)


@dataclass
class AggregatorFit:
    """What fitting or training an aggregator produced. ``seconds``: all of it, which in the aggregation phase
    includes ``input_seconds``, computing the local probabilities it learns from (the inference pass)."""

    history: list[dict]
    seconds: float
    images_per_second: float  # probability vectors per second during fitting/training
    input_seconds: float = 0.0


def fit_aggregator(
    aggregator: Aggregator,
    train: LocalProbabilities | None,
    val: LocalProbabilities,
    cfg: TrainConfig,
    device: torch.device,
    *,
    epochs: int,
    batch_size: int,
    log_csv: Path | None = None,
    save: bool = True,
    callbacks: Sequence[Callback] = (),
    desc: str | None = None,
) -> AggregatorFit:
    """Fit ``aggregator``: if trainable, the Trainer on ``train`` for ``epochs`` with ``val`` for the per-epoch
    validation numbers; else its closed-form ``fit`` on ``val`` (if it has one). ``save``: False on the processes
    of a distributed run other than rank 0, which fit the same aggregator on the same numbers but write nothing.
    ``desc`` names it in the progress bar (default: its name)."""
    aggregator.to(device)
    if not (aggregator.trainable or aggregator.fitted):  # nothing to learn (mean, logmean, vote)
        return AggregatorFit([], 0.0, 0.0)
    if not aggregator.trainable:
        start = time.perf_counter()
        aggregator.fit(val.probabilities.to(device), val.labels.to(device))
        seconds = time.perf_counter() - start
        return AggregatorFit([], seconds, len(val) / max(seconds, 1e-9))
    if train is None:
        raise ValueError(f"the {aggregator.name} aggregator is trained and needs training inputs")
    reads = aggregator.local_output  # the local probabilities, logits or features
    trainer = Trainer(
        aggregator, cfg, device, epochs, log_csv=log_csv, desc=desc or aggregator.name, save=save, callbacks=callbacks,
        class_weights=training_class_weights(cfg, train.labels, train.probabilities.shape[-1]),
    )
    fit: FitResult = trainer.fit(
        TensorLoader.of(train, batch_size, reads, shuffle=True, seed=cfg.seed, device=device, sampler=cfg.sampler),
        TensorLoader.of(val, batch_size, reads, device=device),
    )
    return AggregatorFit(fit.history, fit.train_seconds, fit.images_per_second)


def aggregation_phase(exp: Experiment, aggregators: Sequence[str] | None = None) -> list[MethodResult]:
    """Fit or train each aggregator (default: the configured one) on the frozen local CNNs' probabilities.

    An aggregator is named as a method: ``dnn`` (it reads ``--local-output``), or a trained one with its input,
    ``dnn:logits`` (:func:`~ddcnn.models.aggregators.check_aggregator_input`). The local CNNs run once per split for
    all aggregators, keeping every output one of them reads. Each aggregator's CNN-DNN is saved as
    ``<method>.pt`` (``dnn-logits.pt`` for ``dnn:logits``: :func:`~ddcnn.config.options.method_file_stem`; a
    ``cnn_dnn`` checkpoint loadable by :func:`model_from_checkpoint`); with ``cfg.resume`` a finished one is loaded
    instead of fitted again.
    """
    decomposition = exp.decomposition()
    names = list(aggregators or [exp.cfg.model.aggregator])
    kept = kept_for(exp, decomposition, names)  # before the local phase: refuses a --feature-dim above C
    local_cnns, local_state = pretrained_local_cnns(exp, decomposition)
    inputs = LocalInputs(exp, local_cnns, decomposition, kept)
    results = []
    for name in names:
        path = exp.run_dir / f"{method_file_stem(name)}.pt"
        if exp.cfg.resume and checkpoint_finished(path):
            aggregator = build_aggregator(exp, name, decomposition)
            state = load_checkpoint(path, map_location=exp.device)
            check_resume(state.get("config"), exp.cfg, name, path)
            load_pretrained_aggregator(state, aggregator, str(path))
            fit = AggregatorFit(
                state["history"], float(state["train_seconds"]), float(state["images_per_second"]),
                float(state.get("input_seconds", 0.0)),
            )
            log.info("%s: finished in %s, not fitted again", name, path)
        else:
            aggregator, fit = _fit_aggregator(exp, name, inputs)
            spec = exp.spec("cnn_dnn", decomposition, name, method=name, local_checkpoint=local_state["path"])
            spec = dataclasses.replace(spec, aggregator=aggregator.name)  # dnn:logits: a dnn, reading logits
            local_seconds = float(local_state.get("train_seconds", 0.0))
            if exp.dist.is_primary:
                save_checkpoint(
                    {
                        "model": CNNDNN(local_cnns, aggregator).state_dict(),
                        "spec": spec.to_dict(),
                        "config": config_to_dict(exp.cfg),
                        "history": fit.history,
                        "epoch": len(fit.history),
                        "train_seconds": fit.seconds,
                        "input_seconds": fit.input_seconds,
                        "total_train_seconds": local_seconds + fit.seconds,
                        "images_per_second": fit.images_per_second,
                        "finished": True,
                    },
                    path,
                )
            exp.dist.barrier()  # the checkpoint is there for every process to read
        results.append(_aggregator_result(exp, name, aggregator, local_cnns, inputs, fit, local_state))
        log.info("%s %s test: %s", name, results[-1].grid, results[-1].test.summary())
    return results


def _fit_aggregator(exp: Experiment, name: str, inputs: LocalInputs) -> tuple[Aggregator, AggregatorFit]:
    """Build aggregator ``name`` and fit or train it; the fit's ``seconds`` include computing the inputs it needs
    beyond the local phase (the training inputs of a trained one, the validation probabilities of a fitted one)."""
    seed_everything(exp.cfg.train.seed)
    aggregator = build_aggregator(exp, name, inputs.decomposition)
    val, val_seconds = inputs.get("val")
    train, train_seconds = inputs.get("train") if aggregator.trainable else (None, 0.0)
    fit = fit_aggregator(
        aggregator, train, val, aggregator_train_config(exp.cfg, aggregator), exp.device,
        epochs=exp.cfg.aggregator_epochs or exp.cfg.train.epochs, batch_size=exp.cfg.aggregator_batch_size,
        log_csv=exp.run_dir / f"{method_file_stem(name)}_log.csv" if aggregator.trainable else None,
        save=exp.dist.is_primary,
        callbacks=exp.callbacks,
        desc=name,
    )
    fit.input_seconds = train_seconds if aggregator.trainable else val_seconds if aggregator.fitted else 0.0
    fit.seconds += fit.input_seconds
    return aggregator, fit


def _aggregator_result(
    exp: Experiment, name: str, aggregator: Aggregator, local_cnns: LocalCNNs, inputs: LocalInputs,
    fit: AggregatorFit, local_state: dict[str, Any],
) -> MethodResult:
    batch, cfg, reads = exp.cfg.data.eval_batch_size, exp.cfg.train, aggregator.local_output
    test = evaluate(aggregator, TensorLoader.of(inputs.get("test")[0], batch, reads, device=exp.device), cfg,
                    exp.device, collect=True)
    val = evaluate(aggregator, TensorLoader.of(inputs.get("val")[0], batch, reads, device=exp.device), cfg, exp.device)
    local_seconds = float(local_state.get("train_seconds", 0.0))
    extra: dict[str, Any] = {
        "aggregator_parameters": count_parameters(aggregator),
        "local_train_seconds": local_seconds,
        "total_train_seconds": local_seconds + fit.seconds,
        "input_seconds": fit.input_seconds,  # of train_seconds: the local probabilities it learns from
        **communication_per_step(aggregator, 0),  # its inputs are gathered once (N*K numbers per image), not per step
    }
    if aggregator.trainable:
        extra["aggregator_inputs"], extra["local_output"] = exp.cfg.aggregator_inputs, reads
        if reads == "features":
            extra["feature_dim"] = aggregator.input_dim
    if isinstance(aggregator, WeightedAggregator):
        extra["subdomain_weights"] = aggregator.weights.tolist()
    return MethodResult(
        name, format_grid(local_cnns.decomposition.grid), method_report(test), val.accuracy,
        count_parameters(local_cnns) + extra["aggregator_parameters"], fit.seconds, fit.images_per_second,
        fit.history, extra,
    )


def run_aggregation(exp: Experiment) -> MethodResult:
    """The aggregation phase of the configured aggregator (``cfg.model.aggregator``)."""
    return aggregation_phase(exp, [exp.cfg.model.aggregator])[0]
