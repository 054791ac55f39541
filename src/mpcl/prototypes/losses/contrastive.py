"""Pixel-to-prototype contrastive loss (Eqs. 15 and 17).

Shapes: N = pixels, C = classes, K = prototypes per class, P = C * K.
"""

from __future__ import annotations

import torch


def contrastive_loss(
    logits: torch.Tensor,
    positive: torch.Tensor,
    weights: torch.Tensor,
    num_prototypes: int,
    in_class_negatives: bool = True,
    valid_prototypes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted InfoNCE between pixels and prototypes with one positive prototype per pixel.

    L = 1/N sum_i -w_i log( exp(l_i,+) / sum_p exp(l_i,p) ), with l = sim / tau (Eq. 17).
    The positive is the prototype the pixel is assigned to; the negatives are all other
    prototypes, including the other K - 1 prototypes of the pixel's own class. With
    ``in_class_negatives=False`` those same-class prototypes leave the denominator and
    only other classes' prototypes are negatives (Table VI, "w/o In-class Contrast").

    The sum is divided by the number of pixels N (the paper's 1/(H x W)), not by the sum of
    weights, so the quality weight scales the loss as it scales the self-training loss.

    Args:
        logits: (N, P) similarities divided by the temperature, prototype p = c * K + k.
        positive: (N,) int64 index in [0, P) of the assigned prototype.
        weights: (N,) per-pixel weight (quality weight w^M).
        num_prototypes: K, to find the prototypes of the positive's class.
        in_class_negatives: keep the positive class's other prototypes as negatives.
        valid_prototypes: (P,) bool, prototypes allowed as negatives (e.g. initialised
            classes only); the positive must be valid. None means all.

    Returns:
        Scalar loss (0 with a gradient path when N = 0).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    num_total = logits.shape[1]
    keep = torch.ones_like(logits, dtype=torch.bool)
    if valid_prototypes is not None:
        keep = keep & valid_prototypes[None, :]
    if not in_class_negatives:
        proto_class = torch.arange(num_total, device=logits.device) // num_prototypes  # (P,)
        positive_class = positive // num_prototypes  # (N,)
        same_class = proto_class[None, :] == positive_class[:, None]
        keep = keep & ~same_class
    keep = keep.scatter(1, positive[:, None], True)  # the positive always stays
    masked = logits.masked_fill(~keep, float("-inf"))
    log_prob = logits.gather(1, positive[:, None]).squeeze(1) - torch.logsumexp(masked, dim=1)
    return -(weights.to(log_prob.dtype) * log_prob).sum() / logits.shape[0]
