"""How a run was launched: the Hydra multirun + DDP check, the SLURM requeue checkpoint, and
the record each job of a multirun leaves (``<job dir>/job.json``) so that one failed job does
not end the sweep.

A multirun job never ends the process: ``mpcl.run.cli`` catches its failure (bad input,
divergence, a bug), prints the one line, records it with ``JobOutcome.write`` and returns, and
the launcher (basic or submitit) goes on with the next job. The :class:`SweepStatus` Hydra
callback remembers each sweep directory in the launching process; when the multirun has
ended, ``failed_jobs`` reads the records back and the command exits with
``mpcl.errors.SweepFailed`` (status 4) if any job failed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mpcl.io import atomic_write_bytes

log = logging.getLogger(__name__)

JOB_FILE = "job.json"  # each multirun job's record, in its output directory


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


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m`` or ``hydra.mode``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def in_job_process() -> bool:
    """Whether this multirun job has a process of its own (the submitit launchers), rather
    than sharing the process that launches the sweep (Hydra's basic launcher)."""
    from hydra.core.hydra_config import HydraConfig

    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    return "submitit" in launcher.lower()


@dataclass
class JobOutcome:
    """How one multirun job ended: its exit status (0 = finished) and its one-line error."""

    exit_status: int = 0
    error: str | None = None

    def fail(self, exit_status: int, error: str) -> None:
        self.exit_status, self.error = exit_status, error

    def write(self, output_dir: str | os.PathLike, return_value: Any = None) -> Path:
        """Write ``<output_dir>/job.json``: status, exit status, error, the value the task
        returned (a number, else null) and the job's overrides."""
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        number = isinstance(return_value, int | float) and not isinstance(return_value, bool)
        record = {
            "status": "finished" if self.exit_status == 0 else "failed",
            "exit_status": self.exit_status,
            "error": self.error,
            "return_value": return_value if number else None,
            "overrides": overrides,
        }
        out = Path(output_dir) / JOB_FILE
        atomic_write_bytes(out, (json.dumps(record, indent=2) + "\n").encode())
        return out


def read_job_record(job_dir: str | os.PathLike) -> dict | None:
    """A job's ``job.json`` (None if it wrote none: still running, or killed)."""
    path = Path(job_dir) / JOB_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"status": "failed", "exit_status": None, "error": f"unreadable {path}: {e}"}


def job_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """The job directories (``.hydra/overrides.yaml`` inside) of a sweep, in job order."""
    sweep = Path(sweep_dir)
    found = (p.parents[1] for p in sweep.glob("**/.hydra/overrides.yaml"))
    return sorted(
        found,
        key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(sweep).parts],
    )


def failed_jobs(sweep_dir: str | os.PathLike) -> tuple[list[tuple[Path, dict]], int]:
    """(the failed jobs of a finished sweep with their records, the number of jobs). A job
    without a record counts as failed: it was killed before it could write one."""
    jobs = job_dirs(sweep_dir)
    failed = []
    for job in jobs:
        record = read_job_record(job)
        if record is None:
            record = {"status": "failed", "exit_status": None, "error": "no job.json: killed?"}
        if record.get("status") != "finished":
            failed.append((job, record))
    return failed, len(jobs)


def sweep_failure_line(sweep_dir: str | os.PathLike) -> str | None:
    """One line naming how many jobs of the finished sweep failed and how (None: none did)."""
    failed, total = failed_jobs(sweep_dir)
    if not failed:
        return None
    shown = []
    for job, record in failed[:3]:
        error = str(record.get("error") or "").removeprefix("error: ")
        shown.append(f"job {job.name} (exit {record.get('exit_status')}: {error})")
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    return (
        f"{len(failed)} of {total} jobs failed: {'; '.join(shown)}{more}; every job's status: "
        f"{Path(sweep_dir) / 'summary.md'}"
    )


# Sweep directories this process launched, in order (``SweepStatus``); read by mpcl.run.cli.
launched_sweeps: list[Path] = []


class SweepStatus(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): remembers, in the process that launches
    a multirun, where its jobs write, so that the command can count the failed jobs at the
    end whichever launcher ran them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launched_sweeps.append(Path(str(config.hydra.sweep.dir)))
