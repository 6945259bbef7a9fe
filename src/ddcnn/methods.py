"""The training modes of the method (see docs/method.md), each a function of an :class:`Experiment`.

``global``: the backbone on whole images (a ``1x1`` grid). ``local``: the local phase, all local CNNs of a grid
trained at once, each against the global label.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig, config_from_dict, config_to_dict, format_grid
from .data import DatasetSplits, load_dataset, make_loader
from .decomposition import Decomposition
from .errors import UnknownNameError
from .models import LocalCNNs
from .plots import plot_confusion, plot_curves
from .train.checkpoint import check_metadata, load_checkpoint
from .train.engine import EvalResult, FitResult, Trainer, evaluate, resolve_device, seed_everything
from .train.metrics import ClassificationReport, classification_report

log = logging.getLogger("ddcnn")


@dataclass
class Experiment:
    """What every training mode needs: the configuration, the data, the device and the run folder."""

    cfg: RunConfig
    data: DatasetSplits
    device: torch.device
    run_dir: Path

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Experiment:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = resolve_device(cfg.train.device)
        run_dir = Path(cfg.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls(cfg, load_dataset(cfg.data), device, run_dir)

    def loader(self, split: str, train: bool = False, seed: int | None = None):
        data = self.data
        return make_loader(
            getattr(data, split),
            batch_size=self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size,
            train=train,
            cfg=self.cfg.data,
            mean=data.mean,
            std=data.std,
            device=self.device,
            seed=self.cfg.train.seed if seed is None else seed,
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


@dataclass
class MethodResult:
    """One trained model's numbers, one row of a comparison."""

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
    return sum(p.numel() for p in model.parameters())


def build_local_cnns(exp: Experiment, decomposition: Decomposition) -> LocalCNNs:
    m = exp.cfg.model
    return LocalCNNs(m.backbone, decomposition, exp.data.in_channels, exp.data.num_classes, m.width).to(exp.device)


def train_local_cnns(
    exp: Experiment, decomposition: Decomposition, epochs: int, name: str
) -> tuple[LocalCNNs, FitResult]:
    """Train the local CNNs of ``decomposition`` (all at once; ``1x1`` is the global CNN), with checkpoints."""
    seed_everything(exp.cfg.train.seed)
    model = build_local_cnns(exp, decomposition)
    log.info("%s: %s, %s parameters", name, decomposition, f"{count_parameters(model):,}")
    trainer = Trainer(
        model,
        exp.cfg.train,
        exp.device,
        epochs,
        checkpoint=exp.run_dir / f"{name}.pt",
        log_csv=exp.run_dir / f"{name}_log.csv",
        meta=exp.meta("local_cnns", decomposition, method=name),
        config=config_to_dict(exp.cfg),
        desc=name,
    )
    fit = trainer.fit(exp.loader("train", train=True), exp.loader("val"), resume=exp.cfg.resume)
    return model, fit


def _report(exp: Experiment, result: EvalResult) -> ClassificationReport:
    probs = result.probabilities
    if probs.dim() == 3:  # local CNNs: the report of their mean probability (per-subdomain numbers kept apart)
        probs = probs.mean(1)
    return classification_report(result.labels, probs, loss=result.loss)


def run_global(exp: Experiment) -> MethodResult:
    """The baseline: the backbone trained on whole images."""
    decomposition = exp.decomposition((1,))
    model, fit = train_local_cnns(exp, decomposition, exp.cfg.train.epochs, "global")
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device)
    return MethodResult(
        "global", "1x1", _report(exp, test), val.accuracy, count_parameters(model), fit.train_seconds,
        fit.images_per_second, fit.history,
    )


def run_local(exp: Experiment) -> MethodResult:
    """The local phase: each local CNN trained on its subimages against the global label, all at once."""
    decomposition = exp.decomposition()
    epochs = exp.cfg.local_epochs or exp.cfg.train.epochs
    model, fit = train_local_cnns(exp, decomposition, epochs, "local")
    test = evaluate(model, exp.loader("test"), exp.cfg.train, exp.device, collect=True)
    val = evaluate(model, exp.loader("val"), exp.cfg.train, exp.device)
    return MethodResult(
        "local", format_grid(decomposition.grid), _report(exp, test), val.accuracy, count_parameters(model),
        fit.train_seconds, fit.images_per_second, fit.history,
        extra={"test_subdomain_accuracy": test.subdomain_accuracy, "val_subdomain_accuracy": val.subdomain_accuracy},
    )


METHODS: dict[str, Callable[[Experiment], MethodResult]] = {"global": run_global, "local": run_local}


def list_methods() -> list[str]:
    return list(METHODS)


def run(cfg: RunConfig) -> MethodResult:
    """Train ``cfg.method`` and write config, results, confusion matrix and curves to ``cfg.out``."""
    if cfg.method not in METHODS:
        raise UnknownNameError("method", cfg.method, METHODS)
    exp = Experiment.from_config(cfg)
    write_config(cfg, exp.run_dir)
    result = METHODS[cfg.method](exp)
    write_result(exp, result)
    return result


def write_config(cfg: RunConfig, run_dir: Path) -> Path:
    import yaml

    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def write_result(exp: Experiment, result: MethodResult) -> None:
    """``results.json``, the confusion matrix PNG and the training curves PNG of one method."""
    run_dir = exp.run_dir
    payload = {
        "config": config_to_dict(exp.cfg),
        "dataset": {"name": exp.data.name, "classes": exp.data.class_names, "image_shape": list(exp.data.image_shape)},
        "rows": [result.row(per_class_accuracy=result.test.per_class_accuracy, confusion=result.test.confusion)],
    }
    (run_dir / "results.json").write_text(json.dumps(payload, indent=2))
    title = f"{result.method} {result.grid}: test accuracy {result.test.accuracy:.4f}"
    plot_confusion(result.test.confusion, exp.data.class_names, run_dir / f"confusion_{result.method}.png", title)
    if result.history:
        plot_curves({result.method: result.history}, run_dir / f"curves_{result.method}.png")
    log.info("%s %s test: %s", result.method, result.grid, result.test.summary())


# -- checkpoints back to models ---------------------------------------------------------------------------------


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint was written from (its ``meta``) and load its weights."""
    meta = state["meta"]
    decomposition = Decomposition(tuple(meta["grid"]), tuple(meta["image_shape"]), meta["overlap"])
    model = LocalCNNs(meta["backbone"], decomposition, meta["in_channels"], meta["num_classes"], meta["width"])
    model.load_state_dict(state["model"])
    return model


def evaluate_checkpoint(
    path: str | Path, dataset: str | None = None, split: str = "test", device: str = "auto"
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``split`` of its own dataset (or ``dataset``); writes JSON and a confusion PNG
    next to the checkpoint and returns the report as a dict."""
    path = Path(path)
    state = load_checkpoint(path)
    cfg = config_from_dict(RunConfig, state["config"])
    if dataset:
        cfg.data.dataset = dataset
    cfg.train.device = device
    cfg.out = str(path.parent)
    exp = Experiment.from_config(cfg)
    meta = state["meta"]
    check_metadata(
        state,
        {"num_classes": exp.data.num_classes, "image_shape": list(exp.data.image_shape), "in_channels": exp.data.in_channels},
        path,
    )
    model = model_from_checkpoint(state).to(exp.device)
    result = evaluate(model, exp.loader(split), cfg.train, exp.device, collect=True)
    report = _report(exp, result)
    out = {
        "checkpoint": str(path),
        "method": meta.get("method", meta["kind"]),
        "grid": format_grid(tuple(meta["grid"])),
        "dataset": exp.data.name,
        "split": split,
        "images": len(result.labels),
        **dataclasses.asdict(report),
    }
    if result.subdomain_accuracy is not None and len(result.subdomain_accuracy) > 1:
        out["subdomain_accuracy"] = result.subdomain_accuracy
    stem = f"evaluation_{path.stem}_{split}"
    (path.parent / f"{stem}.json").write_text(json.dumps(out, indent=2))
    title = f"{out['method']} {out['grid']} on {split}: accuracy {report.accuracy:.4f}"
    plot_confusion(report.confusion, exp.data.class_names, path.parent / f"{stem}_confusion.png", title)
    return out
