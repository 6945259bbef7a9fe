"""TensorBoard: a :class:`~ddcnn.train.callbacks.Callback` that writes every epoch's numbers as scalars.

::

    from ddcnn.train.tensorboard import TensorBoard
    ddcnn.methods.run(cfg, callbacks=[TensorBoard("runs/tb")])      # or: ddcnn train ... --tensorboard runs/tb
    # then: tensorboard --logdir runs/tb

Each phase's fit (``local``, ``dnn``, ``coherent``...) is one TensorBoard run, in a folder of ``log_dir`` named after
where the phase's checkpoint lies below ``run_root`` (``2x2/seed0/local`` in a ``ddcnn compare`` folder), or after
the phase (``local``, ``local_2`` for a second one) without ``run_root``. Its scalars, at step = epoch, are the
numbers of the epoch's log row: ``train_loss``, ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``lr``,
``images_per_second`` and the rest, and each subdomain's accuracy as its own scalar
(``train_subdomain_accuracy/3``). Only the process that writes checkpoints (rank 0) writes. Needs the
``tensorboard`` package: ``pip install 'ddcnn[tensorboard]'``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .callbacks import Callback

if TYPE_CHECKING:
    from .engine import FitResult, Trainer

_NOT_SCALARS = ("epoch", "phase")


class TensorBoard(Callback):
    """Writes each epoch's log row to TensorBoard event files below ``log_dir`` (see the module docstring)."""

    def __init__(self, log_dir: str | Path, run_root: str | Path | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("TensorBoard logging needs the tensorboard package; pip install 'ddcnn[tensorboard]'"
                              ) from None
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.run_root = None if run_root is None else Path(run_root).resolve()
        self._writer = None
        self._seen: Counter[str] = Counter()

    def run_name(self, trainer: Trainer) -> str:
        """The folder below :attr:`log_dir` of ``trainer``'s phase."""
        if self.run_root is not None and trainer.checkpoint is not None:
            folder = Path(trainer.checkpoint).resolve().parent
            if folder.is_relative_to(self.run_root):
                return (folder.relative_to(self.run_root) / trainer.desc).as_posix()
        self._seen[trainer.desc] += 1
        count = self._seen[trainer.desc]
        return trainer.desc if count == 1 else f"{trainer.desc}_{count}"

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.save:
            self._writer = self._writer_class(log_dir=str(self.log_dir / self.run_name(trainer)))

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, global_step=int(row["epoch"]))
        self._writer.flush()

    def on_fit_end(self, trainer: Trainer, result: FitResult) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def with_tensorboard(
    callbacks: Sequence[Callback], log_dir: str | Path | None, run_root: str | Path
) -> tuple[Callback, ...]:
    """``callbacks``, and a :class:`TensorBoard` writing below ``log_dir`` unless it is None (the CLI's
    ``--tensorboard DIR``; ``run_root`` is the run's ``--out``)."""
    return tuple(callbacks) if log_dir is None else (*callbacks, TensorBoard(log_dir, run_root=run_root))


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log row by name; a list (one per subdomain) as ``name/i``."""
    out: dict[str, float] = {}
    for name, value in row.items():
        if name in _NOT_SCALARS or isinstance(value, bool):
            continue
        if hasattr(value, "tolist"):  # a tensor or array: a number, or one per subdomain
            value = value.tolist()
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return out
