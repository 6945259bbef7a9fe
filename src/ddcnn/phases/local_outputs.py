"""The frozen local CNNs' outputs on a split, computed once for the aggregation phase: their probabilities and their
logits ``(n, N, K)``, and their pooled features ``(n, N, D)``, with the images' labels (:class:`LocalProbabilities`,
:func:`local_probabilities`).

A trained aggregator reads one of the three (its ``local_output``, :meth:`LocalProbabilities.inputs`); the logits and
the features are kept where the phase's trained aggregators read them (``--local-output``, or ``dnn:features`` in
``ddcnn compare --methods``), beside the probabilities that the closed-form aggregators of the same phase read, all
from the same one pass of the local CNNs. They are small: N*K or N*D numbers an image.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig
from ..data import ImageSet
from ..decomposition import Decomposition
from ..distributed import Parallel
from ..models import LocalCNNs
from ..models.aggregators import aggregator_class, check_aggregator_input
from ..runtime import at_least_float32
from ..train.evaluation import evaluate
from ..train.logs import format_bytes
from .context import Experiment, local_epochs
from .local import train_local_cnns

log = logging.getLogger(__name__)

# On the CPU the local CNNs see each evaluation batch in chunks of at most this many pixels (64 CIFAR-10 images, 16 of
# 64x64 pixels, at least CPU_CHUNK_MIN_IMAGES): their feature maps then stay in the caches. On whole batches of 512
# CIFAR-10 images the inference pass ran 2.4x slower (3,000 against 7,400 images/s on one core, vgg9 width 0.5, 2x2;
# benchmarks/README.md). A GPU takes whole batches.
CPU_CHUNK_PIXELS = 2**16
CPU_CHUNK_MIN_IMAGES = 8


@dataclass
class LocalProbabilities:
    """The local CNNs' probabilities ``(n, N, K)`` on some images, with those images' labels ``(n,)``, and their
    logits ``(n, N, K)`` and pooled features ``(n, N, D)`` where they were kept (:func:`local_probabilities`)."""

    probabilities: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, local_output: str) -> torch.Tensor:
        """What an aggregator with ``local_output`` (probabilities, logits or features) reads."""
        if local_output == "probabilities":
            return self.probabilities
        kept = self.logits if local_output == "logits" else self.features if local_output == "features" else None
        if kept is None:
            raise ValueError(f"these local probabilities were computed without the local {local_output}; use "
                             "local_probabilities(..., keep=...)")
        return kept

    @classmethod
    def cat(cls, parts: list[LocalProbabilities]) -> LocalProbabilities:
        def joined(name: str) -> torch.Tensor | None:
            kept = [getattr(p, name) for p in parts]
            return None if any(k is None for k in kept) else torch.cat(kept)

        return cls(joined("probabilities"), joined("labels"), joined("logits"), joined("features"))


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


class _Keep(nn.Module):
    """``model`` (local CNNs), giving its logits as they are and keeping a CPU copy of each batch's logits and, with
    ``feature_dim``, its pooled features (:meth:`~ddcnn.models.LocalCNNs.forward_with_features`), in float32 at least
    (as :func:`evaluate` turns the logits into probabilities): so one pass gives all three."""

    def __init__(self, model: nn.Module, feature_dim: int | None):
        super().__init__()
        self.model, self.feature_dim, self.logits, self.features = model, feature_dim, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_dim is None:
            logits = self.model(x)
        else:
            logits, features = self.model.forward_with_features(x, self.feature_dim)
            self.features.append(at_least_float32(features).cpu())
        self.logits.append(at_least_float32(logits).cpu())
        return logits


def local_probabilities(
    model: nn.Module,
    loader: Iterable,
    cfg: TrainConfig,
    device: torch.device,
    parallel: Parallel | None = None,
    *,
    logits: bool = False,
    feature_dim: int | None = None,
) -> LocalProbabilities:
    """Run ``model`` (local CNNs, logits ``(B, N, K)``) over ``loader`` once, in eval mode and inference mode (on the
    CPU in cache-sized chunks of each batch, :class:`_Chunks`); results on the CPU, with ``logits`` the logits too,
    with ``feature_dim`` (D) the pooled features ``(n, N, D)`` too, from the same pass. With ``parallel``, ``model``
    is this process's share of the local CNNs and all of theirs are gathered (the logits and features in gathers of
    their own: only a run whose aggregators read them asks for them)."""
    batches = _Chunks(loader) if torch.device(device).type == "cpu" else loader
    keep = _Keep(model, feature_dim) if logits or feature_dim is not None else model
    result = evaluate(keep, batches, cfg, device, collect=True, parallel=parallel)
    if keep is model:
        return LocalProbabilities(result.probabilities, result.labels)

    def gathered(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parallel is None else parallel.gather(torch.cat(parts))

    return LocalProbabilities(
        result.probabilities, result.labels, gathered(keep.logits) if logits else None,
        gathered(keep.features) if feature_dim is not None else None,
    )


# -- the inputs of an aggregation phase ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kept:
    """What of the local CNNs an aggregation phase keeps beside their probabilities: their logits, and their pooled
    features at ``feature_dim`` (None: not kept)."""

    logits: bool = False
    feature_dim: int | None = None

    def local_probabilities(self, model: nn.Module, loader: Iterable, exp: Experiment,
                            parallel: Parallel | None) -> LocalProbabilities:
        return local_probabilities(model, loader, exp.cfg.train, exp.device, parallel, logits=self.logits,
                                   feature_dim=self.feature_dim)


def reads(exp: Experiment, method: str) -> str:
    """What aggregator ``method`` (``dnn``, or ``dnn:features``) reads of the local CNNs: the input it names, else
    ``--local-output`` for a trained aggregator and probabilities for a closed-form one."""
    base, named = check_aggregator_input(method)
    if not aggregator_class(base).trainable:
        return "probabilities"
    return named or exp.cfg.model.local_output


def kept_for(exp: Experiment, decomposition: Decomposition, methods: Sequence[str]) -> Kept:
    """What the aggregators ``methods`` read beyond the probabilities (one ``--feature-dim`` for all)."""
    features = [m for m in methods if reads(exp, m) == "features"]
    dim = exp.aggregator_options(features[0], decomposition)["input_dim"] if features else None
    return Kept(any(reads(exp, m) == "logits" for m in methods), dim)


def _subset(split: ImageSet, rows: torch.Tensor) -> ImageSet:
    images = split.images[rows] if isinstance(split.images, torch.Tensor) else split.images[rows.numpy()]
    return ImageSet(torch.as_tensor(images), split.labels[rows])


def _crossfit_probabilities(exp: Experiment, decomposition: Decomposition, kept: Kept) -> LocalProbabilities:
    """Out-of-fold local probabilities of every training image (and the logits and features ``kept``): the training
    images are cut into k folds; for each fold, local CNNs trained on the other k-1 (checkpoint ``crossfit<j>.pt``,
    validated on the held-out fold) predict it."""
    k = exp.cfg.crossfit_folds
    train = exp.data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(exp.cfg.train.seed))
    folds = [fold.sort().values for fold in order.chunk(k)]
    parts: list[LocalProbabilities] = []
    for j, held_out in enumerate(folds):
        rest = torch.cat([f for i, f in enumerate(folds) if i != j]).sort().values
        fold_exp = exp.with_data(train=_subset(train, rest), val=_subset(train, held_out))
        local_cnns, _ = train_local_cnns(fold_exp, decomposition, local_epochs(exp), f"crossfit{j}")
        val, parallel = fold_exp.loader("val"), fold_exp.parallel(decomposition)
        parts.append(kept.local_probabilities(local_cnns, val, exp, parallel))
    joined = LocalProbabilities.cat(parts)
    where = torch.empty_like(order)
    where[torch.cat(folds)] = torch.arange(len(train))  # the row of each training image in the folds' order
    return LocalProbabilities(*(None if t is None else t[where] for t in
                                (getattr(joined, f.name) for f in dataclasses.fields(joined))))


def aggregator_training_inputs(
    exp: Experiment, local_cnns: LocalCNNs, decomposition: Decomposition, kept: Kept | None = None
) -> LocalProbabilities:
    """The local probabilities a trained aggregator learns from, per ``cfg.aggregator_inputs`` (with the logits and
    features ``kept``; default: what the configured aggregator reads):

    ``train``: the frozen local CNNs on the (unaugmented) training images, as in the papers; ``crossfit``:
    out-of-fold probabilities (:func:`_crossfit_probabilities`: k more local phases, each on k-1 folds); ``val``:
    the local CNNs on the validation split; ``augmented``: ``cfg.augmented_passes`` passes over the training
    images with the training augmentation of ``cfg.data`` (so, without augmentation, the ``train`` inputs repeated).
    """
    mode, parallel = exp.cfg.aggregator_inputs, exp.parallel(decomposition)
    kept = kept_for(exp, decomposition, [exp.cfg.model.aggregator]) if kept is None else kept
    if mode in ("train", "val"):
        return kept.local_probabilities(local_cnns, exp.loader(mode), exp, parallel)
    if mode == "augmented":
        loader = exp.loader("train", train=True, drop_last=False)
        passes = []
        for p in range(exp.cfg.augmented_passes):
            loader.set_epoch(p)
            passes.append(kept.local_probabilities(local_cnns, loader, exp, parallel))
        return LocalProbabilities.cat(passes)
    return _crossfit_probabilities(exp, decomposition, kept)


class LocalInputs:
    """The frozen local CNNs' probabilities (and the logits and features ``kept``) on each split an aggregation phase
    needs, each computed once, with the seconds it took (part of the training time of the aggregators that need it).
    In a distributed run each process computes its share of the local CNNs and the outputs are gathered."""

    def __init__(self, exp: Experiment, local_cnns: LocalCNNs, decomposition: Decomposition, kept: Kept):
        self.exp, self.decomposition, self.kept = exp, decomposition, kept
        self.parallel = exp.parallel(decomposition)
        self.local_cnns = self.parallel.local_cnns(local_cnns)
        self._cache: dict[str, tuple[LocalProbabilities, float]] = {}

    def get(self, split: str) -> tuple[LocalProbabilities, float]:
        """``split``: val, test, or train (the trained aggregators' inputs, see :func:`aggregator_training_inputs`)."""
        if split not in self._cache:
            start, sent = time.perf_counter(), self.parallel.communication.total
            if split == "train":
                data = aggregator_training_inputs(self.exp, self.local_cnns, self.decomposition, self.kept)
            else:
                data = self.kept.local_probabilities(self.local_cnns, self.exp.loader(split), self.exp, self.parallel)
            self._cache[split] = data, time.perf_counter() - start
            if self.exp.dist.distributed:
                sent = self.parallel.communication.total - sent
                log.info("aggregation inputs (%s): local outputs of %d images gathered, sent %s (%s/image)",
                         split, len(data), format_bytes(sent), format_bytes(sent / max(len(data), 1)))
        return self._cache[split]
