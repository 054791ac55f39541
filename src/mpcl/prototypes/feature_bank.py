"""Class-labelled feature bank used to initialise prototypes with K-Means.

Filling policy: the bank has ``size`` slots split equally between the C classes
(``size // C`` each), each class slot is a FIFO ring buffer, and each call stores at most
``max_per_step`` randomly chosen pixels per class, so that a slot gathers features from
several images instead of the contiguous pixels of one. Features are detached. The random
choice is drawn for the union batch under DDP (``mpcl.distributed.rank_rand``), so that the
ranks' random streams stay those of one process.

Shapes: N = pixels, C = classes, D = feature channels, S = slots per class.
"""

from __future__ import annotations

import torch
from torch import nn

from mpcl.distributed import host_to_device, rank_rand


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
    def add(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Store up to ``max_per_step`` randomly chosen features of each class.

        Without a host sync (every training step calls it in queue mode): the pixels are
        grouped by class in a random order and each class writes a fixed (C, m) grid of slots,
        in which the cells past the class's pixel count keep their old value.

        Args:
            features: (N, D) features (detached here).
            labels: (N,) int64 class in [0, C) where ``mask`` is True (anything elsewhere).
            mask: (N,) bool, the pixels to store from (default: all); a mask and not a
                selection, whose data-dependent shape would make the host wait.
            generator: the CPU generator of the random picks (the learner's ``feature_bank``
                stream, ``mpcl.streams``; default: torch's global one).
        """
        num_pixels = labels.shape[0]
        if num_pixels == 0:
            return
        device = labels.device
        features = features.detach().to(self.features.dtype)
        num_classes, m = self.num_classes, self.max_per_step
        # Masked-out pixels go to an extra class C, which is never written.
        classes = labels.long()
        if mask is not None:
            classes = torch.where(mask.bool(), classes, num_classes)
        # Random keys of the union batch (as DDP ranks draw them: one process and N ranks
        # keep the same random stream), then a stable sort by class: each class's pixels in
        # a random order.
        keys = host_to_device(rank_rand(1, num_pixels, generator=generator)[0], device)  # (N,)
        order = torch.sort(keys).indices
        order = order[torch.sort(classes[order], stable=True).indices]
        per_class = torch.zeros(num_classes + 1, dtype=torch.long, device=device)
        per_class.scatter_add_(0, classes, torch.ones_like(classes))
        start = torch.cumsum(per_class, 0) - per_class  # (C + 1,) first position of a class
        taken = per_class[:num_classes].clamp(max=m)  # (C,)
        j = torch.arange(m, device=device)
        valid = j[None, :] < taken[:, None]  # (C, m)
        source = order[(start[:num_classes, None] + j[None, :]).clamp(max=num_pixels - 1)]
        rows = (self.pointer[:, None] + j[None, :]) % self.slots  # (C, m), distinct: m <= S
        cls = torch.arange(num_classes, device=device)[:, None].expand(-1, m)
        self.features[cls, rows] = torch.where(
            valid[..., None], features[source], self.features[cls, rows]
        )
        self.pointer.copy_((self.pointer + taken) % self.slots)
        self.count.copy_(torch.clamp(self.count + taken, max=self.slots))

    def get(self, class_index: int) -> torch.Tensor:
        """The stored features of one class: (count_c, D)."""
        return self.features[class_index, : int(self.count[class_index])]
