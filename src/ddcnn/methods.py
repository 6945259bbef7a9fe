"""The training modes of the method (see docs/method.md), each a function of an :class:`Experiment`.

================  =============================================================================================
method            what is trained
================  =============================================================================================
``global``        the backbone on whole images (a ``1x1`` grid): the baseline
``local``         the local phase: all local CNNs of a grid at once, each against the global label
``aggregation``   the aggregation phase: the configured aggregator on the frozen local CNNs' probabilities
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
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .config import RunConfig, config_to_dict, inapplicable_options
from .data import list_datasets
from .data.registry import parse_spec
from .distributed import DistContext
from .errors import UnknownNameError
from .models.aggregators import aggregator_class, check_aggregator_input, list_dnn_activations
from .models.factory import check_backbone
from .models.pretrained import pin_init_weights
from .phases import (
    Experiment,
    MethodResult,
    run_aggregation,
    run_coherent,
    run_global,
    run_local,
    run_transfer,
)
from .plots import plot_confusion, plot_curves
from .run_folder import check_resume, run_folder_lock, write_config, write_results
from .train.callbacks import Callback

log = logging.getLogger(__name__)


METHODS: dict[str, Callable[[Experiment], MethodResult]] = {
    "global": run_global,
    "local": run_local,
    "aggregation": run_aggregation,
    "coherent": run_coherent,
    "transfer": run_transfer,
}


def list_methods() -> list[str]:
    return list(METHODS)


def check_names(cfg: RunConfig | Any, aggregators: Sequence[str] = ()) -> None:
    """Every name ``cfg`` (a RunConfig or CompareConfig) gives is a registered one: dataset, backbone (or an importable
    factory that takes the widths asked for), aggregators and DNN activation, checked before any data loads or model
    trains."""
    dataset, _ = parse_spec(cfg.data.dataset)
    if dataset not in list_datasets():
        raise UnknownNameError("dataset", dataset, list_datasets())
    check_backbone(cfg.model.backbone, (cfg.model.width, cfg.model.local_width))
    aggregator_class(cfg.model.aggregator)
    for name in aggregators:  # methods of ddcnn compare: dnn, or a trained aggregator with its input, dnn:logits
        check_aggregator_input(name)
    if cfg.model.dnn_activation not in list_dnn_activations():
        raise UnknownNameError("DNN activation", cfg.model.dnn_activation, list_dnn_activations())


def check_run_config(cfg: RunConfig) -> list[str]:
    """Check ``cfg`` before any work (names, and options that contradict each other, on every process); return the
    one-line warnings about options that have no effect for its method and data."""
    if cfg.method not in METHODS:
        raise UnknownNameError("method", cfg.method, METHODS)
    check_names(cfg)
    return inapplicable_options(cfg)


def run(cfg: RunConfig, dist: DistContext | None = None, callbacks: Sequence[Callback] = ()) -> MethodResult:
    """Train ``cfg.method`` and write config, results, confusion matrix and curves to ``cfg.out``; in a
    distributed run (``dist``), every process calls this and rank 0 writes. ``callbacks``: see
    :mod:`ddcnn.train.callbacks`. The run folder is this run's alone while it runs, and ``cfg.resume`` refuses a
    configuration that differs from the checkpoints' (:mod:`ddcnn.run_folder`), a changed ``--init-weights`` file
    included (its sha256 is part of the configuration)."""
    primary = dist is None or dist.is_primary
    for message in check_run_config(cfg):
        if primary:
            log.warning("warning: %s", message)
    cfg = pin_init_weights(cfg)
    with run_folder_lock(cfg.out) if primary else contextlib.nullcontext():
        if cfg.resume:
            check_resume_folder(cfg)
        exp = Experiment.from_config(cfg, dist=dist, callbacks=callbacks)
        if cfg.method in ("aggregation", "coherent", "transfer"):  # before anything trains: --feature-dim at most C
            exp.aggregator_options(cfg.model.aggregator, exp.decomposition())
        if exp.dist.is_primary:
            write_config(cfg, exp.run_dir)
        result = METHODS[cfg.method](exp)
        if exp.dist.is_primary:
            write_result(exp, result)
    return result


def _phases_resumed(cfg: RunConfig) -> list[str]:
    """The phases whose checkpoints in the run folder ``cfg.method`` resumes (or loads, when finished)."""
    own = cfg.model.aggregator if cfg.method == "aggregation" else cfg.method
    builds_on_local = cfg.method in ("aggregation", "transfer") and not cfg.pretrained
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
