"""The MPCL module: multi-prototype online clustering, prototype updates and prototype losses.

One call of :meth:`PrototypeLearning.forward` is one resolution of one training step
(Algorithm 1, lines 7-9): cluster the labelled pixels of each class onto that class's K
prototypes (Sinkhorn, Eq. 14), compute the contrastive loss (Eq. 17) and the consistency
loss (Eq. 12), and, in training mode, update the prototypes (Eqs. 20-21) and fill the
feature bank.

Two roles of the feature bank (``bank_mode``):

- ``init`` (default): the bank only gathers the features of classes that wait for their
  K-Means initialisation; the EMA update uses this step's assigned pixels.
- ``queue``: the bank is a per-class FIFO of recent features kept for the whole run, and
  each step's EMA update uses the statistics of the queue (Sinkhorn over the queue's
  features of each class, then Eqs. 20-21), so that the bank size sets how fast the
  prototypes follow the features.

Shapes: B = batch, D = feature channels, h x w = feature resolution, N = B * h * w,
C = classes, K = prototypes per class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mpcl.data.labels import IGNORE_INDEX
from mpcl.prototypes.clustering import cluster_statistics, distributed_ready, kmeans, sinkhorn
from mpcl.prototypes.feature_bank import FeatureBank
from mpcl.prototypes.losses import class_scores, consistency_loss, contrastive_loss
from mpcl.prototypes.prototypes import Prototypes

BANK_MODES = ("init", "queue")
LOSSES = ("contrast", "consistency")


def _resize_nearest(values: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, H, W) -> (B, h, w) nearest-neighbour resize, keeping the dtype."""
    out = F.interpolate(values[:, None].float(), size=size, mode="nearest")
    return out[:, 0].to(values.dtype)


def downsample_labels(labels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Labels at feature resolution by nearest neighbour (no class mixing, keeps 255).

    Args:
        labels: (B, H, W) int64 (mixed) labels, 255 = ignore.
        size: (h, w) feature resolution.

    Returns:
        (B, h, w) int64.
    """
    return _resize_nearest(labels, size)


def downsample_weights(weights: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Per-pixel weights at feature resolution, sampled at the same pixels as the labels.

    Args:
        weights: (B, H, W) float.
        size: (h, w).

    Returns:
        (B, h, w) float.
    """
    return _resize_nearest(weights, size)


class PrototypeLearning(nn.Module):
    """Multiple-prototype contrastive learning (MPCL) on projected pixel features.

    Args:
        prototypes: the prototype kind, called as ``prototypes(num_classes=C, K=K, dim=D)``:
            ``CentroidPrototypes`` or ``GaussianPrototypes`` (a Hydra partial in the configs).
        K: prototypes per class.
        dim: D, the prototype head's output channels (the student's ``prototype_dim``).
        num_classes: C.
        resolutions: the student's feature views (its ``resolutions``), context first; each
            gets its own feature bank, the prototypes are shared, and Eq. 18 weights the
            second view's loss by ``lambda_d`` (the first by 1 - lambda_d).
        feature_bank_size: features kept per feature bank (all classes together).
        bank_mode: "init" (the bank only feeds the K-Means initialisation; updates use the
            batch) or "queue" (updates use the statistics of the bank, kept for the run).
        epsilon: Sinkhorn entropy weight.
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        temperature: tau of Eqs. 11 and 17.
        momentum: EMA weight alpha of the old prototype (Eqs. 20-21).
        lambda_contrast: lambda_1, weight of the contrastive loss.
        lambda_consistency: lambda_2, weight of the consistency loss.
        lambda_d: weight of the high-resolution view (Eq. 18; multi-resolution students).
        in_class_negatives: same-class prototypes are negatives (False: Table VI ablation).
        normalize_features: L2-normalise pixel features before any similarity.
        min_init_features: features of a class (over all feature banks) needed before its
            K-Means initialisation; default: one full class slot of a bank, or with
            ``early_start`` the features one step stores (``bank_max_per_step``).
        early_start: start a class's losses early: K-Means on its first
            ``min_init_features`` features, then K-Means again on the full class slot
            (the refined start), after which the class's bank filling stops (``init``).
        bank_max_per_step: features of one class stored per step in a bank.
        kmeans_iters: Lloyd iterations of the initialisation.
        ignore_index: label of unlabelled pixels.
    """

    def __init__(
        self,
        prototypes: Callable[..., Prototypes],
        K: int = 5,
        dim: int = 256,
        num_classes: int = 19,
        resolutions: Sequence[str] = ("lr",),
        feature_bank_size: int = 20000,
        bank_mode: str = "init",
        epsilon: float = 0.05,
        sinkhorn_iters: int = 3,
        temperature: float = 0.1,
        momentum: float = 0.999,
        lambda_contrast: float = 0.1,
        lambda_consistency: float = 0.1,
        lambda_d: float = 0.1,
        in_class_negatives: bool = True,
        normalize_features: bool = True,
        min_init_features: int | None = None,
        early_start: bool = False,
        bank_max_per_step: int | None = None,
        kmeans_iters: int = 50,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        # The messages name the config keys: Hydra builds this from conf/prototype/*.yaml.
        if temperature <= 0:
            raise ValueError(f"prototype.temperature={temperature} must be > 0 (paper: 0.1)")
        if epsilon <= 0:
            raise ValueError(f"prototype.epsilon={epsilon} must be > 0 (use 0.05)")
        if sinkhorn_iters < 1:
            raise ValueError(f"prototype.sinkhorn_iters={sinkhorn_iters} must be >= 1 (use 3)")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"prototype.momentum={momentum} must be in [0, 1] (paper: 0.999)")
        for key, value in (
            ("lambda_contrast", lambda_contrast),
            ("lambda_consistency", lambda_consistency),
        ):
            if value < 0:
                raise ValueError(f"prototype.{key}={value} must be >= 0 (paper: 0.1)")
        if bank_mode not in BANK_MODES:
            raise ValueError(
                f"prototype.bank_mode={bank_mode!r} is unknown: use one of {BANK_MODES}"
            )
        if not 0.0 <= lambda_d <= 1.0:
            raise ValueError(f"prototype.lambda_d={lambda_d} must be in [0, 1] (paper: 0.1)")
        resolutions = [str(name) for name in resolutions]
        if not 1 <= len(resolutions) <= 2 or len(set(resolutions)) != len(resolutions):
            raise ValueError(
                f"resolutions must be one or two distinct names (the student's), got {resolutions}"
            )
        self.prototypes = prototypes(num_classes=num_classes, K=K, dim=dim)
        if not isinstance(self.prototypes, Prototypes):
            raise ValueError(
                f"prototype.prototypes built a {type(self.prototypes).__name__}: use "
                f"mpcl.prototypes.CentroidPrototypes or GaussianPrototypes"
            )
        self.num_classes = num_classes
        self.K = K
        self.dim = dim
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.temperature = temperature
        self.momentum = momentum
        self.lambda_contrast = lambda_contrast
        self.lambda_consistency = lambda_consistency
        self.lambda_d = lambda_d
        self.in_class_negatives = in_class_negatives
        self.normalize_features = normalize_features
        self.kmeans_iters = kmeans_iters
        self.ignore_index = ignore_index
        self.resolutions = resolutions
        self.feature_banks = nn.ModuleDict(
            {
                name: FeatureBank(num_classes, dim, feature_bank_size, bank_max_per_step)
                for name in resolutions
            }
        )
        self.bank_mode = bank_mode
        self.early_start = early_start
        first = self.feature_banks[resolutions[0]]
        slots = first.slots
        # The refined (final) K-Means runs on one full class slot, as the default start does.
        self.full_init_features = slots
        if min_init_features is None:
            min_init_features = max(K, first.max_per_step) if early_start else slots
        self.min_init_features = min_init_features
        max_init = slots * len(resolutions)
        if not K <= self.min_init_features <= max_init:
            raise ValueError(
                f"min_init_features={min_init_features} must be between K={K} and the bank "
                f"capacity per class {max_init}: raise prototype.feature_bank_size or lower it"
            )
        if early_start and self.min_init_features >= slots:
            raise ValueError(
                f"prototype.early_start needs min_init_features={self.min_init_features} below "
                f"the class slot {slots} (the refined start): lower it or drop early_start"
            )
        # Early start: classes whose final K-Means on a full class slot has run.
        self.register_buffer("refined", torch.zeros(num_classes, dtype=torch.bool))
        # Host-side copy of "no class waits for K-Means", so that the steady-state step never
        # reads the device flags (a host sync); refreshed whenever the prototypes change.
        self._all_initialized = False
        self.register_load_state_dict_post_hook(_refresh_initialized)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints from before early_start have no ``refined``: their first K-Means was
        # the final one, so a class is refined once initialised.
        key, flags = prefix + "refined", prefix + "prototypes.initialized"
        if key not in state_dict and flags in state_dict:
            state_dict[key] = state_dict[flags].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"type={type(self.prototypes).__name__}, classes={self.num_classes}, "
            f"K={self.K}, dim={self.dim}, temperature={self.temperature}, "
            f"epsilon={self.epsilon}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"momentum={self.momentum}, lambda_contrast={self.lambda_contrast}, "
            f"lambda_consistency={self.lambda_consistency}, "
            f"lambda_d={self.lambda_d}, in_class_negatives={self.in_class_negatives}, "
            f"resolutions={self.resolutions}, bank_mode={self.bank_mode}, "
            f"early_start={self.early_start}, min_init_features={self.min_init_features}"
        )

    # ------------------------------------------------------------------ features

    def _flatten(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (N, D), float32 or wider, L2-normalised if configured."""
        if features.dim() != 4 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must be (B, {self.dim}, h, w), got {tuple(features.shape)}; "
                f"set the prototypes' dim to the projection head's output channels."
            )
        x = features.permute(0, 2, 3, 1).reshape(-1, self.dim)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # no half-precision distances
        return F.normalize(x, dim=1) if self.normalize_features else x

    def prototype_similarity(self, features: torch.Tensor) -> torch.Tensor:
        """Pixel-to-prototype similarity maps (paper Fig. 7).

        Args:
            features: (B, D, h, w).

        Returns:
            (B, C, K, h, w).
        """
        batch, _, height, width = features.shape
        sim = self.prototypes.similarity(self._flatten(features))  # (N, C, K)
        sim = sim.view(batch, height, width, self.num_classes, self.K)
        return sim.permute(0, 3, 4, 1, 2)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Prototype-based class scores g(c, F) / tau (Eqs. 10-11; Table VI output).

        Softmax over C gives Eq. 11; argmax gives Eq. 10. Classes that are not initialised
        get the lowest finite score.

        Args:
            features: (B, D, h, w).

        Returns:
            (B, C, h, w).
        """
        scores = self.prototype_similarity(features).max(dim=2).values / self.temperature
        low = torch.finfo(scores.dtype).min
        return scores.masked_fill(~self.prototypes.initialized[None, :, None, None], low)

    # ------------------------------------------------------------------ training step

    def forward_views(
        self,
        domains: Sequence[Sequence[Sequence[Any]]],
        losses: Sequence[Collection[str]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Eq. 18 over a student's views: one call per training step.

        Args:
            domains: per domain (e.g. source, mixed), the student's ``prototype_views``: a
                list of (resolution, features (B, D, h, w), labels (B, H, W), weights
                (B, H, W)) in ``resolutions`` order. The same resolution of every domain is
                concatenated along the batch, so the prototypes cluster both domains at once;
                labels and weights are sampled at the features' resolution.
            losses: per domain, which losses its pixels feed ("contrast", "consistency");
                None = both for every domain. Every domain's pixels are clustered and
                update the prototypes whatever its losses.

        Returns:
            ``forward``'s dict; for two resolutions each value is the Eq. 18 mix
            (1 - lambda_d) * low + lambda_d * high, and ``<key>_<resolution>`` holds each
            view's own value.
        """
        if losses is not None:
            if len(losses) != len(domains):
                raise ValueError(f"losses has {len(losses)} entries for {len(domains)} domains")
            bad = {name for names in losses for name in names} - set(LOSSES)
            if bad:
                raise ValueError(f"unknown prototype losses {sorted(bad)}: use {LOSSES}")
            if all(set(names) == set(LOSSES) for names in losses):
                losses = None  # every pixel feeds both losses: no masks
        per_res: dict[str, dict[str, torch.Tensor]] = {}
        for views in zip(*domains, strict=True):
            resolution = views[0][0]
            features = torch.cat([v[1] for v in views])
            size = features.shape[-2:]
            labels = torch.cat([downsample_labels(v[2], size) for v in views])
            weights = torch.cat([downsample_weights(v[3], size) for v in views])
            masks: dict[str, torch.Tensor] = {}
            if losses is not None:
                for name in LOSSES:  # (B_total, h, w) bool: the pixels of the loss's domains
                    masks[f"{name}_pixels"] = torch.cat(
                        [
                            torch.full(
                                (v[1].shape[0], *size), name in names, device=features.device
                            )
                            for v, names in zip(views, losses, strict=True)
                        ]
                    )
            per_res[resolution] = self(features, labels, weights, resolution=resolution, **masks)
        if len(per_res) == 1:
            return next(iter(per_res.values()))
        scale = dict(zip(self.resolutions, (1.0 - self.lambda_d, self.lambda_d), strict=True))
        first = per_res[self.resolutions[0]]
        out = {k: sum(scale[r] * d[k] for r, d in per_res.items()) for k in first}
        out |= {f"{k}_{r}": v for r, d in per_res.items() for k, v in d.items()}
        return out

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
        resolution: str | None = None,
        contrast_pixels: torch.Tensor | None = None,
        consistency_pixels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prototype losses of one resolution; in training mode also clusters and updates.

        Args:
            features: (B, D, h, w) projected features (prototype head output).
            labels: (B, h, w) int64 labels at feature resolution, 255 = ignore (source
                labels, or mixed labels: pasted source labels + target pseudo-labels).
            weights: (B, h, w) per-pixel weights w^M (quality weight on target pixels, 1 on
                pasted source pixels); None = all 1. Pixels of weight 0 do not update.
            resolution: which feature bank to fill (one of ``resolutions``; default first).
            contrast_pixels: (B, h, w) bool, the pixels that feed the contrastive loss;
                None = all. All labelled pixels are still clustered and update.
            consistency_pixels: (B, h, w) bool, the same for the consistency loss.

        Returns:
            dict with ``loss`` = lambda_1 * contrast + lambda_2 * consistency (scalar with
            grad; 0 while no class is initialised), ``loss_contrast``, ``loss_consistency``
            and detached diagnostics ``num_initialized``, ``num_pixels``,
            ``assignment_entropy`` (mean row entropy of Q / log K), ``prototype_usage``
            (fraction of the present classes' prototypes that got a pixel) and
            ``proto_accuracy`` (Eq. 10 prediction vs labels on the used pixels); with
            ``early_start`` also ``num_refined``.
        """
        bank = self._feature_bank(resolution)
        x = self._flatten(features)  # (N, D)
        batch, _, height, width = features.shape
        if labels.shape != (batch, height, width):
            raise ValueError(
                f"labels must be (B, h, w) = {(batch, height, width)}, got "
                f"{tuple(labels.shape)}; downsample them with downsample_labels."
            )
        y = labels.reshape(-1).long()
        if weights is None:
            w = x.new_ones(len(y))
        elif weights.shape != labels.shape:
            raise ValueError(
                f"weights must match labels {tuple(labels.shape)}, got {tuple(weights.shape)}; "
                f"downsample them with downsample_weights."
            )
        else:
            w = weights.reshape(-1).to(x.dtype)

        labelled = y != self.ignore_index
        # A device-side assert: checked without a host sync (raises at the next sync on GPU).
        torch._assert_async(
            ~(labelled & ((y < 0) | (y >= self.num_classes))).any(),
            f"labels must be in [0, {self.num_classes}) or {self.ignore_index}: map them to "
            f"train IDs first",
        )
        y_safe = torch.where(labelled, y, torch.zeros_like(y))
        initialized = self.prototypes.initialized
        # Pixels of classes without prototypes yet take no part: a mask, not a selection (a
        # data-dependent shape would make the host wait for the device every step). They are
        # clustered in an extra, discarded group and weigh 0 in the losses and the update.
        active = labelled & initialized[y_safe]  # (N,)
        w_act = w * active

        sim = self.prototypes.similarity(x)  # (N, C, K)
        assignment, positive = self._assign(sim.detach(), y_safe, active)
        # Each loss on its own pixels (its domains); the clustering above used them all.
        w_c, n_c = self._loss_weights(contrast_pixels, labels, active, w_act)
        loss_contrast = contrastive_loss(
            sim,
            positive,
            w_c,
            self.temperature,
            initialized,
            in_class_negatives=self.in_class_negatives,
            num_pixels=n_c,
        )
        w_s, n_s = self._loss_weights(consistency_pixels, labels, active, w_act)
        loss_consistency = consistency_loss(
            sim, positive, w_s, self.temperature, initialized, num_pixels=n_s
        )
        loss = self.lambda_contrast * loss_contrast + self.lambda_consistency * loss_consistency

        if self.training:
            with torch.no_grad():
                usable = labelled & (w > 0)
                if self.bank_mode == "queue":
                    bank.add(x.detach(), y_safe, usable)
                    self._update_from_queue(bank)
                else:
                    self._update_prototypes(x.detach(), positive, w_act)
                fill = self.bank_mode == "init"  # the queue is already filled
                self._initialize_classes(bank, x.detach(), y_safe, usable, fill)

        out = {
            "loss": loss,
            "loss_contrast": loss_contrast.detach(),
            "loss_consistency": loss_consistency.detach(),
        }
        out.update(self._diagnostics(sim.detach(), y_safe, active, assignment, positive))
        if self.early_start:  # classes whose refined K-Means has run
            out["num_refined"] = self.refined.sum().float()
        return out

    @staticmethod
    def _loss_weights(
        mask: torch.Tensor | None, labels: torch.Tensor, active: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel weights (N,) of one loss (0 outside its pixels) and its pixel count
        (a 0-dim tensor: the loss's 1/N over the active pixels it sees; at least 1, so that
        no active pixel gives a loss of 0)."""
        if mask is None:
            return weights, active.sum().clamp_min(1)
        if mask.shape != labels.shape:
            raise ValueError(
                f"loss pixel masks must match labels {tuple(labels.shape)}, got {tuple(mask.shape)}"
            )
        rows = mask.reshape(-1).bool() & active
        return weights * rows, rows.sum().clamp_min(1)

    def _feature_bank(self, resolution: str | None) -> FeatureBank:
        name = self.resolutions[0] if resolution is None else resolution
        if name not in self.feature_banks:
            raise ValueError(
                f"unknown resolution {name!r}; use one of {self.resolutions} "
                f"(set PrototypeLearning.resolutions)."
            )
        return self.feature_banks[name]

    @torch.no_grad()
    def _assign(
        self, sim: torch.Tensor, labels: torch.Tensor, active: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinkhorn clustering of each class's pixels onto its own K prototypes.

        Args:
            sim: (N, C, K) similarities.
            labels: (N,) class of each pixel in [0, C) (the clustering groups).
            active: (N,) bool, the pixels to cluster (None: all); the others form an extra
                group whose assignment is meaningless and must be masked out by the caller.

        Returns:
            soft assignment Q (N, K) and the positive prototype index (N,) in [0, C*K).
        """
        own = sim[torch.arange(len(labels), device=sim.device), labels]  # (N, K)
        groups = labels if active is None else torch.where(active, labels, self.num_classes)
        assignment = sinkhorn(
            own,
            self.epsilon,
            self.sinkhorn_iters,
            groups=groups,
            num_groups=self.num_classes + 1,
            distributed=self.training,  # training steps run on every rank: union-batch Q
        )
        positive = labels * self.K + assignment.argmax(1)
        return assignment, positive

    @torch.no_grad()
    def _update_prototypes(
        self, features: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """EMA of the pixels hard-assigned to each prototype (collective under DDP)."""
        keep = weights > 0
        num_total = self.num_classes * self.K
        counts, sums, sq_sums = cluster_statistics(features, positive, num_total, keep)
        shape = (self.num_classes, self.K)
        self.prototypes.update(
            counts.view(shape), sums.view(*shape, -1), sq_sums.view(*shape, -1), self.momentum
        )

    @torch.no_grad()
    def _update_from_queue(self, bank: FeatureBank) -> None:
        """EMA towards the statistics of the queue (``bank_mode="queue"``; Eqs. 14, 20-21).

        The queue's features of each initialised class are clustered onto the class's K
        prototypes (Sinkhorn, hard argmax) and each prototype moves towards the mean (and
        variance) of its assigned queue features. Under DDP each rank keeps its own queue
        and the Sinkhorn column sums and the statistics are all-reduced, so the update is
        that of one queue holding the union of the ranks' queues (a collective: every rank
        calls it at every training step).

        Args:
            bank: the queue of the current resolution, this step's features already added.
        """
        num_classes, slots, dim = bank.features.shape
        filled = torch.arange(slots, device=bank.count.device)[None, :] < bank.count[:, None]
        valid = (filled & self.prototypes.initialized[:, None]).flatten()  # (C * S,)
        # Empty slots and classes without prototypes go to an extra, discarded class C:
        # no boolean indexing (copies, host syncs) of the C x S x D queue.
        classes = torch.arange(num_classes, device=valid.device).repeat_interleave(slots)
        classes = torch.where(valid, classes, torch.full_like(classes, num_classes))
        sim = self.prototypes.class_similarity(bank.features)  # (C, S, K)
        assignment = sinkhorn(
            sim.flatten(0, 1),  # (C * S, K)
            self.epsilon,
            self.sinkhorn_iters,
            groups=classes,
            num_groups=num_classes + 1,
            distributed=True,
        )
        positive = classes * self.K + assignment.argmax(1)
        counts, sums, sq_sums = cluster_statistics(
            bank.features.view(-1, dim), positive, (num_classes + 1) * self.K
        )
        shape, kept = (num_classes, self.K), num_classes * self.K
        self.prototypes.update(
            counts[:kept].view(shape),
            sums[:kept].view(*shape, dim),
            sq_sums[:kept].view(*shape, dim),
            self.momentum,
        )

    def _init_done(self) -> bool:
        """Host read: does no class wait for a (first or refined) K-Means any more?"""
        done = self.refined if self.early_start else self.prototypes.initialized
        return bool(done.all())

    @torch.no_grad()
    def _initialize_classes(
        self,
        bank: FeatureBank,
        features: torch.Tensor,
        labels: torch.Tensor,
        usable: torch.Tensor,
        fill: bool = True,
    ) -> None:
        """Fill ``bank`` for classes that wait; K-Means those with enough features.

        A class waits for its first K-Means (at ``min_init_features``) and, with
        ``early_start``, for its refined K-Means on a full class slot.

        Args:
            bank: the feature bank of the current resolution.
            features: (N, D) detached features.
            labels: (N,) class (anything where ``usable`` is False).
            usable: (N,) bool, labelled pixels of positive weight.
            fill: store the features of waiting classes (False: the caller filled the bank).
        """
        if self._all_initialized:
            return
        initialized = self.prototypes.initialized
        waiting = ~self.refined if self.early_start else ~initialized
        if fill:
            bank.add(features, labels, usable & waiting[labels])
        stored = sum(b.count for b in self.feature_banks.values())  # (C,) over resolutions
        ready = ~initialized & (stored >= self.min_init_features)
        if self.early_start:  # the refined start, once the class slot is full
            ready = ready | (initialized & waiting & (stored >= self.full_init_features))
        # Without early start the first K-Means is the final one.
        final = (stored >= self.full_init_features) | (not self.early_start)
        flags = torch.stack([ready, ready & final]).int()  # (2, C)
        distributed = distributed_ready()
        if distributed:  # a class starts on every rank at the same step
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        # One host read while classes wait: which are ready, and are all already initialised
        # (also when the prototypes were set from outside, e.g. a benchmark's steady state).
        ready_classes = torch.nonzero(flags[0]).squeeze(1).tolist()
        if not ready_classes:
            self._all_initialized = self._init_done()
            return
        for cls in ready_classes:
            class_features = torch.cat([b.get(cls) for b in self.feature_banks.values()])
            centers, assign = kmeans(class_features, self.K, self.kmeans_iters)
            counts, sums, sq_sums = cluster_statistics(class_features, assign, self.K)
            n = counts.clamp_min(1)[:, None]
            variances = (sq_sums / n - (sums / n) ** 2).clamp_min(0)  # (K, D)
            self.prototypes.initialize(cls, centers, variances)
        self.refined |= flags[1].bool()
        if distributed:  # rank 0's K-Means result, so that all ranks hold the same prototypes
            for buffer in self.prototypes.buffers():
                if buffer.is_floating_point():
                    dist.broadcast(buffer, src=0)
        self._all_initialized = self._init_done()  # rare: inits only

    @torch.no_grad()
    def _diagnostics(
        self,
        sim: torch.Tensor,
        labels: torch.Tensor,
        active: torch.Tensor,
        assignment: torch.Tensor,
        positive: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Detached scalars for logging (local to this rank), over the ``active`` pixels.

        sim (N, C, K), labels (N,), active (N,) bool, assignment (N, K), positive (N,).
        """
        device = sim.device
        num_initialized = self.prototypes.initialized.sum().float()
        num_pixels = active.sum().float()
        on = active.float()
        entropy = -(assignment * torch.log(assignment.clamp_min(1e-12))).sum(1)
        max_entropy = math.log(self.K) if self.K > 1 else 1.0
        # Scatters into an extra, dropped slot for inactive pixels; no bincount / boolean
        # indexing: no host sync for a logged number.
        num_total = self.num_classes * self.K
        slot = torch.where(active, positive, num_total)
        used = torch.zeros(num_total + 1, dtype=torch.bool, device=device)
        used = used.index_fill(0, slot, True)[:num_total].view(self.num_classes, self.K)
        present = torch.zeros(self.num_classes + 1, dtype=torch.bool, device=device)
        present = present.index_fill(0, torch.where(active, labels, self.num_classes), True)
        present = present[: self.num_classes]
        usage = (used.float().mean(1) * present).sum() / present.sum().clamp_min(1)
        scores = class_scores(sim).masked_fill(~self.prototypes.initialized, float("-inf"))
        correct = (scores.argmax(1) == labels).float()
        denominator = num_pixels.clamp_min(1)
        return {
            "num_initialized": num_initialized,
            "num_pixels": num_pixels,
            "assignment_entropy": (entropy * on).sum() / denominator / max_entropy,
            "prototype_usage": usage,
            "proto_accuracy": (correct * on).sum() / denominator,
        }


def _refresh_initialized(module: PrototypeLearning, incompatible_keys: Any) -> None:
    # A loaded checkpoint may hold initialised prototypes: one host read at load time.
    module._all_initialized = module._init_done()
