"""The prototype update of a training step, one class per feature bank mode (``bank_mode``).

- ``InitUpdate`` (``"init"``, the default): the EMA (Eqs. 20-21) uses this step's assigned
  pixels; the feature bank only gathers the features of classes that wait for their K-Means.
- ``QueueUpdate`` (``"queue"``): the bank is a per-class FIFO of recent features kept for the
  whole run, and the EMA uses the statistics of the queue (Sinkhorn over the queue's features
  of each class, then Eqs. 20-21), so that the bank size sets how fast the prototypes follow
  the features.

Both then start the classes that wait (``KMeansStart``: Algorithm 1's K-Means initialisation
from the feature banks, and the early start). The update objects hold no tensors (the state
is the learner's buffers: prototypes, feature banks, ``refined``), so they are not submodules
and add no ``state_dict`` key; they read the learner's settings at each call.

Each ``step`` is a collective under DDP: every rank calls it at every training step.

Shapes: N = pixels, C = classes, K = prototypes per class, D = feature channels,
S = feature bank slots per class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mpcl.prototypes.clustering import cluster_statistics, distributed_ready, kmeans, sinkhorn
from mpcl.prototypes.feature_bank import FeatureBank

if TYPE_CHECKING:
    from mpcl.prototypes.module import PrototypeLearning


class KMeansStart:
    """K-Means initialisation of the classes that wait, from the feature banks (both modes).

    A class waits for its first K-Means (once the banks hold ``min_init_features`` of its
    features over all resolutions) and, with ``early_start``, for its refined K-Means on a
    full class slot (``full_init_features``), which marks it in the learner's ``refined``.
    Without early start the first K-Means is the final one.

    ``done`` is a host-side copy of "no class waits", so that the steady-state step never
    reads the device flags (a host sync); ``refresh`` sets it whenever the prototypes may
    have changed from outside (a loaded checkpoint).
    """

    def __init__(self) -> None:
        self.done = False

    def refresh(self, learner: PrototypeLearning) -> None:
        """Host read: does no class wait for a (first or refined) K-Means any more?"""
        finished = learner.refined if learner.early_start else learner.prototypes.initialized
        self.done = bool(finished.all())

    @torch.no_grad()
    def step(
        self,
        learner: PrototypeLearning,
        bank: FeatureBank,
        features: torch.Tensor,
        labels: torch.Tensor,
        usable: torch.Tensor,
        fill: bool = True,
    ) -> None:
        """Fill ``bank`` for classes that wait; K-Means those with enough features.

        Args:
            learner: the prototypes, feature banks, ``refined`` flags and settings.
            bank: the feature bank of the current resolution.
            features: (N, D) detached features.
            labels: (N,) int64 class (anything where ``usable`` is False).
            usable: (N,) bool, labelled pixels of positive weight.
            fill: store the features of waiting classes (False: the caller filled the bank).
        """
        if self.done:
            return
        prototypes, banks = learner.prototypes, list(learner.feature_banks.values())
        initialized = prototypes.initialized
        waiting = ~learner.refined if learner.early_start else ~initialized  # (C,)
        if fill:
            bank.add(features, labels, usable & waiting[labels], learner.streams["feature_bank"])
        stored = sum(b.count for b in banks)  # (C,) over resolutions
        ready = ~initialized & (stored >= learner.min_init_features)
        if learner.early_start:  # the refined start, once the class slot is full
            ready = ready | (initialized & waiting & (stored >= learner.full_init_features))
        # Without early start the first K-Means is the final one.
        final = (stored >= learner.full_init_features) | (not learner.early_start)
        flags = torch.stack([ready, ready & final]).int()  # (2, C)
        distributed = distributed_ready()
        if distributed:  # a class starts on every rank at the same step
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        # One host read while classes wait: which are ready, and are all already initialised
        # (also when the prototypes were set from outside, e.g. a benchmark's steady state).
        ready_classes = torch.nonzero(flags[0]).squeeze(1).tolist()
        if not ready_classes:
            self.refresh(learner)
            return
        for cls in ready_classes:
            class_features = torch.cat([b.get(cls) for b in banks])  # (n_c, D)
            centers, assign = kmeans(
                class_features, learner.K, learner.kmeans_iters, learner.streams["kmeans"]
            )
            counts, sums, sq_sums = cluster_statistics(class_features, assign, learner.K)
            n = counts.clamp_min(1)[:, None]
            variances = (sq_sums / n - (sums / n) ** 2).clamp_min(0)  # (K, D)
            prototypes.initialize(cls, centers, variances)
            learner.initial_mean[cls] = prototypes.mean[cls]  # the drift diagnostic's origin
        learner.refined |= flags[1].bool()
        if distributed:  # rank 0's K-Means result, so that all ranks hold the same prototypes
            for buffer in prototypes.buffers():
                if buffer.is_floating_point():
                    dist.broadcast(buffer, src=0)
        self.refresh(learner)  # rare: inits only


class BankUpdate:
    """A feature bank mode: one training step's update of the prototypes and feature banks,
    then the K-Means start of the classes that wait (``start``)."""

    bank_mode: str

    def __init__(self) -> None:
        self.start = KMeansStart()

    def step(
        self,
        learner: PrototypeLearning,
        bank: FeatureBank,
        features: torch.Tensor,
        labels: torch.Tensor,
        positive: torch.Tensor,
        weights: torch.Tensor,
        usable: torch.Tensor,
    ) -> None:
        """One training step's update of the prototypes and the feature bank.

        Args:
            learner: the prototypes, feature banks and settings.
            bank: the feature bank of the current resolution.
            features: (N, D) detached features.
            labels: (N,) int64 class in [0, C) (0 on unlabelled pixels).
            positive: (N,) int64 assigned prototype c * K + k.
            weights: (N,) per-pixel weights, 0 on the pixels that do not update.
            usable: (N,) bool, labelled pixels of positive weight (the bank's candidates).
        """
        raise NotImplementedError


class InitUpdate(BankUpdate):
    """``bank_mode="init"``: EMA of the pixels hard-assigned to each prototype this step
    (Eqs. 20-21); the bank gathers only the features of the classes that wait."""

    bank_mode = "init"

    @torch.no_grad()
    def step(
        self,
        learner: PrototypeLearning,
        bank: FeatureBank,
        features: torch.Tensor,
        labels: torch.Tensor,
        positive: torch.Tensor,
        weights: torch.Tensor,
        usable: torch.Tensor,
    ) -> None:
        self.update_from_batch(learner, features, positive, weights)
        self.start.step(learner, bank, features, labels, usable, fill=True)

    @staticmethod
    @torch.no_grad()
    def update_from_batch(
        learner: PrototypeLearning,
        features: torch.Tensor,
        positive: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """EMA of the pixels hard-assigned to each prototype (collective under DDP).

        Args:
            learner: the prototypes and settings.
            features: (N, D) detached features.
            positive: (N,) int64 assigned prototype c * K + k.
            weights: (N,) per-pixel weights; pixels of weight 0 do not count.
        """
        keep = weights > 0
        num_total = learner.num_classes * learner.K
        counts, sums, sq_sums = cluster_statistics(features, positive, num_total, keep)
        shape = (learner.num_classes, learner.K)
        learner.prototypes.update(
            counts.view(shape), sums.view(*shape, -1), sq_sums.view(*shape, -1), learner.momentum
        )


class QueueUpdate(BankUpdate):
    """``bank_mode="queue"``: every step's usable features enter the bank (a per-class FIFO
    kept for the run) and the EMA moves towards the statistics of the queue."""

    bank_mode = "queue"

    @torch.no_grad()
    def step(
        self,
        learner: PrototypeLearning,
        bank: FeatureBank,
        features: torch.Tensor,
        labels: torch.Tensor,
        positive: torch.Tensor,
        weights: torch.Tensor,
        usable: torch.Tensor,
    ) -> None:
        # ``positive`` and ``weights`` are not used: the queue's own assignment replaces them.
        bank.add(features, labels, usable, learner.streams["feature_bank"])
        self.update_from_queue(learner, bank)
        self.start.step(learner, bank, features, labels, usable, fill=False)  # already filled

    @staticmethod
    @torch.no_grad()
    def update_from_queue(learner: PrototypeLearning, bank: FeatureBank) -> None:
        """EMA towards the statistics of the queue (Eqs. 14, 20-21).

        The queue's features of each initialised class are clustered onto the class's K
        prototypes (Sinkhorn, hard argmax) and each prototype moves towards the mean (and
        variance) of its assigned queue features. Under DDP each rank keeps its own queue
        and the Sinkhorn column sums and the statistics are all-reduced, so the update is
        that of one queue holding the union of the ranks' queues.

        Args:
            learner: the prototypes and settings.
            bank: the queue of the current resolution, this step's features already added:
                features (C, S, D), count (C,).
        """
        prototypes, K = learner.prototypes, learner.K
        num_classes, slots, dim = bank.features.shape
        filled = torch.arange(slots, device=bank.count.device)[None, :] < bank.count[:, None]
        valid = (filled & prototypes.initialized[:, None]).flatten()  # (C * S,)
        # Empty slots and classes without prototypes go to an extra, discarded class C:
        # no boolean indexing (copies, host syncs) of the C x S x D queue.
        classes = torch.arange(num_classes, device=valid.device).repeat_interleave(slots)
        classes = torch.where(valid, classes, torch.full_like(classes, num_classes))
        sim = prototypes.class_similarity(bank.features)  # (C, S, K)
        assignment = sinkhorn(
            sim.flatten(0, 1),  # (C * S, K)
            learner.epsilon,
            learner.sinkhorn_iters,
            groups=classes,
            num_groups=num_classes + 1,
            distributed=True,
        )
        positive = classes * K + assignment.argmax(1)  # (C * S,)
        counts, sums, sq_sums = cluster_statistics(
            bank.features.view(-1, dim), positive, (num_classes + 1) * K
        )
        shape, kept = (num_classes, K), num_classes * K
        prototypes.update(
            counts[:kept].view(shape),
            sums[:kept].view(*shape, dim),
            sq_sums[:kept].view(*shape, dim),
            learner.momentum,
        )


UPDATES: dict[str, type[BankUpdate]] = {"init": InitUpdate, "queue": QueueUpdate}
BANK_MODES = tuple(UPDATES)
