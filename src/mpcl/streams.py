"""Common random numbers: one seeded CPU generator per random consumer of the training step.

Every consumer (ClassMix, the strong augmentation, MIC masks, HRDA detail crops, feature-bank
picks, K-Means seeding, the prototype head's and the prototypes' initial values) draws from
its own stream, seeded from the run's seed and the consumer's name. Switching one component
on or off then leaves every other draw identical, so "baseline vs MPCL, same seed" is a
paired comparison. (Dropout and stochastic depth inside the networks draw from torch's
global generator, which every student forward consumes alike; the data samplers have their
own generators, seeded from the run's seed: ``mpcl.data.datamodule``.)

Streams are CPU generators: their numbers are drawn on the CPU and copied to the device
(``mpcl.distributed.rank_rand`` / ``host_to_device``), never used on a CUDA tensor.

    streams = RandomStreams(seed=0, names=("classmix", "augment"))
    mask = class_mix_mask(labels, num_classes, generator=streams["classmix"])
    checkpoint["streams"] = streams.state_dict()     # exact resume
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the consumer ``name`` of a run seeded with ``seed`` (a hash: streams of
    different names, or of different run seeds, are unrelated)."""
    digest = hashlib.sha256(f"mpcl/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RandomStreams:
    """Named CPU generators, each seeded with ``stream_seed(seed, name)``.

    Args:
        seed: the run's seed.
        names: the consumers.
    """

    def __init__(self, seed: int, names: Iterable[str]) -> None:
        self.seed = int(seed)
        self._generators = {
            name: torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, name))
            for name in names
        }

    def __getitem__(self, name: str) -> torch.Generator:
        return self._generators[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._generators)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> generator state (uint8 CPU tensors: a checkpoint holds them as they are)."""
        return {name: g.get_state() for name, g in self._generators.items()}

    def load_state_dict(self, states: dict[str, torch.Tensor]) -> None:
        """Restore the streams a checkpoint saved (streams it lacks keep their fresh state)."""
        for name, state in states.items():
            if name in self._generators:
                self._generators[name].set_state(state)

    def __repr__(self) -> str:
        return f"RandomStreams(seed={self.seed}, names={list(self._generators)})"


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """Run the block on torch's global CPU generator seeded with ``stream_seed(seed, name)``
    and put the global state back afterwards: what the block draws (e.g. the initial weights
    of a module built in it) is its own stream, and the draws after it are as if it had not
    run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, name))
        yield
