"""Class-labelled feature bank used to initialise prototypes with K-Means.

Filling policy: the bank has ``size`` slots split equally between the C classes
(``size // C`` each), each class slot is a FIFO ring buffer, and each call stores at most
``max_per_step`` randomly chosen pixels per class, so that a slot gathers features from
several images instead of the contiguous pixels of one. Features are detached.

Shapes: N = pixels, C = classes, D = feature channels, S = slots per class.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureBank(nn.Module):
    """Per-class FIFO feature bank held as buffers (saved in ``state_dict()``).

    Args:
        num_classes: C.
        dim: D.
        size: total number of stored features over all classes (paper: 20000).
        max_per_step: pixels of one class stored per ``add`` call (default: S // 10).
    """

    def __init__(
        self, num_classes: int, dim: int, size: int = 20000, max_per_step: int | None = None
    ) -> None:
        super().__init__()
        slots = size // num_classes
        if slots < 1:
            raise ValueError(
                f"feature bank size {size} gives no slot for each of {num_classes} classes; "
                f"use a size >= num_classes (paper: 20000)."
            )
        self.num_classes = num_classes
        self.dim = dim
        self.slots = slots
        if max_per_step is not None and max_per_step < 1:
            raise ValueError(f"feature bank max_per_step must be >= 1, got {max_per_step}.")
        # More than S per step would overwrite features stored in the same call.
        self.max_per_step = min(slots, max_per_step or max(1, slots // 10))
        self.register_buffer("features", torch.zeros(num_classes, slots, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store features of the labelled pixels.

        Args:
            features: (N, D) features (detached here).
            labels: (N,) int64 class in [0, C); the caller drops ignored pixels and classes
                that need no more features.
        """
        features = features.detach().to(self.features.dtype)
        for cls in torch.unique(labels).tolist():  # at most C classes
            idx = torch.nonzero(labels == cls).squeeze(1)
            idx = idx[torch.randperm(len(idx), device=idx.device)[: self.max_per_step]]
            rows = (self.pointer[cls] + torch.arange(len(idx), device=idx.device)) % self.slots
            self.features[cls, rows] = features[idx]
            self.pointer[cls] = (self.pointer[cls] + len(idx)) % self.slots
            self.count[cls] = torch.clamp(self.count[cls] + len(idx), max=self.slots)

    def get(self, class_index: int) -> torch.Tensor:
        """The stored features of one class: (count_c, D)."""
        return self.features[class_index, : int(self.count[class_index])]
