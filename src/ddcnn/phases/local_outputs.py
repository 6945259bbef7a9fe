"""The frozen local CNNs' outputs on a split, computed once for the aggregation phase: their probabilities and their
logits ``(n, N, K)`` with the images' labels (:class:`LocalProbabilities`, :func:`local_probabilities`).

A trained aggregator reads one of the two (its ``local_output``, :meth:`LocalProbabilities.inputs`); the logits are
kept where the run's trained aggregators read them (``--local-output logits``), beside the probabilities that the
closed-form aggregators of the same phase read: both are small, N*K numbers an image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..distributed import Parallel
from ..runtime import at_least_float32
from ..train.evaluation import evaluate

# On the CPU the local CNNs see each evaluation batch in chunks of at most this many pixels (64 CIFAR-10 images, 16 of
# 64x64 pixels, at least CPU_CHUNK_MIN_IMAGES): their feature maps then stay in the caches. On whole batches of 512
# CIFAR-10 images the inference pass ran 2.4x slower (3,000 against 7,400 images/s on one core, vgg9 width 0.5, 2x2;
# benchmarks/README.md). A GPU takes whole batches.
CPU_CHUNK_PIXELS = 2**16
CPU_CHUNK_MIN_IMAGES = 8


@dataclass
class LocalProbabilities:
    """The local CNNs' probabilities ``(n, N, K)`` on some images, with those images' labels ``(n,)``, and their
    logits ``(n, N, K)`` where they were kept (:func:`local_probabilities` keeps them)."""

    probabilities: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, local_output: str) -> torch.Tensor:
        """What an aggregator with ``local_output`` (probabilities or logits) reads."""
        if local_output == "probabilities":
            return self.probabilities
        if self.logits is None:
            raise ValueError("these local probabilities were computed without their logits; use local_probabilities")
        return self.logits

    @classmethod
    def cat(cls, parts: list[LocalProbabilities]) -> LocalProbabilities:
        logits = None if any(p.logits is None for p in parts) else torch.cat([p.logits for p in parts])
        return cls(torch.cat([p.probabilities for p in parts]), torch.cat([p.labels for p in parts]), logits)


class _Chunks:
    """The batches ``(x, y)`` of ``loader``, each cut into chunks of at most ``pixels`` pixels (and at least
    ``min_images`` images): for inference on the CPU (:data:`CPU_CHUNK_PIXELS`). Images are independent in
    evaluation, so the results are those of the whole batches."""

    def __init__(self, loader: Iterable, pixels: int = CPU_CHUNK_PIXELS, min_images: int = CPU_CHUNK_MIN_IMAGES):
        self.loader, self.pixels, self.min_images = loader, pixels, min_images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            rows = max(self.min_images, self.pixels // max(x[0, 0].numel(), 1)) if len(x) > self.min_images else 0
            if rows and len(x) > rows:
                yield from zip(x.split(rows), y.split(rows))
            else:
                yield x, y


class _KeepLogits(nn.Module):
    """``model`` as it is, keeping a CPU copy of each batch's output, in float32 at least (as :func:`evaluate`
    turns it into probabilities): so one pass gives both probabilities and logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.kept = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.kept.append(at_least_float32(logits).cpu())
        return logits


def local_probabilities(
    model: nn.Module,
    loader: Iterable,
    cfg: TrainConfig,
    device: torch.device,
    parallel: Parallel | None = None,
    *,
    logits: bool = False,
) -> LocalProbabilities:
    """Run ``model`` (local CNNs, logits ``(B, N, K)``) over ``loader`` once, in eval mode and inference mode (on the
    CPU in cache-sized chunks of each batch, :class:`_Chunks`); results on the CPU, with ``logits`` the logits too.
    With ``parallel``, ``model`` is this process's share of the local CNNs and all of theirs are gathered (the
    logits in a second gather, of the same size: only a run whose aggregators read them asks for them)."""
    batches = _Chunks(loader) if torch.device(device).type == "cpu" else loader
    keep = _KeepLogits(model) if logits else model
    result = evaluate(keep, batches, cfg, device, collect=True, parallel=parallel)
    if not logits:
        return LocalProbabilities(result.probabilities, result.labels)
    kept = torch.cat(keep.kept)
    return LocalProbabilities(result.probabilities, result.labels, kept if parallel is None else parallel.gather(kept))
