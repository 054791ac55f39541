"""Prototype consistency loss (Eqs. 11-12): the prototype classifier must agree with the labels.

Shapes: N = pixels, C = classes, K = prototypes per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_scores(similarity: torch.Tensor) -> torch.Tensor:
    """Class similarity g(c, F) = max_k sim(p_k^(c), F) (Eq. 11).

    Args:
        similarity: (N, C, K).

    Returns:
        (N, C).
    """
    return similarity.max(dim=2).values


def consistency_loss(
    similarity: torch.Tensor,
    positive: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    valid_classes: torch.Tensor | None = None,
    *,
    num_pixels: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of the prototype posterior P(c | F) = softmax_c(g(c, F) / tau).

    Eq. 12 against the (mixed) labels at feature resolution, i.e. the class of each pixel's
    assigned prototype. Weighted by the per-pixel quality weight like the self-training loss
    on the same labels, divided by N. Same signature as ``contrastive_loss``.

    Args:
        similarity: (N, C, K) pixel-to-prototype similarities.
        positive: (N,) int64 assigned prototype c * K + k; its class c is the label.
        weights: (N,) per-pixel weights.
        temperature: tau > 0.
        valid_classes: (C,) bool, classes that take part in the softmax (initialised
            ones); the label of every row of non-zero weight must be valid. None means all.
        num_pixels: the N that divides the sum (default: the rows passed); rows of weight 0
            add nothing, as in ``contrastive_loss``.

    Returns:
        Scalar loss (0 with a gradient path when N = 0).
    """
    if similarity.shape[0] == 0:
        return similarity.sum() * 0.0
    labels = positive // similarity.shape[2]  # (N,) class of the assigned prototype
    logits = class_scores(similarity) / temperature  # (N, C)
    if valid_classes is not None:  # rows of weight 0 keep every class: a finite 0 * nll
        invalid = ~valid_classes[None, :] & (weights != 0)[:, None]
        logits = logits.masked_fill(invalid, float("-inf"))
    nll = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    n = similarity.shape[0] if num_pixels is None else num_pixels
    return (weights.to(nll.dtype) * nll).sum() / n
