"""The local phase: the local CNNs of a decomposition trained all at once, each on its subimages against the
label of the whole image, with no communication; and the global CNN, the same code on a ``1x1`` grid. A coarse level
(``--coarse``) is one more local CNN here, on the whole image averaged down (:mod:`ddcnn.decomposition`): it trains
with the others, and the logs and the result name it and report its cost."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..config import format_grid
from ..decomposition import Decomposition
from ..distributed import data_parallel_bytes_per_step
from ..models import LocalCNNs
from ..models.cnn_dnn import load_pretrained_local_cnns
from ..models.summary import local_cnns_cost
from ..runtime import seed_everything
from ..train.engine import EpochEnd, FitResult
from ..train.evaluation import evaluate
from .context import (
    Experiment,
    MethodResult,
    build_local_cnns,
    check_normalization,
    checkpoint_in,
    communication_per_step,
    count_parameters,
    fit_phase,
    initial_local_cnns,
    local_epochs,
    method_report,
)

log = logging.getLogger(__name__)


def train_local_cnns(
    exp: Experiment, decomposition: Decomposition, epochs: int, name: str, epoch_end: EpochEnd | None = None
) -> tuple[LocalCNNs, FitResult]:
    """Train the local CNNs of ``decomposition`` (all at once; ``1x1`` is the global CNN), with checkpoints; in a
    distributed run, this process's share of them (see :meth:`Experiment.parallel`), which reads only its subdomains'
    subimages (:mod:`ddcnn.data.subimages`; model parallel). ``epoch_end(trainer, row)`` is
    called after every epoch and can end training early (see :class:`~ddcnn.train.engine.Trainer`)."""
    seed_everything(exp.cfg.train.seed)
    parallel = exp.parallel(decomposition)
    model = parallel.local_cnns(initial_local_cnns(exp, decomposition))
    log.info("%s: %s", name, decomposition)
    if decomposition.coarse:
        cost = local_cnns_cost(model)
        mflops = [cost[k] / 1e6 for k in ("coarse_flops", "flops_per_image", "flops_per_image_without_coarse")]
        log.info("%s: the coarse CNN has %s parameters and %.2f MFLOPs per image (forward); all local CNNs %.2f "
                 "MFLOPs per image, %.2f without it", name, f"{cost['coarse_parameters']:,}", *mflops)
    spec = exp.spec("local_cnns", decomposition, method=name)
    fit = fit_phase(exp, model, name, epochs, spec, parallel, epoch_end)
    return model, fit


def _log_subdomains(name: str, history: list[dict[str, Any]], decomposition: Decomposition) -> None:
    """Each epoch's per-subdomain accuracies (the Trainer's log line has only their mean), the coarse level's
    named."""

    def text(accuracies: list[float]) -> str:
        return " ".join(("coarse " if i == decomposition.coarse_index else "") + f"{a:.3f}"
                        for i, a in enumerate(accuracies))

    for row in history:
        if "train_subdomain_accuracy" in row:
            train, val = text(row["train_subdomain_accuracy"]), text(row.get("val_subdomain_accuracy", []))
            log.info("%s epoch %d per subdomain: train %s | val %s", name, row["epoch"], train, val)


def run_global(exp: Experiment) -> MethodResult:
    """The baseline: the backbone trained on whole images."""
    decomposition = exp.decomposition((1,))
    model, fit = train_local_cnns(exp, decomposition, exp.cfg.train.epochs, "global")
    parallel = exp.parallel(decomposition)
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True, parallel=parallel)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device, parallel=parallel)
    return MethodResult(
        "global", "1x1", method_report(test), val.accuracy, count_parameters(model), fit.train_seconds,
        fit.images_per_second, fit.history,
        # one CNN has no model parallelism: its processes are data parallel either way
        extra={"total_train_seconds": fit.train_seconds, **communication_per_step(model, data_parallel_bytes_per_step(model))},
    )


def run_local(exp: Experiment) -> MethodResult:
    """The local phase: each local CNN trained on its subimages against the global label, all at once.

    The report is that of the local CNNs' mean probability; ``extra`` holds each local CNN's own train (last
    epoch), val and test accuracy, in subdomain order.
    """
    decomposition = exp.decomposition()
    model, fit = train_local_cnns(exp, decomposition, local_epochs(exp), "local")
    _log_subdomains("local", fit.history, decomposition)
    parallel = exp.parallel(decomposition)
    test_images, val_images = (exp.loader(split, local_cnns=model) for split in ("test", "val"))  # own subimages
    test = evaluate(model, test_images, exp.cfg.train, exp.device, collect=True, parallel=parallel)
    val = evaluate(model, val_images, exp.cfg.train, exp.device, parallel=parallel)
    return MethodResult(
        "local", format_grid(decomposition.grid), method_report(test), val.accuracy, count_parameters(model),
        fit.train_seconds, fit.images_per_second, fit.history,
        extra={
            "total_train_seconds": fit.train_seconds,
            "train_subdomain_accuracy": fit.history[-1].get("train_subdomain_accuracy"),
            "val_subdomain_accuracy": val.subdomain_accuracy,
            "test_subdomain_accuracy": test.subdomain_accuracy,
            **local_cnns_cost(model),  # FLOPs per image; the coarse level's parameters and FLOPs
            **communication_per_step(model, 0),
        },
    )


def local_phase_checkpoint(exp: Experiment, decomposition: Decomposition) -> Path:
    """The local phase's checkpoint: from ``cfg.pretrained``, or trained (resumed, with ``cfg.resume``) now."""
    if exp.cfg.pretrained:
        return checkpoint_in(exp.cfg.pretrained, "local")
    train_local_cnns(exp, decomposition, local_epochs(exp), "local")
    return exp.run_dir / "local.pt"


def pretrained_local_cnns(exp: Experiment, decomposition: Decomposition) -> tuple[LocalCNNs, dict[str, Any]]:
    """The pretrained local CNNs (frozen, in eval mode) and their checkpoint (its ``path`` added)."""
    path = local_phase_checkpoint(exp, decomposition)
    state = load_checkpoint(path, map_location=exp.device)
    if not state.get("finished"):
        log.warning("local CNNs of %s are from an unfinished local phase (epoch %s)", path, state.get("epoch"))
    check_normalization(exp, state, path)
    local_cnns = load_pretrained_local_cnns(state, build_local_cnns(exp, decomposition), str(path))
    return local_cnns.eval().requires_grad_(False), state | {"path": str(path)}
