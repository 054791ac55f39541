"""DAFormer's ImageNet Feature Distance: keep source "thing" features near the ImageNet ones.

The thing classes come from the label set (``thing_classes``: Cityscapes' pole..bicycle, or the
classes marked ``thing: true`` in a classes.yaml); with none the loss is off (zero, and the
frozen encoder is not run).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpcl.data.labels import IGNORE_INDEX

log = logging.getLogger(__name__)


def downscale_label_by_ratio(
    labels: torch.Tensor,
    size: tuple[int, int],
    min_ratio: float,
    num_classes: int,
) -> torch.Tensor:
    """Majority label per cell, kept only when >= ``min_ratio`` of the cell is that class.

    Args:
        labels: (B, H, W) int64 class indices in [0, num_classes), 255 = ignore.
        size: the target (h, w); H and W must be multiples of h and w.
        min_ratio: share of a cell the majority class must cover.
        num_classes: C; indices >= C count as ignore.

    Returns:
        (B, h, w) int64; cells without a class covering ``min_ratio`` of them are 255.
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    # (B, C, H, W) one-hot, ignore -> all zeros (F.one_hot would check the label range: a sync)
    one_hot = (labels[:, None] == classes).float()
    share = F.adaptive_avg_pool2d(one_hot, size)  # fraction of each class per cell
    best, cls = share.max(dim=1)
    return torch.where(best >= min_ratio, cls, torch.full_like(cls, IGNORE_INDEX))


def feature_distance_loss(
    features: torch.Tensor,
    imagenet_features: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    num_classes: int,
    min_ratio: float = 0.75,
) -> torch.Tensor:
    """Mean over masked cells of || f - f_imagenet ||_2 (per cell, over channels).

    Args:
        features: (B, D, h, w) student encoder features (last stage).
        imagenet_features: (B, D, h, w) frozen ImageNet encoder features.
        labels: (B, H, W) int64 source labels (class indices, 255 = ignore).
        classes: the thing class indices whose cells count.
        num_classes: C of the label set.

    Returns:
        scalar loss; zero (with grad) when no cell is a thing class.
    """
    dist = torch.norm(features - imagenet_features.detach(), dim=1)  # (B, h, w)
    cell_labels = downscale_label_by_ratio(labels, features.shape[-2:], min_ratio, num_classes)
    # A masked mean: no data-dependent shape, so no host sync (and no class tensor to copy).
    mask = torch.zeros_like(cell_labels, dtype=torch.bool)
    for c in classes:
        mask = mask | (cell_labels == c)
    mask = mask.to(dist.dtype)
    return (dist * mask).sum() / mask.sum().clamp(min=1.0)


class FeatureDistance(nn.Module):
    """DAFormer's ImageNet Feature Distance with its own frozen copy of the ImageNet encoder.

    Built by Hydra as a partial and completed by the UDA module with the student's encoder
    at construction (its ImageNet initialisation), which is copied and frozen here.

    Args:
        encoder: the student's encoder before training (copied; never trained).
        weight: lambda_FD (DAFormer: 0.005).
        num_classes: C of the label set (``${num_classes}``).
        classes: the thing class indices whose features are kept near ImageNet's (the label
            set's ``thing_classes``); empty turns the loss off.
        min_ratio: share of a feature cell one thing class must cover to count (0.75).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        classes: Sequence[int],
        weight: float = 0.005,
        min_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"uda.feature_distance.weight={weight} must be >= 0")
        bad = [c for c in classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(
                f"uda.feature_distance.classes {bad} are not class indices of the "
                f"{num_classes}-class label set"
            )
        if not classes:
            log.warning(
                "the label set has no thing classes: the ImageNet Feature Distance is off (mark "
                "classes `thing: true` in classes.yaml to use it, or set uda.feature_distance=null)"
            )
        self.encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.weight = weight
        self.min_ratio = min_ratio
        self.num_classes = int(num_classes)
        self.classes = tuple(int(c) for c in classes)

    def train(self, mode: bool = True) -> FeatureDistance:
        super().train(mode)
        self.encoder.eval()  # a fixed reference: no dropout or drop-path, ever
        return self

    def forward(
        self, features: torch.Tensor, encoder_input: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Unweighted loss of the student's last-stage features (B, D, h, w), given the
        normalised images (B, 3, H', W') that produced them and source labels (B, H, W).
        Zero (with grad) when the label set has no thing classes."""
        if not self.classes:
            return features.sum() * 0.0
        with torch.no_grad():
            imagenet = self.encoder(encoder_input)[-1]
        return feature_distance_loss(
            features, imagenet, labels, self.classes, self.num_classes, self.min_ratio
        )
