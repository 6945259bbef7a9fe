"""What every phase needs: the :class:`Experiment` (configuration, data, device, run folder, this process's place
in a distributed run), the :class:`MethodResult` it reports, and building and training a phase's model with
checkpoints (:func:`fit_phase`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import ensure_writable_folder, load_checkpoint
from ..config import RunConfig, config_to_dict
from ..data import DatasetSplits, ImageSet, load_dataset, make_loader
from ..data.normalization import normalization
from ..decomposition import Decomposition
from ..distributed import DistContext, Parallel, data_parallel_bytes_per_step, primary_first, sum_over_whole_model
from ..errors import CheckpointError, CheckpointMismatchError
from ..models import LocalCNNs, ModelSpec
from ..models.aggregators import Aggregator, aggregator_options, create_aggregator
from ..models.local_cnns import feature_channels
from ..models.pretrained import load_init_weights
from ..models.spec import spec_of
from ..run_folder import check_resume
from ..runtime import compute_dtype, resolve_device
from ..train.callbacks import Callback
from ..train.engine import EpochEnd, FitResult, Trainer
from ..train.evaluation import EvalResult, training_class_weights
from ..train.metrics import ClassificationReport, classification_report

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """What every training mode needs: the configuration, the data, the device, the run folder and, in a
    distributed run, this process's place in it (``dist``)."""

    cfg: RunConfig
    data: DatasetSplits
    device: torch.device
    run_dir: Path
    dist: DistContext = field(default_factory=DistContext)
    callbacks: Sequence[Callback] = ()  # the events of every phase's training (ddcnn.train.callbacks)
    _parallel: dict[int, Parallel] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(
        cls, cfg: RunConfig, data: DatasetSplits | None = None, dist: DistContext | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> Experiment:
        """Set up ``cfg``'s device (``dist``'s, in a distributed run) and run folder; load its dataset unless
        ``data`` (already loaded) is given."""
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        dist = dist or DistContext(device=resolve_device(cfg.train.device))
        run_dir = ensure_writable_folder(cfg.out)
        if data is None:
            with primary_first(dist):  # the other processes read what rank 0 decoded into the cache
                data = load_dataset(cfg.data)
        return cls(cfg, data, dist.device, run_dir, dist, tuple(callbacks))

    def parallel(self, decomposition: Decomposition) -> Parallel:
        """How the local CNNs of ``decomposition`` are spread over this run's processes (``cfg.train.parallel``)."""
        n = decomposition.num_subdomains
        if n not in self._parallel:
            self._parallel[n] = Parallel(self.dist, n, self.cfg.train.parallel)
        return self._parallel[n]

    def loader(
        self,
        split: str,
        train: bool = False,
        seed: int | None = None,
        drop_last: bool | None = None,
        parallel: Parallel | None = None,
        sampler: str = "uniform",
        local_cnns: LocalCNNs | None = None,
    ):
        """Batches of ``split``; with ``parallel``, this process's share of each (training) batch; ``sampler``: the
        order of a training epoch (:mod:`ddcnn.data.sampling`). With ``local_cnns`` that are a process's share of a
        decomposition's local CNNs (model parallel), the batches are the subimages of its subdomains only, the same
        pixels as the whole images' cut (:mod:`ddcnn.data.subimages`): the process holds and augments no more."""
        data = self.data
        subimages = None
        if local_cnns is not None and local_cnns.is_share:
            subimages = (local_cnns.decomposition, tuple(local_cnns.subdomains))
        batch_size = self.cfg.data.batch_size if train else self.cfg.data.eval_batch_size
        mean, std = self.normalization()
        return make_loader(
            getattr(data, split),
            batch_size=parallel.batch_size(batch_size) if parallel else batch_size,
            train=train,
            cfg=self.cfg.data,
            mean=mean,
            std=std,
            device=self.device,
            seed=self.cfg.train.seed if seed is None else seed,
            shard=parallel.shard if parallel else (0, 1),
            drop_last=drop_last,
            sampler=sampler,
            subimages=subimages,
            dtype=compute_dtype(self.cfg.train),  # the coarse level's subimages, averaged as the model would
        )

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel mean and std of ``--normalize`` (the training split's, or ImageNet's) that the loaders
        normalise with and the spec records for inference."""
        return normalization(self.data, self.cfg.data.normalize)

    def decomposition(self, grid: tuple[int, ...] | None = None) -> Decomposition:
        """The decomposition of this data set's images by ``grid`` (default: the configured one), with the coarse
        level of ``--coarse``."""
        grid = self.cfg.model.grid if grid is None else grid
        if math.prod(grid) == 1:  # the global CNN, whatever the number of axes: no overlap, no coarse level
            return Decomposition((1,) * self.data.spatial_dims, self.data.image_shape, 0)
        return Decomposition(grid, self.data.image_shape, self.cfg.model.overlap, self.cfg.model.coarse)

    def spec(
        self, kind: str, decomposition: Decomposition, aggregator: str | None = None, **provenance: Any
    ) -> ModelSpec:
        """The spec of a model of this experiment on ``decomposition``, to be written into its checkpoints:
        ``kind`` ``local_cnns`` or ``cnn_dnn`` (with ``aggregator``, its options from the configuration);
        ``provenance``: ``method``, ``local_checkpoint``."""
        m = self.cfg.model
        mean, std = self.normalization()
        return ModelSpec(
            kind=kind,
            backbone=m.backbone,
            width=m.width_of(decomposition.num_subdomains),
            grid=decomposition.grid,
            overlap=decomposition.overlap,
            coarse=decomposition.coarse,
            image_shape=decomposition.image_shape,
            in_channels=self.data.in_channels,
            num_classes=self.data.num_classes,
            class_names=tuple(self.data.class_names),
            mean=mean,
            std=std,
            aggregator=aggregator,
            aggregator_options=self.aggregator_options(aggregator, decomposition) if aggregator else {},
            intensity=None if self.data.intensity.is_identity else self.data.intensity.to_dict(),  # None: uint8
            dataset=self.data.name,
            **provenance,
        )

    def aggregator_options(self, name: str, decomposition: Decomposition) -> dict[str, Any]:
        """Aggregator ``name``'s options (``dnn:features``: reading that input) on ``decomposition``; reading all
        pooled features (``--feature-dim`` unset), their number is a probe of one local CNN's."""
        m = self.cfg.model
        width = m.width_of(decomposition.num_subdomains)
        return aggregator_options(name, m, lambda: feature_channels(
            m.backbone, decomposition, self.data.in_channels, self.data.num_classes, width))

    def with_data(self, **splits: ImageSet) -> Experiment:
        """This experiment on other train/val/test images (same classes, statistics and run folder)."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **splits))


@dataclass
class MethodResult:
    """One trained model's numbers, one row of a comparison.

    ``train_seconds`` is the time of this method's own phase; for methods built on pretrained local CNNs
    (aggregators, transfer) ``extra["total_train_seconds"]`` adds the phases they start from.
    """

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
    """The parameters of ``model`` (of the whole model, where it is one process's share)."""
    return sum_over_whole_model(model, lambda p: p.numel())


def communication_per_step(model: nn.Module, model_parallel_bytes: int) -> dict[str, int]:
    """What training ``model`` communicates per step: ``model_parallel_bytes`` in model parallelism (at most one
    process per subdomain), and the parameters' bytes in data parallelism, the baseline (docs/distributed.md)."""
    return {
        "model_parallel_bytes_per_step": model_parallel_bytes,
        "data_parallel_bytes_per_step": data_parallel_bytes_per_step(model),
    }


def checkpoint_finished(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of a completed phase (its ``finished`` flag)."""
    return path.is_file() and bool(load_checkpoint(path).get("finished"))


def build_local_cnns(exp: Experiment, decomposition: Decomposition) -> LocalCNNs:
    m = exp.cfg.model
    width = m.width_of(decomposition.num_subdomains)  # --local-width for local CNNs, --width for the global CNN
    local_cnns = LocalCNNs(m.backbone, decomposition, exp.data.in_channels, exp.data.num_classes, width)
    return local_cnns.to(exp.device, compute_dtype(exp.cfg.train))


def initial_local_cnns(exp: Experiment, decomposition: Decomposition) -> LocalCNNs:
    """The local CNNs a phase trains from the start (global, local, coherent, each local phase): at random, or
    every one of them from the pretrained weights of ``--init-weights`` (:mod:`ddcnn.models.pretrained`)."""
    local_cnns = build_local_cnns(exp, decomposition)
    m = exp.cfg.model
    if m.init_weights is not None:
        digest = load_init_weights(local_cnns, m.init_weights, m.init_weights_sha256)
        log.info("%d %s started from %s (sha256 %s), classifier fresh for %d classes", local_cnns.num_local_cnns,
                 m.backbone, m.init_weights, digest[:12], exp.data.num_classes)
    return local_cnns


def check_normalization(exp: Experiment, state: dict[str, Any], path: str | Path) -> None:
    """Refuse pretrained local CNNs (checkpoint ``state`` at ``path``) that saw inputs normalised otherwise than
    this run normalises them (``--normalize``); checkpoints that record no normalisation pass."""
    spec = spec_of(state, path)
    mean, std = exp.normalization()
    if spec.mean is None or spec.std is None:
        return
    if not (_close(spec.mean, mean) and _close(spec.std, std)):
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained on inputs normalised with mean {_rounded(spec.mean)} and std "
            f"{_rounded(spec.std)}, but this run normalises with {_rounded(mean)} and {_rounded(std)} (--normalize "
            f"{exp.cfg.data.normalize}); pass the --normalize it was trained with"
        )


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(a, b))


def _rounded(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def build_aggregator(exp: Experiment, name: str, decomposition: Decomposition) -> Aggregator:
    options = exp.aggregator_options(name, decomposition)
    aggregator = create_aggregator(name, decomposition.num_subdomains, exp.data.num_classes, **options)
    return aggregator.to(exp.device, compute_dtype(exp.cfg.train))


def fit_phase(
    exp: Experiment, model: nn.Module, name: str, epochs: int, spec: ModelSpec, parallel: Parallel,
    epoch_end: EpochEnd | None = None,
) -> FitResult:
    """Train ``model`` (this process's share, per ``parallel``) on the experiment's images with checkpoints
    ``<name>.pt`` (holding ``spec``) and log ``<name>_log.csv``; ``epoch_end``: see
    :class:`~ddcnn.train.engine.Trainer`."""
    log.info("%s: %s parameters, %d epochs", name, f"{count_parameters(model):,}", epochs)
    if exp.dist.distributed:
        log.info("%s: %s", name, parallel)
    checkpoint = exp.run_dir / f"{name}.pt"
    trainer = Trainer(
        model,
        exp.cfg.train,
        exp.device,
        epochs,
        checkpoint=checkpoint,
        log_csv=exp.run_dir / f"{name}_log.csv",
        spec=spec.to_dict(),
        config=config_to_dict(exp.cfg),
        desc=name,
        save=exp.dist.is_primary,
        parallel=parallel,
        epoch_end=epoch_end,
        callbacks=exp.callbacks,
        check_resumed=lambda state: check_resume(state.get("config"), exp.cfg, name, checkpoint),
        class_weights=training_class_weights(exp.cfg.train, exp.data.train.labels, exp.data.num_classes),
    )
    # local CNNs (a process's share of them) read only their subimages; other models whole images
    local_cnns = model if isinstance(model, LocalCNNs) else None
    train = exp.loader("train", train=True, parallel=parallel, sampler=exp.cfg.train.sampler, local_cnns=local_cnns)
    return trainer.fit(train, exp.loader("val", local_cnns=local_cnns), resume=exp.cfg.resume)


def local_epochs(exp: Experiment) -> int:
    return exp.cfg.local_epochs or exp.cfg.train.epochs


def method_report(result: EvalResult) -> ClassificationReport:
    """The report of a method's test probabilities; for local CNNs that of their mean probability, each local CNN's
    balanced accuracy and AUC in its ``extra``."""
    return classification_report(result.labels, result.probabilities, loss=result.loss)


def checkpoint_in(source: str | Path, stem: str) -> Path:
    """``source`` itself if it is a file, else ``source/<stem>.pt``."""
    path = Path(source)
    if path.is_dir():
        path = path / f"{stem}.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{path.parent} holds no {stem}.pt; pass a run folder of that phase or its checkpoint"
            )
    return path
