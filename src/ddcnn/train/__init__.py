"""Training: the loop every mode uses, checkpoints, metrics."""

from .callbacks import Callback
from ..checkpoint import load_checkpoint, save_checkpoint
from .engine import EvalResult, FitResult, Trainer, TrainingInterrupted, classification_loss, evaluate
from .metrics import ClassificationReport, classification_report

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
