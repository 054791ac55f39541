"""How a run was launched: the Hydra multirun + DDP check, and the SLURM requeue checkpoint."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


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
