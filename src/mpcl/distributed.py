"""Rank awareness for multi-process training (DDP): who writes, who waits, how batches add up.

Under DDP every rank runs the whole script. Three rules keep N ranks equal to one process
on the union batch (N times the per-GPU ``data.batch_size``):

- *Files* (the synthetic benchmark cache, Rare Class Sampling statistics) are built by the
  first process that gets the lock, the others wait on it and then read the finished files:
  ``mpcl.io.file_lock``.
- *Reports, figures, W&B* happen on global rank 0 only (:func:`global_rank` reads the
  launcher's environment, so it is right before the process group exists too).
- *Batch statistics*: BatchNorm sees the union batch (``sync_batchnorm`` on GPUs;
  ``mpcl.run.sync_batchnorm`` on CPU processes, where torch's SyncBatchNorm refuses to run).
  The prototype statistics and Sinkhorn assignment are all-reduced by ``mpcl.prototypes``;
  the pseudo-label quality weight is the union batch's (:func:`mean_over_ranks`).
- *Random choices* of the step (ClassMix classes, colour jitter and blur, MIC blocks, the
  feature bank's picks) are drawn for the union batch on every rank and each keeps its own
  rows (:func:`rank_rand`).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Where launchers put the global rank: torchrun / Lightning's own launcher, SLURM, Open MPI.
_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def global_rank() -> int:
    """This process's global rank: from torch.distributed once initialised, else from the
    launcher's environment (0 for a single process).

    Lightning's own launcher gives its child processes only LOCAL_RANK and NODE_RANK; a rank
    is then reported as 0 only if both are 0 (enough to elect the one writer).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", "0") or 0)
    return local if node == 0 else local + 1


def is_rank_zero() -> bool:
    return global_rank() == 0


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def rank_rand(
    local_batch: int, *shape: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``torch.rand(local_batch, *shape)`` on the CPU: this rank's rows of one draw for the
    union batch.

    Every rank draws the numbers of all ``world_size x local_batch`` images from its
    generator (seeded alike on every rank, and advanced alike since every rank draws the same
    shapes) and keeps rows ``rank x local_batch ...``: the random choices of N ranks are those
    of one process on the union batch, whose rank r holds images r x B ... (r + 1) x B - 1.
    """
    world, rank = _world()
    u = torch.rand(world * local_batch, *shape, generator=generator, device="cpu")
    return u[rank * local_batch : (rank + 1) * local_batch]


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy CPU random numbers to ``device`` without blocking the host.

    A plain ``.to("cuda")`` of pageable memory synchronises the stream (the host waits for all
    queued GPU work); a pinned buffer copies asynchronously (the caching host allocator keeps
    it alive until the copy is done).
    """
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (itself in one process); no gradient.

    The mean of per-rank means is the union batch's mean when every rank averages over the
    same number of elements (equal per-rank batches and crops, as the data module ensures).
    """
    world, _ = _world()
    if world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world
