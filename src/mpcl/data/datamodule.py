"""The UDA data module: paired (source, target) training batches and target validation.

Design: one DataLoader over a ``PairedDataset`` whose items are addressed by (source index,
target index) pairs that a ``PairSampler`` draws from a seeded torch Generator. Source and
target are shuffled independently (each cycles through its own random permutations, so every
image is seen once per pass over its own set, whatever the two lengths), and the pairs are
fixed by the generator alone: the stream does not depend on the number of workers, unlike a
per-worker RNG, and one loader keeps the pair and its worker bookkeeping together, unlike two
zipped loaders. Training is iteration based: the sampler is as long as the trainer's
``max_steps`` needs, and Lightning's ``max_steps`` ends training.

Exact resume: every random choice of the data pipeline is a function of (seed, k), k the
sample's position in the stream. The sampler skips the first ``start`` samples on resume, and
each item reseeds the augmentations (and Rare Class Sampling) from (seed, k), so a resumed run
sees exactly the batches the uninterrupted run would have seen, whatever the worker count.

Multi-process (DDP): there is still ONE stream; rank r of N takes the samples with
k % N == r, so the N per-rank batches of a step are together the batch of one process
with N times ``batch_size`` (``batch_size`` is per GPU). Validation is sharded the same
way, without the padding repeats of a ``DistributedSampler``. Lightning must not wrap the
samplers again: ``trainer=ddp`` / ``ddp_sim`` set ``use_distributed_sampler: false``.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mpcl.data.transforms import reseed_transforms, seed_worker


class PairSampler(Sampler[tuple[int, int, int]]):
    """Yields (source index, target index, k) for k in [start, num_samples) with
    k % world_size == rank, independently shuffled.

    Each side walks through fresh random permutations of its own length, drawn from a
    generator seeded with ``generator``'s initial seed; the first ``start`` pairs are drawn
    and skipped (resume). The stream is a function of that seed and the epoch alone: every
    iteration of one epoch replays the same pairs (Lightning may start an iterator, discard
    its prefetched samples and start another when it resumes), a new epoch (``set_epoch``,
    which Lightning calls) gives new pairs and sample ids ``k + epoch x num_samples``. Every
    rank draws the whole stream and keeps its share. ``len`` is the share of the whole epoch.
    """

    def __init__(
        self,
        num_source: int,
        num_target: int,
        num_samples: int,
        generator: torch.Generator,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_source <= 0 or num_target <= 0:
            raise ValueError(
                f"empty training set: {num_source} source and {num_target} target images"
            )
        self.num_source, self.num_target = num_source, num_target
        self.num_samples = int(num_samples)
        self.start = min(int(start), self.num_samples)
        self.seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        self.epoch = 0
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        if self.epoch == 0:
            return torch.Generator().manual_seed(self.seed)
        seed = np.random.SeedSequence([self.seed % 2**63, self.epoch]).generate_state(2)
        return torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        generator = self._generator()

        def stream(n: int) -> Iterator[int]:
            while True:
                yield from torch.randperm(n, generator=generator).tolist()

        source, target = stream(self.num_source), stream(self.num_target)
        offset = self.epoch * self.num_samples
        for k in range(self.num_samples):
            pair = next(source), next(target)
            if k >= self.start and k % self.world_size == self.rank:
                yield (*pair, k + offset)

    def __len__(self) -> int:
        # The whole epoch's share, ``start`` included: a resumed Lightning loop restores how
        # many batches of the epoch were done and runs len - done more, which this iterator
        # gives from ``start`` on. (Counting from ``start`` ended the resumed epoch early.)
        return len(range(self.rank, self.num_samples, self.world_size))


class ShardSampler(Sampler[int]):
    """Indices r, r + N, r + 2N, ... of a dataset of length n (evaluation on rank r of N;
    no index repeated, unlike DistributedSampler's padding)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PairedDataset(Dataset):
    """Indexed by (source index, target index[, k]); with k, the augmentations of the item
    (and Rare Class Sampling's draws) are reseeded from (seed, k) first.

    Items: ``source_image`` (3, H, W) float in [0, 1], ``source_label`` (H, W) int64,
    ``target_image`` (3, H', W') float, ``target_valid`` (H', W') bool (False on padding and
    ignored borders) when the transform gives it, and ``target_label`` (H', W') int64 when the target
    set is labelled (only the oracle may use it).
    """

    def __init__(self, source: Dataset, target: Dataset, seed: int = 0):
        self.source, self.target = source, target
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, pair: tuple[int, ...]) -> dict:
        i, j = pair[:2]
        if len(pair) > 2:
            sample_seed = int(
                np.random.SeedSequence([self.seed % 2**32, pair[2]]).generate_state(1)[0]
            )
            reseed_transforms(self, sample_seed)
            for side in (self.source, self.target):
                if hasattr(side, "reseed"):  # e.g. Rare Class Sampling
                    side.reseed(sample_seed)
        s, t = self.source[i], self.target[j]
        item = {"source_image": s["image"], "source_label": s["label"], "target_image": t["image"]}
        if "valid" in t:  # padding / ignored borders of the target crop
            item["target_valid"] = t["valid"]
        if "label" in t:
            item["target_label"] = t["label"]
        return item


class UDADataModule(L.LightningDataModule):
    """Source-labelled + target-unlabelled training batches; target validation batches.

    Args:
        source_train: labelled source set (items ``image``, ``label``), transform included.
        target_train: target set (``image``; a ``label`` is passed on as ``target_label``).
        target_val: labelled target set for validation/testing.
        batch_size: (source, target) pairs per training batch (DAFormer: 2).
        num_workers: DataLoader workers for each loader.
        val_batch_size: validation batch size (1 for full-resolution Cityscapes images).
        pin_memory: pin host memory (faster host-to-GPU copies).
        persistent_workers: keep workers alive between epochs/validation runs.
        source_sampler_dataset: optional stand-in for ``source_train`` whose items ignore the
            index and pick their own image, e.g. Rare Class Sampling (it must draw from a
            per-worker seeded RNG; ``seed_worker`` seeds numpy/random in each worker).
        num_train_samples: pairs per training epoch; None -> enough for the trainer's
            ``max_steps`` (x accumulate_grad_batches x world size), or one pass over the
            source set when ``max_steps`` is unset.

    Train batches: ``source_image`` (B, 3, H, W) float, ``source_label`` (B, H, W) long,
    ``target_image`` (B, 3, H', W') float [, ``target_label`` (B, H', W') long].
    Val/test batches: ``image`` (B, 3, H, W) float, ``label`` (B, H, W) long, ``name`` list[str].
    """

    def __init__(
        self,
        source_train: Dataset,
        target_train: Dataset,
        target_val: Dataset,
        batch_size: int = 2,
        num_workers: int = 2,
        val_batch_size: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        source_sampler_dataset: Dataset | None = None,
        num_train_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.source_train = source_train
        self.target_train = target_train
        self.target_val = target_val
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_batch_size = val_batch_size
        self.pin_memory = pin_memory
        # DataLoader refuses persistent workers without workers.
        self.persistent_workers = persistent_workers and num_workers > 0
        self.source_sampler_dataset = source_sampler_dataset
        self.num_train_samples = num_train_samples
        # The data stream's seed: torch's global seed at construction, which Lightning's
        # seed_everything sets (taken now: restoring a checkpoint's RNG state changes it).
        self.seed = torch.initial_seed() % 2**63

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) of this process; (0, 1) outside a distributed trainer."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "set trainer.use_distributed_sampler=false: mpcl's data module shards its own "
                "sample stream over the ranks (trainer=ddp and trainer=ddp_sim do)"
            )
        return trainer.global_rank, trainer.world_size

    def _consumed_samples(self) -> int:
        """Samples of the stream already used, over all ranks (non-zero when resuming)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        _, world_size = self._shard()
        return trainer.global_step * trainer.accumulate_grad_batches * self.batch_size * world_size

    def _train_samples(self) -> int:
        if self.num_train_samples is not None:
            return self.num_train_samples
        trainer = self.trainer
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0:
            steps = trainer.max_steps * trainer.accumulate_grad_batches * trainer.world_size
            return steps * self.batch_size
        return len(self.source_train)

    def train_dataloader(self) -> DataLoader:
        source = self.source_sampler_dataset or self.source_train
        seed = self.seed
        dataset = PairedDataset(source, self.target_train, seed=seed)
        rank, world_size = self._shard()
        sampler = PairSampler(
            len(source),
            len(self.target_train),
            self._train_samples(),
            generator=torch.Generator().manual_seed(seed),
            start=self._consumed_samples(),
            rank=rank,
            world_size=world_size,
        )
        if self.num_workers == 0:  # no worker_init_fn runs: seed the transforms here
            reseed_transforms(dataset, seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=True,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed + 1),  # workers' base seeds
            persistent_workers=self.persistent_workers,
        )

    def _eval_loader(self) -> DataLoader:
        rank, world_size = self._shard()
        return DataLoader(
            self.target_val,
            batch_size=self.val_batch_size,
            sampler=ShardSampler(len(self.target_val), rank, world_size),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=seed_worker,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
