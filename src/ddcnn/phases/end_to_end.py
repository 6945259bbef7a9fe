"""End-to-end training of the whole CNN-DNN, the loss on its output only: ``coherent`` from random
initialisation, ``transfer`` from the pretrained local CNNs (and, optionally, the aggregation phase's aggregator)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..config import format_grid
from ..distributed import subdomain_gather_bytes_per_step
from ..models import LocalCNNs
from ..models.aggregators import Aggregator
from ..models.cnn_dnn import CNNDNN
from ..runtime import compute_dtype, seed_everything
from ..train.evaluation import evaluate
from .aggregation import aggregation_phase
from .context import (
    Experiment,
    MethodResult,
    build_aggregator,
    build_local_cnns,
    check_normalization,
    checkpoint_in,
    communication_per_step,
    count_parameters,
    fit_phase,
    initial_local_cnns,
    method_report,
)
from .local import local_phase_checkpoint

log = logging.getLogger(__name__)


def _train_cnn_dnn(exp: Experiment, model: CNNDNN, name: str, pretraining_seconds: float = 0.0) -> MethodResult:
    """Train the whole ``model`` end to end (loss on its output only) and report it, with its local CNNs'
    own test accuracies in ``extra``."""
    decomposition = model.local_cnns.decomposition
    parallel = exp.parallel(decomposition)
    spec = exp.spec("cnn_dnn", decomposition, model.aggregator.name, method=name)
    fit = fit_phase(exp, model, name, exp.cfg.train.epochs, spec, parallel)
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True, parallel=parallel)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device, parallel=parallel)
    local_test = evaluate(model.local_cnns, exp.loader("test"), exp.cfg.train, exp.device, parallel=parallel)
    return MethodResult(
        name, format_grid(decomposition.grid), method_report(test), val.accuracy, count_parameters(model),
        fit.train_seconds, fit.images_per_second, fit.history,
        extra={
            "aggregator_parameters": count_parameters(model.aggregator),
            "local_train_seconds": pretraining_seconds,
            "total_train_seconds": pretraining_seconds + fit.train_seconds,
            "test_subdomain_accuracy": local_test.subdomain_accuracy,
            **communication_per_step(model, subdomain_gather_bytes_per_step(
                exp.cfg.data.batch_size, decomposition.num_subdomains, model.aggregator.input_dim,  # K, or D features
                compute_dtype(exp.cfg.train).itemsize,
            )),
        },
    )


def run_coherent(exp: Experiment) -> MethodResult:
    """The coherent CNN-DNN: local CNNs and aggregator trained together from random initialisation."""
    decomposition = exp.decomposition()
    seed_everything(exp.cfg.train.seed)
    local_cnns = initial_local_cnns(exp, decomposition)
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
        return checkpoint_in(folder.parent if folder.is_file() else folder, name)
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
    check_normalization(exp, state, source)
    seed_everything(exp.cfg.train.seed)
    pretrained = CNNDNN.from_pretrained(
        state, build_local_cnns(exp, decomposition), build_aggregator(exp, name, decomposition),
        with_aggregator=exp.cfg.transfer_aggregator,
    )
    model = _cnn_dnn(exp, pretrained.local_cnns, pretrained.aggregator)
    log.info("transfer: initialised from %s", source)
    pretraining = float(state.get("total_train_seconds", state.get("train_seconds", 0.0)))
    return _train_cnn_dnn(exp, model, "transfer", pretraining_seconds=pretraining)
