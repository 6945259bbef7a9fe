"""The aggregation phase on tensors: frozen local probabilities in, a fitted or trained aggregator out.

The local CNNs run once over a split (:func:`local_probabilities`); what they produce, ``(n, N, K)`` probabilities,
is small, so it stays in memory and an aggregator trains on it for many epochs at almost no cost, with the same
:class:`~ddcnn.train.engine.Trainer` as every other model, fed by a :class:`TensorLoader`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .distributed import Parallel
from .models.aggregators import Aggregator
from .train.callbacks import Callback
from .train.engine import FitResult, Trainer, evaluate


@dataclass
class LocalProbabilities:
    """The local CNNs' probabilities ``(n, N, K)`` on some images, with those images' labels ``(n,)``."""

    probabilities: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def cat(cls, parts: list[LocalProbabilities]) -> LocalProbabilities:
        return cls(torch.cat([p.probabilities for p in parts]), torch.cat([p.labels for p in parts]))


class TensorLoader:
    """Batches ``(x[rows], y[rows])`` of in-memory tensors, the loader interface :class:`Trainer` expects.

    With ``shuffle``, each epoch's order is a permutation drawn from ``(seed, epoch)`` only (call
    :meth:`set_epoch`), so a resumed run sees the same batches; the last partial batch is then dropped (a batch
    of one would break batch norm). Without ``shuffle``, every row in order.
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
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.seed, self.epoch = max(1, batch_size), shuffle, seed, 0
        if shuffle and len(y) > self.batch_size:
            self.num_samples = len(y) // self.batch_size * self.batch_size
        else:
            self.num_samples = len(y)

    @classmethod
    def of(cls, data: LocalProbabilities, batch_size: int, **kwargs) -> TensorLoader:
        return cls(data.probabilities, data.labels, batch_size, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
            order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(int(seed)))
        else:
            order = torch.arange(len(self.y))
        for rows in order[: self.num_samples].to(self.x.device).split(self.batch_size):
            yield self.x[rows], self.y[rows]


def local_probabilities(
    model: nn.Module, loader: Iterable, cfg: TrainConfig, device: torch.device, parallel: Parallel | None = None
) -> LocalProbabilities:
    """Run ``model`` (local CNNs, logits ``(B, N, K)``) over ``loader`` once, in eval mode; results on the CPU.
    With ``parallel``, ``model`` is this process's share of the local CNNs and all of theirs are gathered."""
    result = evaluate(model, loader, cfg, device, collect=True, parallel=parallel)
    return LocalProbabilities(result.probabilities, result.labels)


@dataclass
class AggregatorFit:
    """What fitting or training an aggregator produced."""

    history: list[dict]
    seconds: float
    images_per_second: float  # probability vectors per second during fitting/training


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
) -> AggregatorFit:
    """Fit ``aggregator``: if trainable, the Trainer on ``train`` for ``epochs`` with ``val`` for the per-epoch
    validation numbers; else its closed-form ``fit`` on ``val`` (if it has one). ``save``: False on the processes
    of a distributed run other than rank 0, which fit the same aggregator on the same numbers but write nothing."""
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
    trainer = Trainer(
        aggregator, cfg, device, epochs, log_csv=log_csv, desc=aggregator.name, save=save, callbacks=callbacks
    )
    fit: FitResult = trainer.fit(
        TensorLoader.of(train, batch_size, shuffle=True, seed=cfg.seed, device=device),
        TensorLoader.of(val, batch_size, device=device),
    )
    return AggregatorFit(fit.history, fit.train_seconds, fit.images_per_second)
