"""Classification metrics from logits: accuracy, top-5, per-class precision/recall/F1, confusion.

The numbers come from torchmetrics; this module only arranges them into a report.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Everything `cnnlab evaluate` prints and writes to eval.json."""
    n = len(class_names)
    preds = logits.argmax(1)
    kw = {"num_classes": n, "average": "none", "zero_division": 0}
    precision = multiclass_precision(preds, labels, **kw)
    recall = multiclass_recall(preds, labels, **kw)
    f1 = multiclass_f1_score(preds, labels, **kw)
    support = torch.bincount(labels, minlength=n)
    report: dict[str, Any] = {
        "accuracy": (preds == labels).float().mean().item(),
        "top5_accuracy": multiclass_accuracy(logits, labels, num_classes=n, top_k=5, average="micro").item()
        if n > 5 else None,
        "images": len(labels),
        "macro_f1": f1[support > 0].mean().item() if (support > 0).any() else 0.0,
        "per_class": [
            {"class": name, "precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
             "support": int(support[i])}
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": multiclass_confusion_matrix(preds, labels, num_classes=n).tolist(),
    }
    return report


def format_report(report: dict[str, Any], class_names: list[str]) -> str:
    """A plain-text rendering: headline numbers, per-class table, confusion matrix."""
    lines = [f"accuracy (top-1): {report['accuracy']:.4f}  ({report['images']} images)"]
    if report.get("top5_accuracy") is not None:
        lines.append(f"top-5 accuracy:   {report['top5_accuracy']:.4f}")
    lines.append(f"macro F1:         {report['macro_f1']:.4f}")
    width = max(8, *(len(c) for c in class_names))
    lines += ["", f"{'class':<{width}}  precision  recall     f1  support"]
    for row in report["per_class"]:
        lines.append(f"{row['class']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
                     f"{row['f1']:.4f}  {row['support']:7d}")
    if len(class_names) <= 20:
        matrix = report["confusion_matrix"]
        cell = max(5, len(str(max(max(r) for r in matrix))) + 1)
        short = [c[:cell - 1] for c in class_names]
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * width + "".join(f"{s:>{cell}}" for s in short)]
        for name, row in zip(class_names, matrix):
            lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)
