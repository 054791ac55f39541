"""Prototype banks: C classes x K prototypes held as buffers (non-learnable, EMA-updated).

Shapes: N = pixels, C = classes, K = prototypes per class, D = feature channels.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from mpcl.prototypes.clustering import distributed_ready


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors in place over all ranks (no-op without torch.distributed)."""
    if distributed_ready():
        for tensor in tensors:
            dist.all_reduce(tensor)


class PrototypeBank(nn.Module):
    """Common state of a prototype bank: means (C, K, D) and initialised flags (C,).

    Prototypes are buffers: they move with ``.to()``, are saved in ``state_dict()`` and
    receive no gradient. Subclasses define the similarity (Eq. 8 or Eq. 9).
    """

    def __init__(self, num_classes: int, num_prototypes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if num_prototypes < 1:
            raise ValueError(
                f"num_prototypes (K) must be >= 1, got {num_prototypes}; the paper uses K=5."
            )
        if dim < 1:
            raise ValueError(f"prototype dim must be >= 1, got {dim}.")
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.dim = dim
        # Algorithm 1 line 2: random start; replaced by K-Means before any loss uses it.
        self.register_buffer("mean", torch.randn(num_classes, num_prototypes, dim) / math.sqrt(dim))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def similarity(self, features: torch.Tensor) -> torch.Tensor:
        """Pixel-to-prototype similarity, in float32 or wider even under autocast.

        Args:
            features: (N, D).

        Returns:
            (N, C, K) similarities, differentiable w.r.t. ``features``.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must be (N, {self.dim}), got {tuple(features.shape)}; "
                f"set the prototype dim to the projection head's output channels."
            )
        dtype = torch.promote_types(
            torch.promote_types(features.dtype, self.mean.dtype), torch.float32
        )
        # Half-precision matmuls would overflow x^2 / var (up to D / var_floor).
        with torch.autocast(device_type=features.device.type, enabled=False):
            sim = self._similarity(features.to(dtype), self.mean.to(dtype))
        return sim.view(-1, self.num_classes, self.num_prototypes)

    def _similarity(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """(N, D) features, (C, K, D) means -> (N, C * K) similarities."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize(
        self, class_index: int, means: torch.Tensor, variances: torch.Tensor | None = None
    ) -> None:
        """Set the K prototypes of one class (from K-Means) and mark it initialised.

        Args:
            class_index: c.
            means: (K, D) cluster centres.
            variances: (K, D) per-cluster diagonal variances (Gaussian banks only).
        """
        self.mean[class_index] = means.to(self.mean)
        self.initialized[class_index] = True

    @torch.no_grad()
    def update(
        self,
        counts: torch.Tensor,
        sums: torch.Tensor,
        sq_sums: torch.Tensor | None,
        momentum: float,
    ) -> torch.Tensor:
        """EMA update from the pixels assigned to each prototype this step (Eqs. 20-21).

        Statistics are summed over ranks first, so all ranks keep identical prototypes.
        Every rank must call this at every training step (it is a collective under DDP).
        Prototypes without any assigned pixel (over all ranks) and classes that are not
        initialised are left unchanged.

        Args:
            counts: (C, K) number of assigned pixels.
            sums: (C, K, D) sum of assigned features.
            sq_sums: (C, K, D) sum of squared assigned features (None for centroids).
            momentum: alpha, the weight of the old value.

        Returns:
            (C, K) bool mask of the prototypes that were updated.
        """
        raise NotImplementedError


class CentroidPrototypes(PrototypeBank):
    """Centroid prototypes p_k^(c) = mu_k^(c) (Eq. 5); similarity = -||p - F||^2 (Eq. 8).

    The squared distance is used (the K-Means objective; smooth at p = F).
    """

    def _similarity(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        # A copy, so that the in-place EMA update cannot invalidate the autograd graph.
        mu = mean.flatten(0, 1).clone()  # (C*K, D)
        sq_dist = (x * x).sum(1, keepdim=True) - 2 * x @ mu.T + (mu * mu).sum(1)
        return -sq_dist.clamp_min(0)  # rounding can make it slightly negative

    @torch.no_grad()
    def update(
        self,
        counts: torch.Tensor,
        sums: torch.Tensor,
        sq_sums: torch.Tensor | None,
        momentum: float,
    ) -> torch.Tensor:
        counts, sums = counts.clone().float(), sums.clone().float()
        _all_reduce_sum(counts, sums)
        updated = (counts > 0) & self.initialized[:, None]
        batch_mean = sums / counts.clamp_min(1)[..., None]
        new_mean = momentum * self.mean + (1 - momentum) * batch_mean.to(self.mean)
        self.mean.copy_(torch.where(updated[..., None], new_mean, self.mean))
        return updated


class GaussianPrototypes(PrototypeBank):
    """Gaussian prototypes N(mu_k^(c), diag(var_k^(c))) (Eq. 7); similarity = log N / D (Eq. 9).

    The log-likelihood is divided by D (mean per-dimension log-likelihood) so that its scale
    does not grow with D and a temperature of 0.1 does not saturate the softmax at D = 256.
    Variances are clamped to ``var_floor`` so that a collapsed cluster cannot give infinite
    likelihoods.
    """

    def __init__(
        self, num_classes: int, num_prototypes: int, dim: int, var_floor: float = 1e-4
    ) -> None:
        super().__init__(num_classes, num_prototypes, dim)
        if var_floor <= 0:
            raise ValueError(f"var_floor must be > 0, got {var_floor}; use e.g. 1e-4.")
        self.var_floor = var_floor
        # Per-dimension variance of a random unit vector in R^D is 1/D.
        self.register_buffer("var", torch.full((num_classes, num_prototypes, dim), 1.0 / dim))

    def _similarity(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        mu = mean.flatten(0, 1)  # (C*K, D)
        var = self.var.to(x.dtype).flatten(0, 1).clamp_min(self.var_floor)
        inv_var = 1.0 / var
        # sum_d (x_d - mu_d)^2 / var_d expanded into matrix products (one pass, no loop).
        mahalanobis = (
            (x * x) @ inv_var.T - 2 * x @ (mu * inv_var).T + (mu * mu * inv_var).sum(1)
        ).clamp_min(0)
        log_norm = torch.log(var).sum(1) + self.dim * math.log(2 * math.pi)  # (C*K,)
        log_likelihood = -0.5 * (mahalanobis + log_norm)  # (N, C*K)
        return log_likelihood / self.dim

    @torch.no_grad()
    def initialize(
        self, class_index: int, means: torch.Tensor, variances: torch.Tensor | None = None
    ) -> None:
        if variances is None:
            raise ValueError("GaussianPrototypes.initialize needs variances (K, D).")
        self.var[class_index] = variances.to(self.var).clamp_min(self.var_floor)
        super().initialize(class_index, means, variances)

    @torch.no_grad()
    def update(
        self,
        counts: torch.Tensor,
        sums: torch.Tensor,
        sq_sums: torch.Tensor | None,
        momentum: float,
    ) -> torch.Tensor:
        if sq_sums is None:
            raise ValueError("GaussianPrototypes.update needs squared sums (C, K, D).")
        counts, sums, sq_sums = (
            counts.clone().float(),
            sums.clone().float(),
            sq_sums.clone().float(),
        )
        _all_reduce_sum(counts, sums, sq_sums)
        updated = (counts > 0) & self.initialized[:, None]
        n = counts.clamp_min(1)[..., None]
        batch_mean = sums / n
        # Biased (maximum-likelihood) variance of the assigned pixels around their batch mean.
        batch_var = (sq_sums / n - batch_mean * batch_mean).clamp_min(0)
        new_mean = momentum * self.mean + (1 - momentum) * batch_mean.to(self.mean)
        new_var = momentum * self.var + (1 - momentum) * batch_var.to(self.var)
        new_var = new_var.clamp_min(self.var_floor)
        self.mean.copy_(torch.where(updated[..., None], new_mean, self.mean))
        self.var.copy_(torch.where(updated[..., None], new_var, self.var))
        return updated


PROTOTYPE_TYPES: dict[str, type[PrototypeBank]] = {
    "centroid": CentroidPrototypes,
    "gaussian": GaussianPrototypes,
}


def make_prototypes(
    kind: str, num_classes: int, num_prototypes: int, dim: int, **kwargs: float
) -> PrototypeBank:
    """Build a prototype bank by name ("centroid" or "gaussian")."""
    if kind not in PROTOTYPE_TYPES:
        raise ValueError(f"unknown prototype type {kind!r}; use one of {sorted(PROTOTYPE_TYPES)}.")
    return PROTOTYPE_TYPES[kind](num_classes, num_prototypes, dim, **kwargs)
