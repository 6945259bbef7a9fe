"""The training loop every mode uses: epochs of steps, validation, checkpoints and resume.

The loop is :class:`Trainer`: :meth:`Trainer.fit` runs the epochs; an epoch (:meth:`Trainer._train_epoch`) is the
bookkeeping around the steps (the running sums of :class:`_EpochTally`, the progress bar, the signal checks, the
epoch's log row), and a step (:meth:`Trainer._step`) is one optimisation step on one batch. The loop never asks
whether it runs on several processes: it calls its :class:`~ddcnn.distributed.Parallel` for every collective, and
with one process (the default, :meth:`~ddcnn.distributed.Parallel.single`) those are identities.

Determinism: the data order and augmentation of an epoch depend only on (seed, epoch) (see ``ddcnn.data``), and
checkpoints hold every RNG state, so a run resumed from any checkpoint, even one written mid-epoch on SIGTERM,
continues exactly as the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import TrainConfig
from ..distributed import Parallel
from ..errors import DDCNNError, TrainingDivergedError
from ..models.backbone import Backbone
from ..runtime import autocast, grad_scaler
from .callbacks import Callback, CallbackList
from .evaluation import checked_class_weights, classification_loss, correct_predictions, evaluate, to_memory_format
from .logs import format_bytes, write_csv
from .optim import build_optimizer, build_scheduler
from .signals import StopOnSignal, TrainingInterrupted

log = logging.getLogger(__name__)


def set_backbone_channels_last(model: nn.Module, cfg: TrainConfig) -> None:
    """``cfg.channels_last`` True/False forces the layout of every backbone's convolutions; None keeps the
    backbones' own default (channels-last for batches of 32 or more, see :class:`~ddcnn.models.backbone.Backbone`)."""
    if cfg.channels_last is not None:
        for module in model.modules():
            if isinstance(module, Backbone):
                module.channels_last = bool(cfg.channels_last)


@dataclass
class _EpochTally:
    """The running sums of one epoch of this process's training. A checkpoint written in the middle of the epoch
    keeps them (:meth:`partial`, its ``partial`` entry), and the epoch resumed from it goes on from them."""

    loss_sum: float = 0.0  # the loss summed over the images seen
    seen: int = 0  # images seen
    correct: torch.Tensor | None = None  # images classified correctly: a scalar, or one number per subdomain
    seconds: float = 0.0  # training time of the epoch before this run of it (resumed) and, once finished, in all
    start: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def resumed(cls, partial: dict[str, Any], device: torch.device) -> _EpochTally:
        """The tally of an epoch that a checkpoint's ``partial`` entry interrupted (empty: a fresh epoch)."""
        correct = partial.get("correct")
        return cls(
            partial.get("loss_sum", 0.0),
            partial.get("seen", 0),
            correct.to(device) if correct is not None else None,
            partial.get("seconds", 0.0),
        )

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one step's batch."""
        with torch.no_grad():
            hits = correct_predictions(logits, y)
            self.correct = hits if self.correct is None else self.correct + hits
        self.loss_sum += float(loss.detach()) * len(y)
        self.seen += len(y)

    def elapsed(self) -> float:
        """The epoch's training time so far."""
        return self.seconds + time.perf_counter() - self.start

    def postfix(self) -> dict[str, str]:
        """The progress bar's numbers: running loss, accuracy and speed."""
        return {
            "loss": f"{self.loss_sum / self.seen:.3f}",
            "acc": f"{float(self.correct.float().mean()) / self.seen:.3f}",
            "img_s": f"{self.seen / self.elapsed():.0f}",
        }

    def partial(self) -> dict[str, Any]:
        """What a checkpoint written now keeps of the epoch, for :meth:`resumed`."""
        return {"loss_sum": self.loss_sum, "seen": self.seen, "correct": self.correct.cpu(), "seconds": self.elapsed()}

    def finish(self) -> float:
        """End the epoch's clock: the seconds since :attr:`start`, which :attr:`seconds` now includes."""
        elapsed = time.perf_counter() - self.start
        self.seconds += elapsed
        return elapsed


# Trainer.epoch_end: called with the trainer and the epoch's log row after every epoch; True ends training
EpochEnd = Callable[["Trainer", dict[str, Any]], "bool | None"]


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_per_second: float = 0.0


@dataclass
class Trainer:
    """Trains ``model`` for ``epochs`` with checkpoints in ``checkpoint`` and one CSV row per epoch in ``log_csv``.

    ``spec`` and ``config`` are stored in every checkpoint: what the model is
    (:meth:`ddcnn.models.ModelSpec.to_dict`) and the resolved run config.
    ``save`` is False on processes that must not write (non-primary ranks). ``parameters`` restricts training
    to some parameters (the rest stay frozen). ``parallel`` (default: one process, :meth:`Parallel.single`):
    ``model`` is this process's share of a model placed on the processes by ``parallel`` (see
    :class:`ddcnn.distributed.Parallel`). With several processes, every process runs ``fit`` on the same data (its
    share of each batch from ``train_loader``, every validation image), the logged numbers are the whole model's,
    the checkpoint is the one a single process would write, and checkpoints are written at epoch ends only.
    ``epoch_end(trainer, row)``, if given, is called after every epoch (trained, validated, checkpointed and logged)
    with that epoch's log row; its time is not training time, and returning True ends training after that epoch
    (in a distributed run every process must return the same). ``callbacks`` receive the events of
    :class:`~ddcnn.train.callbacks.Callback`. ``class_weights`` (``(K,)``) weight the training loss
    (:func:`~ddcnn.train.evaluation.classification_loss`); required, and only taken, with ``cfg.class_weights``
    other than none (:func:`~ddcnn.train.evaluation.training_class_weights` of the training labels).
    """

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    epochs: int
    checkpoint: Path | None = None
    log_csv: Path | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    desc: str = "train"
    save: bool = True
    parameters: list[tuple[str, nn.Parameter]] | None = None
    parallel: Parallel | None = None  # None: Parallel.single, set in __post_init__
    checkpoint_extra: Callable[[], dict[str, Any]] | None = None
    epoch_end: EpochEnd | None = None
    callbacks: Sequence[Callback] = ()
    check_resumed: Callable[[dict[str, Any]], None] | None = None  # called with a checkpoint before resuming it
    class_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.class_weights = checked_class_weights(self.cfg, self.class_weights, self.device, self.desc)
        placed = self.parallel is not None  # on the processes of a run (not, e.g., an aggregator every rank trains)
        if self.parallel is None:
            self.parallel = Parallel.single(device=self.device)
        set_backbone_channels_last(self.model, self.cfg)
        self.optimizer = build_optimizer(self.parameters or self.model.named_parameters(), self.cfg)
        self._params = [param for group in self.optimizer.param_groups for param in group["params"]]
        # data parallelism: DDP's replica of the model in this rank's data-parallel group (the model itself where
        # that is this rank alone), which averages the gradients during backward
        self._replicas = self.parallel.replicate(self.model, self._params, self.cfg, self.desc if placed else None)
        # the forward of training and validation; compiled once per Trainer (the first steps pay for it). The
        # checkpoints keep ``self.model``'s state dict, whose keys DDP's and torch.compile's wrappers would prefix
        module = self._replicas.module
        self._forward: nn.Module = torch.compile(module) if self.cfg.compile else module
        self._scaler = grad_scaler(self.cfg, self.device)  # float16 autocast only
        self.scheduler = None  # built in fit(), when the steps per epoch are known
        self.history: list[dict[str, Any]] = []
        self.epoch, self.step = 0, 0  # next epoch to run, steps already done in it
        self._partial: dict[str, Any] = {}  # the tally of the epoch a mid-epoch checkpoint interrupted
        self.train_seconds = 0.0
        self._callbacks = CallbackList(self.callbacks)

    # checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self._scaler.state_dict() if self._scaler else None,
            "epoch": self.epoch,
            "step": self.step,
            "partial": self._partial,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "rng": rng_state(),
            "spec": self.spec,
            "config": self.config,
            "finished": self.epoch >= self.epochs,
        }
        if self.checkpoint_extra:
            state.update(self.checkpoint_extra())
        return state

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        state = self.parallel.gather_state(self.state_dict(), self.model, self.optimizer)
        if self.save:
            save_checkpoint(state, self.checkpoint)
        self.parallel.ctx.barrier()  # the checkpoint is there for every process to read

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if self.check_resumed is not None:
            self.check_resumed(state)
        state = self.parallel.local_state(state, self.model, self.optimizer)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self._scaler is not None:
            self._scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self._partial = state.get("partial") or {}
        self.history = list(state.get("history", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        set_rng_state(state["rng"])
        log.info("resumed %s from %s at epoch %d, step %d", self.desc, path, self.epoch + 1, self.step)

    # training ------------------------------------------------------------------------------------------------
    def fit(self, train_loader, val_loader=None, resume: bool = False) -> FitResult:
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise DDCNNError(
                f"{self.desc}: the training split has fewer images than one batch; lower --batch-size"
            )
        optimizer_steps = -(-steps_per_epoch // self.cfg.accumulate)  # with --accumulate, per epoch
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.epochs * optimizer_steps)
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            self.load_checkpoint(self.checkpoint)
        self._replicas.plan(self.epochs * optimizer_steps, self.scheduler.last_epoch)
        # every process starts its first epoch's clock together: a rank that loaded its data sooner would otherwise
        # count the others' loading as its first epoch
        self.parallel.ctx.barrier()
        self._callbacks.on_fit_start(self)
        with StopOnSignal() as stop:
            while self.epoch < self.epochs:
                sent = self.parallel.communication.total
                row = self._train_epoch(train_loader, stop)
                self.parallel.sync_buffers(self.model)
                if val_loader is not None:
                    val = evaluate(self._forward, val_loader, self.cfg, self.device, parallel=self.parallel)
                    row.update(val_loss=val.loss, val_accuracy=val.accuracy)
                    if val.subdomain_accuracy is not None and len(val.subdomain_accuracy) > 1:
                        row["val_subdomain_accuracy"] = val.subdomain_accuracy
                row["comm_bytes_per_epoch"] = self.parallel.communication.total - sent
                self.history.append(row)
                self.epoch, self.step, self._partial = self.epoch + 1, 0, {}
                if self.epoch % self.cfg.checkpoint_every == 0 or self.epoch == self.epochs:
                    self.save_checkpoint()
                self._log_row(row)
                stop_now = self._callbacks.on_epoch_end(self, row)
                if (self.epoch_end is not None and self.epoch_end(self, row)) or stop_now:
                    break
        seen = sum(r["images"] for r in self.history)
        result = FitResult(self.history, self.train_seconds, seen / max(self.train_seconds, 1e-9))
        self._callbacks.on_fit_end(self, result)
        return result

    def _train_epoch(self, loader, stop: StopOnSignal) -> dict[str, Any]:
        """One epoch (from step :attr:`step` where resumed mid-epoch): the steps, and the bookkeeping around them;
        returns the epoch's log row."""
        self.model.train()
        loader.set_epoch(self.epoch)
        sent, first_step = self.parallel.communication.total, self.step
        bar = tqdm(
            total=len(loader),
            initial=self.step,
            desc=f"{self.desc} {self.epoch + 1}/{self.epochs}",
            leave=False,
            # None: tqdm turns itself off where stderr is no terminal (piped logs, SLURM .out files)
            disable=None if (self.cfg.progress and self.save) else True,
        )
        tally = _EpochTally.resumed(self._partial, self.device)
        accumulate, steps = self.cfg.accumulate, len(loader)
        for step, (x, y) in enumerate(loader):
            if step < self.step:  # resumed mid-epoch: these batches were trained before the interruption
                continue
            start = step - step % accumulate  # the first micro-batch of this optimizer step (--accumulate)
            group = min(accumulate, steps - start)
            loss, logits = self._step(x, y, group=group, first=step == start, last=step + 1 == start + group)
            tally.add(loss, logits, y)
            self.step = step + 1
            self._callbacks.on_step_end(self)
            bar.update(1)
            if self.step % 10 == 0 or self.step == steps:
                bar.set_postfix(tally.postfix())
            # a signal stops after an optimizer step: the gradients summed so far are in no checkpoint
            if stop.requested is not None and self.step == start + group:
                bar.close()
                self._stop(stop.requested, tally)
        bar.close()
        step_bytes = (self.parallel.communication.total - sent) / max(self.step - first_step, 1)
        return self._epoch_row(tally, step_bytes)

    def _step(
        self, x: torch.Tensor, y: torch.Tensor, group: int = 1, first: bool = True, last: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step on the batch ``(x, y)``: forward, loss (refused where not finite), backward (during
        which DDP averages the gradients over the data-parallel group, bucket by bucket), the gradients clipped,
        then the optimizer's and the schedule's step. Returns the loss and the logits.

        With gradient accumulation (``cfg.accumulate``), ``(x, y)`` is one of the ``group`` micro-batches of an
        optimisation step: the gradients are zeroed at the ``first``, each backpropagates ``loss / group`` (so that
        the sum is the gradient of the mean loss over the step's images, as for one batch of them all), and the
        gradients summed so far are averaged (DDP's ``no_sync`` before), clipped and applied at the ``last``."""
        cfg = self.cfg
        x = to_memory_format(x, cfg, self.device)
        with self._replicas.micro_batch(sync=last):  # forward and backward: DDP decides in forward to average
            with autocast(cfg, self.device):
                logits = self._forward(x)
            loss = classification_loss(logits, y, cfg.label_smoothing, self.class_weights)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"{self.desc}: the loss became {float(loss.detach())} at epoch {self.epoch + 1}, step "
                    f"{self.step + 1}; the last good checkpoint {self.checkpoint} is kept; lower the learning rate or "
                    "set grad_clip"
                )
            if first:
                self.optimizer.zero_grad(set_to_none=True)
            share = loss / group if group > 1 else loss
            (self._scaler.scale(share) if self._scaler else share).backward()
        if not last:
            return loss, logits
        if self._scaler:
            self._scaler.unscale_(self.optimizer)  # clip the true gradients; a step with inf/NaN ones is skipped
        if cfg.grad_clip:
            self.parallel.clip_grad_norm_(self.model, self._params, cfg.grad_clip)
        if self._scaler:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return loss, logits

    def _stop(self, signum: int, tally: _EpochTally) -> NoReturn:
        """End training on a signal, after the step it arrived in. One process saves a checkpoint of this very
        step; several processes stop at different steps, so that only the epochs' checkpoints are consistent."""
        where = f"{self.desc}: stopped by signal {signum} at epoch {self.epoch + 1}, step {self.step}"
        if self.parallel.ctx.distributed:
            raise TrainingInterrupted(
                f"{where}; run again with --resume to continue from the last epoch's checkpoint {self.checkpoint}",
                signum,
            )
        self._partial = tally.partial()
        self.save_checkpoint()
        raise TrainingInterrupted(
            f"{where}; checkpoint saved to {self.checkpoint}; run again with --resume to continue", signum
        )

    def _epoch_row(self, tally: _EpochTally, step_bytes: float) -> dict[str, Any]:
        """The log row of a finished epoch, with the whole model's numbers (waiting for the slowest process to
        reduce them is training time)."""
        loss, acc = tally.loss_sum / max(tally.seen, 1), tally.correct.float().cpu() / max(tally.seen, 1)
        loss, acc = self.parallel.reduce_metrics(loss, acc)
        seen = tally.seen * self.parallel.shard[1]
        self.train_seconds += tally.finish()
        row: dict[str, Any] = {
            "phase": self.desc,
            "epoch": self.epoch + 1,
            "train_loss": loss,
            "train_accuracy": float(acc.mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": tally.seconds,
            "images": seen,
            "images_per_second": seen / max(tally.seconds, 1e-9),
        }
        if acc.dim() == 1 and len(acc) > 1:
            row["train_subdomain_accuracy"] = acc.tolist()
        row["comm_bytes_per_step"] = step_bytes
        return row

    def _log_row(self, row: dict[str, Any]) -> None:
        text = (
            f"{self.desc} epoch {row['epoch']}/{self.epochs}: "
            f"loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
        )
        if "val_accuracy" in row:
            text += f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
        text += f" | {row['images_per_second']:.0f} img/s"
        if self.parallel.ctx.distributed:
            text += (
                f" | sent {format_bytes(row['comm_bytes_per_step'])}/step, "
                f"{format_bytes(row['comm_bytes_per_epoch'])}/epoch"
            )
        log.info(text)
        if self.save and self.log_csv is not None:
            write_csv(self.log_csv, self.history)  # the whole history: the CSV always matches the checkpoint
