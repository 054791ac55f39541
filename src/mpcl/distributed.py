"""Rank awareness for multi-process training (DDP): who writes, who waits, how batches add up.

Under DDP every rank runs the whole script. Three rules keep N ranks equal to one process
on the union batch (N times the per-GPU ``data.batch_size``):

- *Files* (the synthetic benchmark cache, Rare Class Sampling statistics) are built by the
  first process that gets the lock, the others wait on it and then read the finished files:
  :func:`file_lock`. It works before ``torch.distributed`` is initialised (the data sets are
  built before Lightning starts the process group) and across nodes on a shared file system.
- *Reports, figures, W&B* happen on global rank 0 only (:func:`global_rank` reads the
  launcher's environment, so it is right before the process group exists too).
- *Batch statistics*: BatchNorm sees the union batch (``sync_batchnorm`` on GPUs;
  :class:`GlobalBatchNorm` on CPU processes, where torch's SyncBatchNorm refuses to run).
  The prototype statistics and Sinkhorn assignment are all-reduced by ``mpcl.prototypes``;
  the pseudo-label quality weight is the union batch's (:func:`mean_over_ranks`).
- *Random choices* of the step (ClassMix classes, colour jitter and blur, MIC blocks, the
  feature bank's picks) are drawn for the union batch on every rank and each keeps its own
  rows (:func:`rank_rand`).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import nn

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


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block.

    One process at a time runs the block: the first builds a cache, the others wait, then
    find it built. The kernel drops ``flock`` locks with the file descriptor, so a killed
    builder never blocks the next run. The lock file is removed on release (while still
    held); a waiter that then holds a removed file sees that and locks the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")  # held across the yield
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break  # the file we locked is still the lock file
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


# ---------------------------------------------------------------------------- BatchNorm


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the union batch over all ranks.

    torch's ``SyncBatchNorm`` only runs on GPUs; this is the same computation with
    ``torch.distributed.nn`` all-reduces (differentiable, any backend), for CPU ranks
    (``trainer=ddp_sim``). Two passes, as ``F.batch_norm``: the mean, then the variance
    around it, so the result matches one process on the union batch to float rounding.

    Not constructed directly: :class:`SyncBatchNormAnyDevice` swaps the class of existing
    BatchNorm layers in place (parameters and buffers stay the same tensors).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...) -> (B, C, ...)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        count = x.new_tensor(float(x.numel() // x.shape[1]))
        sums = all_reduce(torch.cat([x.sum(dims), count[None]]))
        total = sums[-1]
        mean = sums[:-1] / total
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:  # cumulative moving average
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2-D input, got {x.dim()}-D")


class SyncBatchNormAnyDevice(LayerSync):
    """Lightning ``LayerSync`` plugin: every BatchNorm layer normalises with union-batch
    statistics (:class:`GlobalBatchNorm`), on any device and process-group backend.

    ``trainer=ddp_sim`` uses it (``trainer.plugins``); on GPUs ``trainer.sync_batchnorm``
    (torch's fused SyncBatchNorm) does the same faster.
    """

    _ORIGINAL = "_mpcl_original_class"

    def apply(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
                module, GlobalBatchNorm
            ):
                setattr(module, self._ORIGINAL, type(module))
                module.__class__ = GlobalBatchNorm
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            original = module.__dict__.pop(self._ORIGINAL, None)
            if original is not None:
                module.__class__ = original
        return model


# ---------------------------------------------------------------------------- launch checks


def check_launch(cfg) -> None:
    """Refuse the one combination that is broken upstream: a Hydra multirun on the basic
    (in-process) launcher with a Lightning-launched multi-process strategy. Lightning would
    re-run ``sys.argv`` (``-m`` and the whole sweep) in every rank.

    Raises ValueError naming the fix (one job per GPU, or the submitit launcher).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if "submitit" in launcher.lower():
        return  # submitit starts one task per GPU itself; Lightning does not re-launch
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return  # processes were started by torchrun
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    many = devices in ("auto", -1, "-1") or (isinstance(devices, int) and devices > 1)
    many = many or not isinstance(devices, int | str)  # a list of device ids
    strategy = trainer.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else str(strategy.get("_target_", ""))
    if many and "ddp" in name.lower():
        raise ValueError(
            "a multirun (-m) cannot start DDP processes itself (Lightning re-runs the whole "
            "sweep in every rank): sweep one job per GPU (trainer=gpu), or use "
            "hydra/launcher=submitit_slurm (tasks_per_node = trainer.devices)"
        )


# ---------------------------------------------------------------------------- SLURM requeue


def requeue_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a requeued SLURM job resumes from: the newest of its own run
    directory's ``hpc_ckpt_<n>.ckpt`` (saved by Lightning on the time-limit signal) and
    ``checkpoints/last.ckpt`` (the periodic one, all there is after a node failure).

    None unless this is a restarted job (SLURM sets SLURM_RESTART_COUNT > 0 on a requeue)
    with a checkpoint there: a fresh run starts from scratch.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    run_dir = Path(output_dir)
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), run_dir / "checkpoints" / "last.ckpt"]
    found = [p for p in found if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    log.info("requeued SLURM job: resuming from %s", newest)
    return str(newest)
