"""Training: the loop every mode uses (``engine``), its optimiser and schedule (``optim``), evaluation and the
loss (``evaluation``), its records (``logs``), callbacks, metrics; checkpoints."""

from ..checkpoint import load_checkpoint, save_checkpoint
from .callbacks import Callback
from .engine import FitResult, Trainer
from .evaluation import EvalResult, classification_loss, evaluate
from .metrics import ClassificationReport, classification_report
from .signals import TrainingInterrupted

__all__ = [
    "Callback",
    "ClassificationReport",
    "EvalResult",
    "FitResult",
    "Trainer",
    "TrainingInterrupted",
    "classification_loss",
    "classification_report",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
]
