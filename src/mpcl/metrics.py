"""Segmentation metrics: per-class IoU (NaN for absent classes) and mIoU, via torchmetrics.

mmseg's protocol: a class absent from both prediction and ground truth is NaN and left out
of the mean; a class only predicted (never in the ground truth) has IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
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


class ClassSeparation(Metric):
    """Between- over within-class scatter of pixel features, trace(S_B) / trace(S_W) (Fisher's
    ratio): how far apart the classes of a feature space are, relative to their spread.

    ``update(features (N, D), labels (N,))`` (pixels with ``ignore_index`` or outside [0, C)
    are left out); ``compute()`` -> 0-dim float64. Only sufficient statistics are kept (per
    class: count, feature sum, sum of squared norms), summed over batches and DDP ranks.
    """

    full_state_update = False

    def __init__(self, num_classes: int, dim: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        zeros = torch.zeros
        self.add_state("count", zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sums", zeros(num_classes, dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        x = features.double()
        # Left-out pixels go to an extra, dropped class (no data-dependent shapes).
        y = torch.where((labels >= 0) & (labels < self.num_classes), labels, self.num_classes)
        c = self.num_classes + 1
        self.count += torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
            0, y, torch.ones_like(y, dtype=x.dtype)
        )[:-1]
        self.sums += torch.zeros(c, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)[
            :-1
        ]
        self.squares += torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
            0, y, (x * x).sum(1)
        )[:-1]

    def compute(self) -> torch.Tensor:
        n = self.count.clamp_min(1)[:, None]
        means = self.sums / n  # (C, D)
        overall = self.sums.sum(0) / self.count.sum().clamp_min(1)  # (D,)
        within = (self.squares - self.count * (means * means).sum(1)).sum()
        between = (self.count * ((means - overall) ** 2).sum(1)).sum()
        return between / within.clamp_min(1e-12)
