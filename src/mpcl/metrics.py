"""Segmentation metrics: per-class IoU (NaN for absent classes) and mIoU, via torchmetrics.

mmseg's protocol: a class absent from both prediction and ground truth is NaN and left out
of the mean; a class only predicted (never in the ground truth) has IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from mpcl.data.labels import IGNORE_INDEX


def segmentation_iou(num_classes: int, ignore_index: int = IGNORE_INDEX) -> MulticlassJaccardIndex:
    """A metric whose ``compute()`` is the per-class IoU (C,), NaN where a class is absent from
    both prediction and target. ``update(preds (B, H, W) or (B, C, H, W), target (B, H, W))``."""
    return MulticlassJaccardIndex(
        num_classes, average=None, ignore_index=ignore_index, zero_division=float("nan")
    )


def miou(per_class_iou: torch.Tensor, classes: Sequence[int] | None = None) -> float:
    """nanmean of per-class IoU (C,), optionally over a subset of classes (Synthia 16/13)."""
    values = per_class_iou if classes is None else per_class_iou[list(classes)]
    return float(torch.nanmean(values.float()))


def iou_table(per_class_iou: torch.Tensor, class_names: Sequence[str]) -> list[tuple[str, float]]:
    """[(class name, IoU in %)] in class order; absent classes are NaN."""
    return [(n, 100.0 * float(v)) for n, v in zip(class_names, per_class_iou, strict=True)]
