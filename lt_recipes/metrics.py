"""Long-tail evaluation: per-class accuracy, the Many / Medium / Few split report, and its text table.

Splits follow the usual protocol on the training class counts (`class_splits`): Many > 100 images, Medium
20..100, Few < 20.
A split's accuracy is the mean of its classes' accuracies (classes absent from the evaluated set are skipped).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch

_logger = logging.getLogger(__name__)

__all__ = ["MANY_SHOT", "FEW_SHOT", "class_splits", "per_class_accuracy", "split_report", "topk_accuracy",
           "format_table"]

# Shot groups by training images per class: Many > MANY_SHOT, Few < FEW_SHOT, Medium in between (both included).
MANY_SHOT = 100
FEW_SHOT = 20


def class_splits(train_counts: Sequence[int]) -> dict[str, list[int]]:
    """Class ids per shot group: Many (> 100 training images), Medium (20..100), Few (< 20)."""
    splits: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        splits["many" if n > MANY_SHOT else "few" if n < FEW_SHOT else "medium"].append(c)
    return splits


def per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy in % of every class [num_classes], float64; nan for classes with no sample in `targets`."""
    preds, targets = torch.as_tensor(preds).flatten().cpu(), torch.as_tensor(targets).flatten().cpu().long()
    if preds.shape != targets.shape:
        raise ValueError(f"preds has {preds.numel()} entries but targets has {targets.numel()}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)][0].item()
        raise ValueError(f"target label {bad} is outside [0, {num_classes}) (num_classes={num_classes})")
    total = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.bincount(targets[preds.long() == targets], minlength=num_classes).double()
    acc = 100.0 * correct / total
    acc[total == 0] = math.nan
    return acc


def _nanmean(values: torch.Tensor) -> float:
    values = values[~values.isnan()]
    return values.mean().item() if values.numel() else math.nan


def split_report(preds: torch.Tensor, targets: torch.Tensor, train_counts: Sequence[int]) -> dict[str, Any]:
    """Top-1 over all samples, the mean per-class accuracy of each split (nan if empty), and per-class accuracy (%)."""
    acc = per_class_accuracy(preds, targets, len(train_counts))
    preds, targets = torch.as_tensor(preds).flatten().cpu(), torch.as_tensor(targets).flatten().cpu()
    top1 = 100.0 * (preds.long() == targets.long()).double().mean().item() if targets.numel() else math.nan
    report: dict[str, Any] = {"top1": top1}
    for name, classes in class_splits(train_counts).items():
        report[name] = _nanmean(acc[classes])
    report["per_class"] = acc.tolist()
    return report


def topk_accuracy(topk_preds: torch.Tensor, targets: torch.Tensor, k: int) -> float | None:
    """Top-k accuracy in % from predicted labels [N, >= k] (best first); None when fewer than k are given (fewer
    classes than k), nan for an empty set."""
    topk_preds, targets = torch.as_tensor(topk_preds).cpu(), torch.as_tensor(targets).flatten().cpu()
    if topk_preds.ndim != 2 or topk_preds.shape[0] != targets.numel():
        raise ValueError(f"topk_preds must be [N, k] for {targets.numel()} targets, got {list(topk_preds.shape)}")
    if topk_preds.shape[1] < k:
        return None
    if not targets.numel():
        return math.nan
    return 100.0 * (topk_preds[:, :k].long() == targets.long()[:, None]).any(dim=1).double().mean().item()


def format_table(report: dict[str, Any]) -> str:
    """The report as a two-line text table: Top-1 | [Top-5 |] Many | Medium | Few (n/a for an empty split)."""
    cols = [("Top-1", "top1"), ("Top-5", "top5"), ("Many", "many"), ("Medium", "medium"), ("Few", "few")]
    cols = [(title, key) for title, key in cols if key != "top5" or report.get("top5") is not None]
    cells = ["n/a" if math.isnan(report[key]) else f"{report[key]:.2f}" for _, key in cols]
    widths = [max(len(title), len(cell)) for (title, _), cell in zip(cols, cells)]
    header = " | ".join(title.rjust(w) for (title, _), w in zip(cols, widths))
    row = " | ".join(cell.rjust(w) for cell, w in zip(cells, widths))
    return f"{header}\n{row}"
