"""``ddcnn evaluate``: a trained model rebuilt from its checkpoint and evaluated on a split of its dataset (or of
another one with the same classes and image shape)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text, load_checkpoint
from .config import RunConfig, config_from_dict, format_grid
from .models.cnn_dnn import CNNDNN
from .models.spec import model_from_checkpoint, spec_of
from .phases import Experiment, method_report
from .plots import plot_confusion
from .train.evaluation import evaluate

__all__ = ["evaluate_checkpoint", "model_from_checkpoint"]


def evaluate_checkpoint(
    path: str | Path, dataset: str | None = None, split: str = "test", device: str = "auto"
) -> dict[str, Any]:
    """Evaluate a checkpoint on ``split`` of its own dataset (or ``dataset``); writes JSON and a confusion PNG
    next to the checkpoint and returns the report as a dict."""
    path = Path(path)
    state = load_checkpoint(path, require=("config",))
    spec = spec_of(state, path)
    cfg = config_from_dict(RunConfig, state["config"])
    if dataset:
        cfg.data.dataset = dataset
    cfg.train.device = device
    cfg.out = str(path.parent)
    exp = Experiment.from_config(cfg)
    data = exp.data
    spec.check_compatible(
        {"num_classes": data.num_classes, "image_shape": data.image_shape, "in_channels": data.in_channels}, path
    )
    model = model_from_checkpoint(state, path).to(exp.device)
    result = evaluate(model, exp.loader(split), cfg.train, exp.device, collect=True)
    report = method_report(result)
    out = {
        "checkpoint": str(path),
        "method": spec.method or spec.kind,
        "grid": format_grid(spec.grid),
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
