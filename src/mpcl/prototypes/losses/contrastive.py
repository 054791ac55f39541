"""Pixel-to-prototype contrastive loss (Eqs. 15 and 17).

Shapes: N = pixels, C = classes, K = prototypes per class, P = C * K.
"""

from __future__ import annotations

import torch


def contrastive_loss(
    similarity: torch.Tensor,
    positive: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    valid_classes: torch.Tensor | None = None,
    *,
    in_class_negatives: bool = True,
    num_pixels: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Weighted InfoNCE between pixels and prototypes with one positive prototype per pixel.

    L = 1/N sum_i -w_i log( exp(l_i,+) / sum_p exp(l_i,p) ), with l = sim / tau (Eq. 17).
    The positive is the prototype the pixel is assigned to; the negatives are all other
    prototypes, including the other K - 1 prototypes of the pixel's own class. With
    ``in_class_negatives=False`` those same-class prototypes leave the denominator and
    only other classes' prototypes are negatives (Table VI, "w/o In-class Contrast").

    The sum is divided by the number of pixels N (the paper's 1/(H x W)), not by the sum of
    weights, so the quality weight scales the loss as it scales the self-training loss.
    Rows of weight 0 add nothing: a caller may pass all pixels with 0 on those that do not
    take part, and their count as ``num_pixels`` (no selection, so no host sync).

    Args:
        similarity: (N, C, K) pixel-to-prototype similarities; prototype p = c * K + k.
        positive: (N,) int64 index in [0, C * K) of the assigned prototype.
        weights: (N,) per-pixel weight (quality weight w^M).
        temperature: tau > 0.
        valid_classes: (C,) bool, classes whose prototypes take part (initialised ones);
            the positive's class must be valid. None means all.
        in_class_negatives: keep the positive class's other prototypes as negatives.
        num_pixels: the N that divides the sum (default: the rows passed).

    Returns:
        Scalar loss (0 with a gradient path when N = 0).
    """
    if similarity.shape[0] == 0:
        return similarity.sum() * 0.0
    K = similarity.shape[2]
    logits = similarity.flatten(1) / temperature  # (N, C * K)
    num_total = logits.shape[1]
    keep = torch.ones_like(logits, dtype=torch.bool)
    if valid_classes is not None:  # rows of weight 0 keep every logit: finite, whatever
        valid = valid_classes.repeat_interleave(K)[None, :]  # their (meaningless) positive
        keep = keep & (valid | (weights == 0)[:, None])
    if not in_class_negatives:
        proto_class = torch.arange(num_total, device=logits.device) // K  # (P,)
        positive_class = positive // K  # (N,)
        same_class = proto_class[None, :] == positive_class[:, None]
        keep = keep & ~same_class
    keep = keep.scatter(1, positive[:, None], True)  # the positive always stays
    masked = logits.masked_fill(~keep, float("-inf"))
    log_prob = logits.gather(1, positive[:, None]).squeeze(1) - torch.logsumexp(masked, dim=1)
    n = logits.shape[0] if num_pixels is None else num_pixels
    return -(weights.to(log_prob.dtype) * log_prob).sum() / n
