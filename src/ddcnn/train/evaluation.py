"""What training and evaluation share: the loss, the hits per batch, a batch in the model's layout, and
:func:`evaluate`, the loss and accuracy of a model on a split.

Models return logits ``(B, K)`` (a global CNN, a CNN-DNN, an aggregator) or ``(B, N, K)`` (N local CNNs, each
predicting the class of the whole image). For ``(B, N, K)`` the loss is the *sum* over subdomains of each local
CNN's mean cross-entropy, so each local CNN gets exactly the gradient it would get if it were trained alone.

With class weights (``--class-weights balanced``, :func:`balanced_class_weights`) each image's cross-entropy is
multiplied by its class's weight and the sum divided by the batch size B, not by the sum of the batch's weights (as
``F.cross_entropy(weight=...)`` averages). The balanced weights average 1 over the training images, so the loss
keeps its scale; it is, in expectation, the loss of a class-balanced epoch (``--sampler balanced``); and a mean over
B is what data parallelism and gradient accumulation split exactly: the mean of equal shards' means is the batch's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..distributed import Parallel
from ..errors import ConfigError, DatasetError, DDCNNError
from ..runtime import at_least_float32, autocast, compute_dtype, use_channels_last


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (K * n_k)`` of the ``K = num_classes`` classes in ``labels`` (float64, on the
    CPU), as scikit-learn's ``compute_class_weight("balanced")``; every class must have an image."""
    counts = torch.bincount(labels.detach().cpu().long(), minlength=num_classes)
    if len(counts) > num_classes:
        raise DatasetError(f"labels reach class {len(counts) - 1}, but there are {num_classes} classes")
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise DatasetError(
            f"--class-weights balanced needs an image of every class among the {len(labels)} being trained on, but "
            f"class(es) {missing} have none; use more images (--limit-train) or --class-weights none"
        )
    return len(labels) / (num_classes * counts.double())


def training_class_weights(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The class weights of ``cfg.class_weights`` for a training on images labelled ``labels``; None for none."""
    return balanced_class_weights(labels, num_classes) if cfg.class_weights == "balanced" else None


def checked_class_weights(
    cfg: TrainConfig, weights: torch.Tensor | None, device: torch.device, desc: str = "train"
) -> torch.Tensor | None:
    """A Trainer's ``weights`` on ``device``: given exactly when ``cfg.class_weights`` is not none, so that the option
    is never silently ignored (and weights never applied without it)."""
    if (cfg.class_weights == "none") != (weights is None):
        raise ConfigError(
            f"{desc}: class_weights {cfg.class_weights} needs the Trainer's class_weights tensor (and none takes "
            "none); pass training_class_weights(cfg, labels, num_classes)"
        )
    return None if weights is None else weights.to(device)


def classification_loss(
    logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy; for ``(B, N, K)`` logits the sum over subdomains of each local CNN's mean loss. With
    ``class_weights`` (``(K,)``), each image's loss times its class's weight, divided by B (see the module's doc)."""
    if class_weights is not None:
        flat = at_least_float32(logits.reshape(-1, logits.shape[-1]))
        targets = y.repeat_interleave(logits.shape[1]) if logits.dim() == 3 else y
        losses = F.cross_entropy(flat, targets, label_smoothing=label_smoothing, reduction="none")
        return (losses * class_weights.to(losses)[targets]).sum() / len(y)
    if logits.dim() == 3:
        b, n, k = logits.shape
        total = F.cross_entropy(
            at_least_float32(logits.reshape(b * n, k)),
            y.repeat_interleave(n),
            label_smoothing=label_smoothing,
            reduction="sum",
        )
        return total / b
    return F.cross_entropy(at_least_float32(logits), y, label_smoothing=label_smoothing)


def correct_predictions(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The number of images of the batch whose class ``logits`` predicts: a scalar for ``(B, K)`` logits, one
    number per subdomain for ``(B, N, K)``."""
    return (logits.argmax(-1) == (y[:, None] if logits.dim() == 3 else y)).sum(0)


def to_memory_format(x: torch.Tensor, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """A batch as the model takes it: in ``cfg.dtype`` (images arrive in float32) and, if so configured,
    channels-last."""
    x = x.to(compute_dtype(cfg)) if x.is_floating_point() else x
    if x.dim() == 4 and use_channels_last(cfg, device):
        return x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # for (B, N, K) models: the mean of the local CNNs' accuracies
    subdomain_accuracy: list[float] | None = None
    probabilities: torch.Tensor | None = None  # (n, K) or (n, N, K) on the CPU, when collected
    labels: torch.Tensor | None = None


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    cfg: TrainConfig,
    device: torch.device,
    *,
    collect: bool = False,
    desc: str = "eval",
    progress: bool = False,
    parallel: Parallel | None = None,
) -> EvalResult:
    """Loss and accuracy of ``model`` on ``loader``; with ``collect``, also the probabilities and labels.

    ``parallel`` (default: one process, :meth:`Parallel.single`): ``model`` is this process's share of a model
    placed on the processes by ``parallel``, every process evaluates the same ``loader``, and the result is the
    whole model's (all subdomains' probabilities gathered).
    """
    parallel = Parallel.single(device=device) if parallel is None else parallel
    was_training = model.training
    model.eval()
    loss_sum, seen, correct = 0.0, 0, None
    probs, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=None if progress else True):
        x = to_memory_format(x, cfg, device)
        with autocast(cfg, device):
            logits = model(x)
        logits = at_least_float32(logits)
        loss_sum += float(classification_loss(logits, y)) * len(y)
        hits = correct_predictions(logits, y)
        correct = hits if correct is None else correct + hits
        seen += len(y)
        if collect:
            probs.append(logits.softmax(-1).cpu())
            labels.append(y.cpu())
    model.train(was_training)
    if seen == 0:
        raise DDCNNError("evaluation saw no images; the split is empty, use a larger dataset or fraction")
    loss, acc = parallel.reduce_metrics(loss_sum / seen, (correct.float() / seen).cpu())
    probabilities = torch.cat(probs) if collect else None
    if probabilities is not None and probabilities.dim() == 3:
        probabilities = parallel.gather(probabilities)
    return EvalResult(
        loss=loss,
        accuracy=float(acc.mean()),
        subdomain_accuracy=acc.tolist() if acc.dim() == 1 else None,
        probabilities=probabilities,
        labels=torch.cat(labels) if collect else None,
    )
