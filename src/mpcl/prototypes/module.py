"""The MPCL module: multi-prototype online clustering, prototype updates and prototype losses.

One call of :meth:`PrototypeLearning.forward` is one resolution of one training step
(Algorithm 1, lines 7-9): cluster the labelled pixels of each class onto that class's K
prototypes (Sinkhorn, Eq. 14), compute the contrastive loss (Eq. 17) and the consistency
loss (Eq. 12), and, in training mode, update the prototypes (Eqs. 20-21) and fill the
feature bank. Its ``loss`` joins the self-training objective L_seg (Eq. 4, the UDA
module's) in the total loss (Eq. 19).

The parts: the prototype kinds and their similarities (``kinds``), the Sinkhorn assignment
and K-Means (``clustering``), the losses (``losses``), the update of each feature bank mode
with the K-Means start (``updates``) and the logged numbers (``diagnostics``); this module
holds the settings and runs the step.

Shapes: B = batch, D = feature channels, H x W = label resolution, h x w = feature
resolution, N = B * h * w, C = classes, K = prototypes per class.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpcl.data.labels import IGNORE_INDEX
from mpcl.prototypes.clustering import sinkhorn
from mpcl.prototypes.diagnostics import step_diagnostics
from mpcl.prototypes.feature_bank import FeatureBank
from mpcl.prototypes.kinds import Prototypes, check_K
from mpcl.prototypes.losses import consistency_loss, contrastive_loss
from mpcl.prototypes.updates import BANK_MODES, UPDATES, BankUpdate
from mpcl.streams import RandomStreams

LOSSES = ("contrast", "consistency")


def downsample(values: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of per-pixel values to the feature resolution, keeping the dtype.

    Labels keep their classes and the ignore label 255 (no class mixing); weights (and any
    other per-pixel values) are sampled at the same pixels as the labels.

    Args:
        values: (B, H, W) labels (int64) or weights (float).
        size: (h, w), or h for a square h x h.

    Returns:
        (B, h, w), the dtype of ``values``.
    """
    out = F.interpolate(values[:, None].float(), size=size, mode="nearest")
    return out[:, 0].to(values.dtype)


def _finite(value: Any) -> bool:
    """A real number (not a bool), finite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class PrototypeLearning(nn.Module):
    """Multiple-prototype contrastive learning (MPCL) on projected pixel features.

    Hydra builds this from conf/prototype/*.yaml. The constructors own the checks of their
    settings (this one, ``FeatureBank`` and the prototype kind; K by ``kinds.check_K`` for
    both): each value is checked once, in a one-line ValueError naming its config key
    ``prototype.<name>``, and the config validation does not repeat them.

    Args:
        prototypes: the prototype kind, called as ``prototypes(num_classes=C, K=K, dim=D)``:
            ``CentroidPrototypes`` or ``GaussianPrototypes`` (a Hydra partial in the configs).
        K: prototypes per class, an integer >= 1.
        dim: D, the prototype head's output channels (the student's ``prototype_dim``).
        num_classes: C.
        resolutions: the student's feature views (its ``resolutions``), context first; each
            gets its own feature bank, the prototypes are shared, and Eq. 18 weights the
            second view's loss by ``lambda_d`` (the first by 1 - lambda_d).
        feature_bank_size: features kept per feature bank (all classes together).
        bank_mode: "init" (the bank only feeds the K-Means initialisation; updates use the
            batch) or "queue" (updates use the statistics of the bank, kept for the run);
            see ``mpcl.prototypes.updates``.
        epsilon: Sinkhorn entropy weight, > 0.
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        temperature: tau of Eqs. 11 and 17, finite and > 0.
        momentum: EMA weight alpha of the old prototype (Eqs. 20-21), in [0, 1].
        lambda_contrast: lambda_1, weight of the contrastive loss, finite and >= 0.
        lambda_consistency: lambda_2, weight of the consistency loss, finite and >= 0.
        lambda_d: weight of the high-resolution view (Eq. 18; multi-resolution students),
            in [0, 1].
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
        seed: the run's seed: the feature-bank picks and the K-Means seeding draw from their own
            streams (``mpcl.streams``), so turning the prototypes on or off leaves the other
            random draws of a run unchanged.
    """

    def __init__(
        self,
        prototypes: Callable[..., Prototypes],
        num_classes: int,
        K: int = 5,
        dim: int = 256,
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_K(K)
        if not (_finite(temperature) and temperature > 0):
            raise ValueError(
                f"prototype.temperature={temperature} must be > 0 and finite (paper: 0.1)"
            )
        if not (_finite(epsilon) and epsilon > 0):
            raise ValueError(f"prototype.epsilon={epsilon} must be > 0 and finite (use 0.05)")
        if sinkhorn_iters < 1:
            raise ValueError(f"prototype.sinkhorn_iters={sinkhorn_iters} must be >= 1 (use 3)")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"prototype.momentum={momentum} must be in [0, 1] (paper: 0.999)")
        for key, value in (
            ("lambda_contrast", lambda_contrast),
            ("lambda_consistency", lambda_consistency),
        ):
            if not (_finite(value) and value >= 0):
                raise ValueError(f"prototype.{key}={value} must be >= 0 and finite (paper: 0.1)")
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
        # Plain generators, not state: checkpoints keep their states (UDAModule's rng_states).
        self.streams = RandomStreams(seed, ("feature_bank", "kmeans"))
        self.ignore_index = ignore_index
        self.resolutions = resolutions
        self.feature_banks = nn.ModuleDict(
            {
                name: FeatureBank(num_classes, dim, feature_bank_size, bank_max_per_step)
                for name in resolutions
            }
        )
        # A plain object (no tensors): not a submodule, no state_dict key.
        self.bank_update: BankUpdate = UPDATES[bank_mode]()
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
        # Early start: (C,) bool, classes whose final K-Means on a full class slot has run.
        self.register_buffer("refined", torch.zeros(num_classes, dtype=torch.bool))
        # (C, K, D) each class's prototype means as its (last) K-Means left them: the
        # ``drift`` diagnostic measures how far the EMA updates have moved them since.
        self.register_buffer("initial_mean", torch.zeros_like(self.prototypes.mean))
        self.register_load_state_dict_post_hook(_refresh_start)

    @property
    def bank_mode(self) -> str:
        """The feature bank mode of ``bank_update``: "init" or "queue"."""
        return self.bank_update.bank_mode

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints from before early_start have no ``refined``: their first K-Means was
        # the final one, so a class is refined once initialised.
        key, flags = prefix + "refined", prefix + "prototypes.initialized"
        if key not in state_dict and flags in state_dict:
            state_dict[key] = state_dict[flags].clone()
        # Checkpoints from before the drift diagnostic: measure drift from the loaded means.
        key, means = prefix + "initial_mean", prefix + "prototypes.mean"
        if key not in state_dict and means in state_dict:
            state_dict[key] = state_dict[means].clone()
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
            labels = torch.cat([downsample(v[2], size) for v in views])
            weights = torch.cat([downsample(v[3], size) for v in views])
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
        x, y, w = self._pixels(features, labels, weights)  # (N, D), (N,), (N,)
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

        sim = self.prototypes.similarity(x)  # (N, C, K), Eq. 8 or 9
        assignment, positive = self._assign(sim.detach(), y_safe, active)
        loss_contrast, loss_consistency = self._losses(
            sim, positive, labels, active, w_act, contrast_pixels, consistency_pixels
        )
        loss = self.lambda_contrast * loss_contrast + self.lambda_consistency * loss_consistency

        if self.training:  # Eqs. 20-21 and the K-Means start, as the bank mode does them
            with torch.no_grad():
                usable = labelled & (w > 0)
                self.bank_update.step(self, bank, x.detach(), y_safe, positive, w_act, usable)

        out = {
            "loss": loss,
            "loss_contrast": loss_contrast.detach(),
            "loss_consistency": loss_consistency.detach(),
        }
        # ``initialized`` as this step's K-Means starts left it (they update it in place).
        out |= step_diagnostics(
            sim.detach(),
            y_safe,
            active,
            assignment,
            positive,
            self.prototypes.initialized,
            self.refined if self.early_start else None,
            self.prototypes.mean,
            self.initial_mean,
        )
        return out

    def _pixels(
        self, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The checked pixels of one resolution, flattened.

        Args:
            features: (B, D, h, w).
            labels: (B, h, w) labels in [0, C) or ``ignore_index``.
            weights: (B, h, w) or None (all 1).

        Returns:
            features (N, D) as ``_flatten`` gives them, labels (N,) int64 and weights (N,)
            in the features' dtype.
        """
        x = self._flatten(features)  # (N, D)
        batch, _, height, width = features.shape
        if labels.shape != (batch, height, width):
            raise ValueError(
                f"labels must be (B, h, w) = {(batch, height, width)}, got "
                f"{tuple(labels.shape)}; downsample them with mpcl.prototypes.downsample."
            )
        y = labels.reshape(-1).long()
        if weights is None:
            w = x.new_ones(len(y))
        elif weights.shape != labels.shape:
            raise ValueError(
                f"weights must match labels {tuple(labels.shape)}, got {tuple(weights.shape)}; "
                f"downsample them with mpcl.prototypes.downsample."
            )
        else:
            w = weights.reshape(-1).to(x.dtype)
        return x, y, w

    def _losses(
        self,
        sim: torch.Tensor,
        positive: torch.Tensor,
        labels: torch.Tensor,
        active: torch.Tensor,
        weights: torch.Tensor,
        contrast_pixels: torch.Tensor | None,
        consistency_pixels: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The contrastive (Eq. 17) and consistency (Eq. 12) losses, each on its own pixels
        (its domains; the clustering used them all).

        Args:
            sim: (N, C, K) similarities, with grad.
            positive: (N,) int64 assigned prototype c * K + k.
            labels: (B, h, w) labels (the shape the pixel masks must have).
            active: (N,) bool, labelled pixels of initialised classes.
            weights: (N,) per-pixel weights, 0 outside ``active``.
            contrast_pixels: (B, h, w) bool or None (all).
            consistency_pixels: (B, h, w) bool or None (all).

        Returns:
            the two scalar losses, with grad.
        """
        initialized = self.prototypes.initialized
        w_c, n_c = self._loss_weights(contrast_pixels, labels, active, weights)
        loss_contrast = contrastive_loss(
            sim,
            positive,
            w_c,
            self.temperature,
            initialized,
            in_class_negatives=self.in_class_negatives,
            num_pixels=n_c,
        )
        w_s, n_s = self._loss_weights(consistency_pixels, labels, active, weights)
        loss_consistency = consistency_loss(
            sim, positive, w_s, self.temperature, initialized, num_pixels=n_s
        )
        return loss_contrast, loss_consistency

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


def _refresh_start(module: PrototypeLearning, incompatible_keys: Any) -> None:
    # A loaded checkpoint may hold initialised prototypes: one host read at load time.
    module.bank_update.start.refresh(module)
