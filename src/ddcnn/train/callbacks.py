"""Callbacks: the events of training, for loggers (TensorBoard, W&B, MLflow) and tools of your own.

Subclass :class:`Callback`, override the events you need, and pass instances to ``ddcnn.methods.run(cfg,
callbacks=[...])``, ``ddcnn.compare.compare(cc, callbacks=[...])`` or ``ddcnn.cli.main(argv, callbacks=[...])``.
Every phase (``trainer.desc``: ``global``, ``local``, ``dnn``, ``coherent``...) is one fit of a
:class:`~ddcnn.train.engine.Trainer`, and every event receives that trainer: ``trainer.epoch`` (epochs done),
``trainer.step`` (steps done in the current epoch), ``trainer.model``, ``trainer.history``. In a distributed run
every process calls them; ``trainer.save`` is True on the one process that writes (rank 0).

Example, a logger of every epoch's numbers::

    class PrintEpochs(Callback):
        def on_epoch_end(self, trainer, row):
            print(trainer.desc, row["epoch"], row["train_loss"], row.get("val_accuracy"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import FitResult, Trainer


class Callback:
    """The events of a phase's training; each does nothing unless overridden."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first epoch (after a resumed checkpoint was loaded)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (``trainer.step`` steps of epoch ``trainer.epoch + 1`` are done); its time
        counts as training time, so keep it short."""

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> bool | None:
        """After each epoch is trained, validated, checkpointed and logged, with its log ``row``. Returning True
        ends training after this epoch (in a distributed run, every process must return the same)."""
        return None

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        """After the last epoch (or the one a callback ended training at)."""


class CallbackList(Callback):
    """Several callbacks as one, called in order; training ends after an epoch if any of them says so."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_fit_start(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_fit_start(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        for callback in self.callbacks:
            callback.on_step_end(trainer)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> bool:
        return any([bool(callback.on_epoch_end(trainer, row)) for callback in self.callbacks])  # every one is called

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        for callback in self.callbacks:
            callback.on_fit_end(trainer, result)
