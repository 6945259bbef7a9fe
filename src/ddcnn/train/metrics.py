"""Classification metrics from labels and probabilities (pure tensor code; AUC from scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` counts, rows true class, columns predicted class."""
    idx = y_true.long() * num_classes + y_pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class ClassificationReport:
    accuracy: float
    balanced_accuracy: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]
    auc: float | None = None  # ROC AUC (binary), or macro one-vs-rest AUC (multi-class)
    loss: float | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        text = f"accuracy {self.accuracy:.4f}, balanced accuracy {self.balanced_accuracy:.4f}"
        return text + (f", AUC {self.auc:.4f}" if self.auc is not None else "")


def classification_report(
    y_true: torch.Tensor, probabilities: torch.Tensor, loss: float | None = None
) -> ClassificationReport:
    """Accuracy, balanced accuracy, per-class accuracy, confusion matrix and AUC of ``(n, K)`` probabilities.

    ``(n, N, K)`` probabilities (N local CNNs): the report of their mean over the subdomains, and in ``extra`` each
    local CNN's own ``subdomain_balanced_accuracy`` and ``subdomain_auc`` (lists in subdomain order)."""
    if probabilities.dim() == 3:
        reports = [classification_report(y_true, probabilities[:, i]) for i in range(probabilities.shape[1])]
        report = classification_report(y_true, probabilities.mean(1), loss)
        report.extra["subdomain_balanced_accuracy"] = [r.balanced_accuracy for r in reports]
        report.extra["subdomain_auc"] = [r.auc for r in reports]
        return report
    y_true = y_true.cpu().long()
    probabilities = probabilities.detach().float().cpu()
    k = probabilities.shape[1]
    pred = probabilities.argmax(1)
    cm = confusion_matrix(y_true, pred, k)
    support = cm.sum(1)
    per_class = torch.where(support > 0, cm.diag() / support.clamp(min=1), torch.nan)
    present = per_class[support > 0]
    return ClassificationReport(
        accuracy=float((pred == y_true).float().mean()) if len(y_true) else float("nan"),
        balanced_accuracy=float(present.mean()) if len(present) else float("nan"),
        per_class_accuracy=[float(v) for v in per_class],
        confusion=cm.tolist(),
        auc=_auc(y_true, probabilities),
        loss=loss,
    )


def _auc(y_true: torch.Tensor, probabilities: torch.Tensor) -> float | None:
    """ROC AUC where defined (every class present), else None."""
    from sklearn.metrics import roc_auc_score

    k = probabilities.shape[1]
    if len(torch.unique(y_true)) != k:
        return None
    p = probabilities.clamp(min=0).double()
    if k == 2:
        return float(roc_auc_score(y_true.numpy(), p[:, 1].numpy()))
    return float(roc_auc_score(y_true.numpy(), (p / p.sum(1, keepdim=True)).numpy(), multi_class="ovr"))
