"""Teacher pseudo-labels and their quality weight (Eq. 16)."""

from __future__ import annotations

import torch

from mpcl.distributed import mean_over_ranks


@torch.no_grad()
def pseudo_label(
    logits: torch.Tensor, threshold: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and the quality weight w_T of DACS/DAFormer (Eq. 16).

    The quality weight is one scalar per batch: the share of pixels whose teacher confidence
    reaches ``threshold`` (under DDP: of the union batch); every target pixel gets it (padding and ignored frame borders,
    ``valid`` = 0, get 0). No host sync: the scalar stays on the device.

    Args:
        logits: (B, C, H, W) teacher logits at image resolution.
        threshold: theta in (0, 1) (0.968).
        valid: (B, H, W) float, 1 where the target pixel is real image, or None.

    Returns:
        labels (B, H, W) int64, weights (B, H, W) float, quality () float.
    """
    probs = torch.softmax(logits.float(), dim=1)
    confidence, labels = probs.max(dim=1)  # (B, H, W)
    quality = mean_over_ranks((confidence >= threshold).float().mean())
    weights = quality.expand_as(confidence).clone()
    if valid is not None:
        weights = weights * valid
    return labels, weights, quality
