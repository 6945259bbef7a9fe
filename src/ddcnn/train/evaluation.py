"""What training and evaluation share: the loss, the hits per batch, a batch in the model's layout, and
:func:`evaluate`, the loss and accuracy of a model on a split.

Models return logits ``(B, K)`` (a global CNN, a CNN-DNN, an aggregator) or ``(B, N, K)`` (N local CNNs, each
predicting the class of the whole image). For ``(B, N, K)`` the loss is the *sum* over subdomains of each local
CNN's mean cross-entropy, so each local CNN gets exactly the gradient it would get if it were trained alone.
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
from ..errors import DDCNNError
from ..runtime import at_least_float32, autocast, compute_dtype, use_channels_last


def classification_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy; for ``(B, N, K)`` logits the sum over subdomains of each local CNN's mean loss."""
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
