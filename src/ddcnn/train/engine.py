"""The training loop every mode uses: optimiser, schedule, epochs, evaluation, checkpoints and resume.

Models return logits ``(B, K)`` (a global CNN, a CNN-DNN, an aggregator) or ``(B, N, K)`` (N local CNNs, each
predicting the class of the whole image). For ``(B, N, K)`` the loss is the *sum* over subdomains of each local
CNN's mean cross-entropy, so each local CNN gets exactly the gradient it would get if it were trained alone.

Determinism: the data order and augmentation of an epoch depend only on (seed, epoch) (see ``ddcnn.data``), and
checkpoints hold every RNG state, so a run resumed from any checkpoint, even one written mid-epoch on SIGTERM,
continues exactly as the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import ConfigError, DDCNNError, TrainingDivergedError
from ..models.backbone import Backbone
from ..runtime import at_least_float32, autocast, compute_dtype, use_channels_last
from .callbacks import Callback, CallbackList
from ..checkpoint import atomic_write_text, load_checkpoint, rng_state, save_checkpoint, set_rng_state

if TYPE_CHECKING:
    from ..distributed import Parallel

log = logging.getLogger("ddcnn")


class TrainingInterrupted(DDCNNError):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# -- set-up -----------------------------------------------------------------------------------------------------


def set_backbone_channels_last(model: nn.Module, cfg: TrainConfig) -> None:
    """``cfg.channels_last`` True/False forces the layout of every backbone's convolutions; None keeps the
    backbones' own default (channels-last for batches of 32 or more, see :class:`~ddcnn.models.backbone.Backbone`)."""
    if cfg.channels_last is not None:
        for module in model.modules():
            if isinstance(module, Backbone):
                module.channels_last = bool(cfg.channels_last)


def classification_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy; for ``(B, N, K)`` logits the sum over subdomains of each local CNN's mean loss."""
    if logits.dim() == 3:
        b, n, k = logits.shape
        total = F.cross_entropy(
            at_least_float32(logits.reshape(b * n, k)), y.repeat_interleave(n), label_smoothing=label_smoothing, reduction="sum"
        )
        return total / b
    return F.cross_entropy(at_least_float32(logits), y, label_smoothing=label_smoothing)


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; weight decay on weight matrices and kernels only (not biases, norms).

    The fused implementation (one pass over each parameter, its gradient and its state) is used wherever torch
    has one (floating-point parameters on CPU or CUDA): on CPU it makes SGD's step about 3x faster than torch's
    default per-parameter loop (benchmarks/README.md), with the same update and the same state dict.
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if p.dim() > 1 and not name.endswith("bias") else no_decay).append(p)
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + no_decay) or None
    if cfg.optimizer == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-step schedule: ``onecycle`` (linear warm-up, linear decay to 0), ``cosine`` (warm-up, cosine), ``constant``."""
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    total_steps = max(total_steps, warmup + 1)

    def onecycle(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return max(0.0, (total_steps - step) / (total_steps - warmup))

    def cosine(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total_steps - warmup))))

    schedules: dict[str, Callable[[int], float]] = {"onecycle": onecycle, "cosine": cosine, "constant": lambda s: 1.0}
    if cfg.schedule not in schedules:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(schedules)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules[cfg.schedule])


# -- one epoch --------------------------------------------------------------------------------------------------


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

    With ``parallel``, ``model`` is this process's share of a distributed model, every process evaluates the same
    ``loader``, and the result is the whole model's (all subdomains' probabilities gathered).
    """
    was_training = model.training
    model.eval()
    loss_sum, seen, correct = 0.0, 0, None
    probs, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress):
        x = _to_memory_format(x, cfg, device)
        with autocast(cfg, device):
            logits = model(x)
        logits = at_least_float32(logits)
        loss_sum += float(classification_loss(logits, y)) * len(y)
        hits = (logits.argmax(-1) == (y[:, None] if logits.dim() == 3 else y)).sum(0)
        correct = hits if correct is None else correct + hits
        seen += len(y)
        if collect:
            probs.append(logits.softmax(-1).cpu())
            labels.append(y.cpu())
    model.train(was_training)
    if seen == 0:
        raise DDCNNError("evaluation saw no images; the split is empty, use a larger dataset or fraction")
    loss, acc = loss_sum / seen, (correct.float() / seen).cpu()
    probabilities = torch.cat(probs) if collect else None
    if parallel is not None:
        loss, acc = parallel.reduce_metrics(loss, acc)
        if probabilities is not None and probabilities.dim() == 3:
            probabilities = parallel.gather(probabilities)
    return EvalResult(
        loss=loss,
        accuracy=float(acc.mean()),
        subdomain_accuracy=acc.tolist() if acc.dim() == 1 else None,
        probabilities=probabilities,
        labels=torch.cat(labels) if collect else None,
    )


def _to_memory_format(x: torch.Tensor, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """A batch as the model takes it: in ``cfg.dtype`` (images arrive in float32) and, if so configured,
    channels-last."""
    x = x.to(compute_dtype(cfg)) if x.is_floating_point() else x
    if x.dim() == 4 and use_channels_last(cfg, device):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class _StopOnSignal:
    """Turns SIGTERM/SIGINT into a flag that the loop checks between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- the loop ---------------------------------------------------------------------------------------------------


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
    to some parameters (the rest stay frozen). ``parallel``: ``model`` is this process's share of a model trained
    by several processes (see :class:`ddcnn.distributed.Parallel`); then every process runs ``fit`` on the same
    data (its share of each batch from ``train_loader``, every validation image), the logged numbers are the whole
    model's, the checkpoint is the one a single process would write, and checkpoints are written at epoch ends only.
    ``epoch_end(trainer, row)``, if given, is called after every epoch (trained, validated, checkpointed and logged)
    with that epoch's log row; its time is not training time, and returning True ends training after that epoch
    (in a distributed run every process must return the same). ``callbacks`` receive the events of
    :class:`~ddcnn.train.callbacks.Callback`.
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
    parallel: Parallel | None = None
    checkpoint_extra: Callable[[], dict[str, Any]] | None = None
    epoch_end: EpochEnd | None = None
    callbacks: Sequence[Callback] = ()
    check_resumed: Callable[[dict[str, Any]], None] | None = None  # called with a checkpoint before resuming it

    def __post_init__(self) -> None:
        set_backbone_channels_last(self.model, self.cfg)
        # the forward of training and validation; compiled once per Trainer (the first steps pay for it). The
        # checkpoints keep ``self.model``'s state dict, whose keys torch.compile's wrapper would prefix
        self._forward: nn.Module = torch.compile(self.model) if self.cfg.compile else self.model
        self.optimizer = build_optimizer(self.parameters or self.model.named_parameters(), self.cfg)
        self.scheduler = None  # built in fit(), when the steps per epoch are known
        self.history: list[dict[str, Any]] = []
        self.epoch, self.step = 0, 0  # next epoch to run, steps already done in it
        self._partial: dict[str, Any] = {}
        self.train_seconds = 0.0
        self._callbacks = CallbackList(self.callbacks)

    # checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
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
        state = self.state_dict()
        if self.parallel is not None:
            state = self.parallel.gather_state(state, self.model, self.optimizer)
        if self.save:
            save_checkpoint(state, self.checkpoint)
        if self.parallel is not None:
            self.parallel.ctx.barrier()  # the checkpoint is there for every process to read

    def load_checkpoint(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if self.check_resumed is not None:
            self.check_resumed(state)
        if self.parallel is not None:
            state = self.parallel.local_state(state, self.model, self.optimizer)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
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
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.epochs * steps_per_epoch)
        if resume and self.checkpoint is not None and self.checkpoint.exists():
            self.load_checkpoint(self.checkpoint)
        self._callbacks.on_fit_start(self)
        with _StopOnSignal() as stop:
            while self.epoch < self.epochs:
                sent = self._bytes_sent()
                row = self._train_epoch(train_loader, stop)
                if self.parallel is not None:
                    self.parallel.sync_buffers(self.model)
                if val_loader is not None:
                    val = evaluate(self._forward, val_loader, self.cfg, self.device, parallel=self.parallel)
                    row.update(val_loss=val.loss, val_accuracy=val.accuracy)
                    if val.subdomain_accuracy is not None and len(val.subdomain_accuracy) > 1:
                        row["val_subdomain_accuracy"] = val.subdomain_accuracy
                if self.parallel is not None:
                    row["comm_bytes_per_epoch"] = self._bytes_sent() - sent
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

    def _train_epoch(self, loader, stop: _StopOnSignal) -> dict[str, Any]:
        model, cfg, device = self.model, self.cfg, self.device
        model.train()
        loader.set_epoch(self.epoch)
        p = self._partial
        loss_sum, seen = p.get("loss_sum", 0.0), p.get("seen", 0)
        correct = p.get("correct")
        correct = correct.to(device) if correct is not None else None
        seconds = p.get("seconds", 0.0)
        params = [param for group in self.optimizer.param_groups for param in group["params"]]
        sent, first_step = self._bytes_sent(), self.step
        bar = tqdm(
            total=len(loader),
            initial=self.step,
            desc=f"{self.desc} {self.epoch + 1}/{self.epochs}",
            leave=False,
            disable=not (cfg.progress and self.save),
        )
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader):
            if step < self.step:  # resumed mid-epoch: these batches were trained before the interruption
                continue
            x = _to_memory_format(x, cfg, device)
            with autocast(cfg, device):
                logits = self._forward(x)
            loss = classification_loss(logits, y, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"{self.desc}: the loss became {float(loss.detach())} at epoch {self.epoch + 1}, step {step + 1}; "
                    f"the last good checkpoint {self.checkpoint} is kept; lower the learning rate or set grad_clip"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.parallel is not None:
                self.parallel.sync_gradients(params)
            if cfg.grad_clip and self.parallel is not None:
                self.parallel.clip_grad_norm_(self.model, params, cfg.grad_clip)
            elif cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                hits = (logits.argmax(-1) == (y[:, None] if logits.dim() == 3 else y)).sum(0)
                correct = hits if correct is None else correct + hits
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            self.step = step + 1
            self._callbacks.on_step_end(self)
            bar.update(1)
            if self.step % 10 == 0 or self.step == len(loader):
                elapsed = seconds + time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.3f}",
                    acc=f"{float(correct.float().mean()) / seen:.3f}",
                    img_s=f"{seen / elapsed:.0f}",
                )
            if stop.requested is not None and self.parallel is not None and self.parallel.ctx.distributed:
                bar.close()  # the processes stop at different steps: only the epochs' checkpoints are consistent
                raise TrainingInterrupted(
                    f"{self.desc}: stopped by signal {stop.requested} at epoch {self.epoch + 1}, step {self.step}; "
                    f"run again with --resume to continue from the last epoch's checkpoint {self.checkpoint}",
                    stop.requested,
                )
            if stop.requested is not None:
                self._partial = {
                    "loss_sum": loss_sum,
                    "seen": seen,
                    "correct": correct.cpu(),
                    "seconds": seconds + time.perf_counter() - start,
                }
                self.save_checkpoint()
                bar.close()
                raise TrainingInterrupted(
                    f"{self.desc}: stopped by signal {stop.requested} at epoch {self.epoch + 1}, step {self.step}; "
                    f"checkpoint saved to {self.checkpoint}; run again with --resume to continue",
                    stop.requested,
                )
        bar.close()
        step_bytes = (self._bytes_sent() - sent) / max(self.step - first_step, 1)
        loss, acc = loss_sum / max(seen, 1), correct.float().cpu() / max(seen, 1)
        if self.parallel is not None:  # the whole model's numbers; waiting for the slowest process is training time
            loss, acc = self.parallel.reduce_metrics(loss, acc)
            seen *= self.parallel.shard[1]
        elapsed = time.perf_counter() - start
        seconds += elapsed
        self.train_seconds += elapsed
        row: dict[str, Any] = {
            "phase": self.desc,
            "epoch": self.epoch + 1,
            "train_loss": loss,
            "train_accuracy": float(acc.mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images": seen,
            "images_per_second": seen / max(seconds, 1e-9),
        }
        if acc.dim() == 1 and len(acc) > 1:
            row["train_subdomain_accuracy"] = acc.tolist()
        if self.parallel is not None:
            row["comm_bytes_per_step"] = step_bytes
        return row

    def _bytes_sent(self) -> int:
        return self.parallel.communication.total if self.parallel is not None else 0

    def _log_row(self, row: dict[str, Any]) -> None:
        text = f"{self.desc} epoch {row['epoch']}/{self.epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
        if "val_accuracy" in row:
            text += f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
        text += f" | {row['images_per_second']:.0f} img/s"
        if self.parallel is not None and self.parallel.ctx.distributed:
            text += (
                f" | sent {format_bytes(row['comm_bytes_per_step'])}/step, "
                f"{format_bytes(row['comm_bytes_per_epoch'])}/epoch"
            )
        log.info(text)
        if self.save and self.log_csv is not None:
            write_csv(self.log_csv, self.history)  # the whole history: the CSV always matches the checkpoint


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 kB"`` (powers of 1000)."""
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (lists joined by spaces) to a CSV file atomically (see :func:`~ddcnn.checkpoint.atomic_file`)."""
    flat = [{k: (" ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(path, text.getvalue())
