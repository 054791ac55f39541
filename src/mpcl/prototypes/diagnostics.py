"""Detached per-step numbers logged under ``prototype/`` by the UDA module.

Local to this rank, over the pixels that took part in the step (``active``), and computed
without a host sync (scatters into an extra, dropped slot instead of boolean indexing or
bincount), so that a logged number never makes the host wait for the device.

Shapes: N = pixels, C = classes, K = prototypes per class.
"""

from __future__ import annotations

import math

import torch

from mpcl.prototypes.losses import class_scores


@torch.no_grad()
def step_diagnostics(
    sim: torch.Tensor,
    labels: torch.Tensor,
    active: torch.Tensor,
    assignment: torch.Tensor,
    positive: torch.Tensor,
    initialized: torch.Tensor,
    refined: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    initial_mean: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The diagnostics of one resolution of one step.

    Args:
        sim: (N, C, K) pixel-to-prototype similarities (Eqs. 8-9).
        labels: (N,) int64 class of each pixel in [0, C) (anything where ``active`` is False).
        active: (N,) bool, the labelled pixels of initialised classes.
        assignment: (N, K) Sinkhorn assignment Q of each pixel onto its class's prototypes.
        positive: (N,) int64 assigned prototype c * K + k.
        initialized: (C,) bool, classes with prototypes.
        refined: (C,) bool, classes whose refined K-Means has run (early start only; None:
            no ``num_refined``).
        mean, initial_mean: (C, K, D) the prototype means now and as their K-Means start left
            them (None: no ``drift``).

    Returns:
        0-dim float tensors: ``num_initialized`` (classes with prototypes), ``num_pixels``
        (active pixels), ``assignment_entropy`` (mean row entropy of Q / log K),
        ``prototype_usage`` (fraction of the present classes' prototypes that got a pixel),
        ``proto_accuracy`` (Eq. 10 prediction vs labels on the active pixels),
        ``assignment_balance`` (Sinkhorn's equipartition, Eq. 14, in the hard assignment:
        per present class the smallest prototype's pixel count over the mean count, averaged;
        1 = equal shares, 0 = a prototype got none), with ``refined`` ``num_refined``, and with
        the means ``drift`` (mean L2 distance of the initialised classes' prototype means
        from their K-Means start).
    """
    device = sim.device
    num_classes, K = sim.shape[1], sim.shape[2]
    num_initialized = initialized.sum().float()
    num_pixels = active.sum().float()
    on = active.float()
    entropy = -(assignment * torch.log(assignment.clamp_min(1e-12))).sum(1)  # (N,)
    max_entropy = math.log(K) if K > 1 else 1.0
    # Inactive pixels scatter into an extra, dropped slot.
    num_total = num_classes * K
    slot = torch.where(active, positive, num_total)
    used = torch.zeros(num_total + 1, dtype=torch.bool, device=device)
    used = used.index_fill(0, slot, True)[:num_total].view(num_classes, K)  # (C, K)
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=device)
    present = present.index_fill(0, torch.where(active, labels, num_classes), True)
    present = present[:num_classes]  # (C,)
    usage = (used.float().mean(1) * present).sum() / present.sum().clamp_min(1)
    counts = torch.zeros(num_total + 1, device=device).index_add_(0, slot, on)
    counts = counts[:num_total].view(num_classes, K)  # (C, K) pixels per prototype
    shares = counts.min(1).values / counts.mean(1).clamp_min(1e-12)  # (C,)
    balance = (shares * present).sum() / present.sum().clamp_min(1)
    scores = class_scores(sim).masked_fill(~initialized, float("-inf"))  # (N, C)
    correct = (scores.argmax(1) == labels).float()
    denominator = num_pixels.clamp_min(1)
    out = {
        "num_initialized": num_initialized,
        "num_pixels": num_pixels,
        "assignment_entropy": (entropy * on).sum() / denominator / max_entropy,
        "prototype_usage": usage,
        "proto_accuracy": (correct * on).sum() / denominator,
        "assignment_balance": balance,
    }
    if refined is not None:
        out["num_refined"] = refined.sum().float()
    if mean is not None and initial_mean is not None:
        distance = (mean - initial_mean).norm(dim=-1).mean(1)  # (C,)
        out["drift"] = (distance * initialized).sum() / initialized.sum().clamp_min(1)
    return out
