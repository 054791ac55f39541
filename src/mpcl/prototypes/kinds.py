"""The prototype kinds: C classes x K prototypes held as buffers (non-learnable, EMA-updated).

``CentroidPrototypes`` (Eqs. 5 and 8) and ``GaussianPrototypes`` (Eqs. 6-7 and 9) share the
``Prototypes`` base: its means, initialised flags, ``initialize`` (from K-Means) and EMA
update (Eqs. 20-21).

Shapes: N = pixels, C = classes, K = prototypes per class, D = feature channels.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from torch import nn

from mpcl.prototypes.clustering import distributed_ready


def check_K(K: int) -> None:
    """Raise a one-line ValueError naming ``prototype.K`` unless K is an integer >= 1.

    The one check of K: ``Prototypes`` and ``PrototypeLearning`` both call it.
    """
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 1:
        raise ValueError(
            f"prototype.K={K!r} must be >= 1 prototypes per class (an integer; paper: 5)"
        )


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors in place over all ranks (no-op without torch.distributed)."""
    if distributed_ready():
        for tensor in tensors:
            dist.all_reduce(tensor)


class Prototypes(nn.Module):
    """Common state of the prototypes: means (C, K, D) and initialised flags (C,).

    Prototypes are buffers: they move with ``.to()``, are saved in ``state_dict()`` and
    receive no gradient. Subclasses define the similarity (Eq. 8 or Eq. 9).
    """

    def __init__(self, num_classes: int, K: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        check_K(K)
        if dim < 1:
            raise ValueError(f"prototype dim must be >= 1, got {dim}.")
        self.num_classes = num_classes
        self.K = K
        self.dim = dim
        # Algorithm 1 line 2: random start; replaced by K-Means before any loss uses it.
        self.register_buffer("mean", torch.randn(num_classes, K, dim) / math.sqrt(dim))
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
        x, mean, var = self._promote(features)
        # Half-precision matmuls would overflow x^2 / var (up to D / var_floor).
        with torch.autocast(device_type=features.device.type, enabled=False):
            flat = None if var is None else var.flatten(0, 1)
            sim = self._similarity(x, mean.flatten(0, 1), flat)
        return sim.view(-1, self.num_classes, self.K)

    def class_similarity(self, features: torch.Tensor) -> torch.Tensor:
        """Similarity of each class's features to that class's own K prototypes only.

        Used by the queue feature bank, whose features are already grouped by class; it
        costs C x S x K instead of C x S x C x K.

        Args:
            features: (C, S, D), row c holding features of class c.

        Returns:
            (C, S, K) similarities.
        """
        if features.dim() != 3 or features.shape[0] != self.num_classes:
            raise ValueError(
                f"features must be ({self.num_classes}, S, {self.dim}), got {tuple(features.shape)}"
            )
        x, mean, var = self._promote(features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._similarity(x, mean, var)

    def _promote(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Features, means and variances (or None) in a common dtype of float32 or wider."""
        dtype = torch.promote_types(
            torch.promote_types(features.dtype, self.mean.dtype), torch.float32
        )
        var = self.variance()
        return (
            features.to(dtype),
            self.mean.to(dtype),
            None if var is None else var.to(dtype),
        )

    def variance(self) -> torch.Tensor | None:
        """(C, K, D) variances of the prototypes, or None for centroids."""
        return None

    def _similarity(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | None
    ) -> torch.Tensor:
        """Similarity of (..., N, D) features to (..., M, D) means and variances (or None):
        (..., N, M); the leading dims (none, or G classes) are a batch."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize(
        self, class_index: int, means: torch.Tensor, variances: torch.Tensor | None = None
    ) -> None:
        """Set the K prototypes of one class (from K-Means) and mark it initialised.

        Args:
            class_index: c.
            means: (K, D) cluster centres.
            variances: (K, D) per-cluster diagonal variances (Gaussian prototypes only).
        """
        self.mean[class_index] = means.to(self.mean)
        self.initialized[class_index] = True

    # Gaussian prototypes also follow the variance of their pixels (Eq. 21).
    uses_variance = False

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
            sq_sums: (C, K, D) sum of squared assigned features (used by Gaussians only).
            momentum: alpha, the weight of the old value.

        Returns:
            (C, K) bool mask of the prototypes that were updated.
        """
        # float32 or wider (float64 statistics stay float64)
        dtype = torch.promote_types(sums.dtype, torch.float32)
        stats = [counts.to(dtype, copy=True), sums.to(dtype, copy=True)]
        if self.uses_variance:
            if sq_sums is None:
                raise ValueError(f"{type(self).__name__}.update needs squared sums (C, K, D).")
            stats.append(sq_sums.to(dtype, copy=True))
        _all_reduce_sum(*stats)
        counts, sums = stats[0], stats[1]
        updated = (counts > 0) & self.initialized[:, None]
        n = counts.clamp_min(1)[..., None]
        batch = {"mean": sums / n}
        if self.uses_variance:
            # Biased (maximum-likelihood) variance of the assigned pixels around their mean.
            batch["var"] = (stats[2] / n - batch["mean"] * batch["mean"]).clamp_min(0)
        for name, value in batch.items():
            old = getattr(self, name)
            new = self._constrain(name, momentum * old + (1 - momentum) * value.to(old))
            old.copy_(torch.where(updated[..., None], new, old))
        return updated

    def _constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Project an updated buffer back to its valid set (identity by default)."""
        return value


class CentroidPrototypes(Prototypes):
    """Centroid prototypes p_k^(c) = mu_k^(c) (Eq. 5); similarity = -||p - F||^2 (Eq. 8).

    The squared distance is used (the K-Means objective; smooth at p = F).
    """

    def _similarity(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | None
    ) -> torch.Tensor:
        # A copy, so that the in-place EMA update cannot invalidate the autograd graph.
        mu = mean.clone()  # (..., M, D)
        sq_dist = (
            (x * x).sum(-1, keepdim=True)
            - 2 * x @ mu.transpose(-1, -2)
            + (mu * mu).sum(-1).unsqueeze(-2)
        )
        return -sq_dist.clamp_min(0)  # rounding can make it slightly negative


class GaussianPrototypes(Prototypes):
    """Gaussian prototypes N(mu_k^(c), diag(var_k^(c))) (Eq. 7); similarity = log N / D (Eq. 9).

    The K prototypes of a class are the components of its Gaussian mixture (Eq. 6); the
    mixture weights pi_c,k are not used (Eq. 11 takes the max over the components).

    The log-likelihood is divided by D (mean per-dimension log-likelihood) so that its scale
    does not grow with D and a temperature of 0.1 does not saturate the softmax at D = 256.
    Variances are clamped to ``var_floor`` so that a collapsed cluster cannot give infinite
    likelihoods.
    """

    uses_variance = True

    def __init__(self, num_classes: int, K: int, dim: int, var_floor: float = 1e-4) -> None:
        super().__init__(num_classes, K, dim)
        if var_floor <= 0:
            raise ValueError(f"var_floor must be > 0, got {var_floor}; use e.g. 1e-4.")
        self.var_floor = var_floor
        # Per-dimension variance of a random unit vector in R^D is 1/D.
        self.register_buffer("var", torch.full((num_classes, K, dim), 1.0 / dim))

    def variance(self) -> torch.Tensor:
        return self.var

    def _similarity(
        self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | None
    ) -> torch.Tensor:
        var = var.clamp_min(self.var_floor)  # (..., M, D)
        inv_var = 1.0 / var
        # sum_d (x_d - mu_d)^2 / var_d expanded into matrix products (one pass, no loop).
        mahalanobis = (
            (x * x) @ inv_var.transpose(-1, -2)
            - 2 * x @ (mean * inv_var).transpose(-1, -2)
            + (mean * mean * inv_var).sum(-1).unsqueeze(-2)
        ).clamp_min(0)
        log_norm = torch.log(var).sum(-1) + self.dim * math.log(2 * math.pi)  # (..., M)
        log_likelihood = -0.5 * (mahalanobis + log_norm.unsqueeze(-2))  # (..., N, M)
        return log_likelihood / self.dim

    @torch.no_grad()
    def initialize(
        self, class_index: int, means: torch.Tensor, variances: torch.Tensor | None = None
    ) -> None:
        if variances is None:
            raise ValueError("GaussianPrototypes.initialize needs variances (K, D).")
        self.var[class_index] = variances.to(self.var).clamp_min(self.var_floor)
        super().initialize(class_index, means, variances)

    def _constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value.clamp_min(self.var_floor) if name == "var" else value
