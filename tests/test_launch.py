"""Cluster sweeps: the submitit launcher configs compose into the intended sbatch script, and a
job that hits the SLURM time limit is checkpointed, requeued and resumes from its own run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, subprocess_env, tiny_synthetic
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mpcl.run.launch import requeue_checkpoint

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='pip install -e ".[cluster]"')
TESTS = Path(__file__).parent


@pytest.mark.slow
def test_slurm_launcher_composes_with_cfg_hydra(tmp_path):
    cmd = [
        sys.executable, "-m", "mpcl.train", "hydra/launcher=submitit_slurm", "trainer=ddp",
        "hydra.launcher.partition=a100", "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.timeout_min=600", "hydra.launcher.mem_gb=128", "--cfg", "hydra",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = OmegaConf.create(proc.stdout).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node) == ("a100", 4)
    assert (launcher.timeout_min, launcher.mem_gb) == (600, 128)
    assert "is validated against ConfigStore schema" not in proc.stderr  # no warning per run


def _sbatch_script(cfg, folder: Path) -> str:
    """The sbatch file submitit would submit for this launcher config (as the plugin's
    ``launch`` passes the parameters on)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = dict(instantiate(cfg.hydra.launcher).params)
    executor = submitit.AutoExecutor(
        folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m mpcl.train", "uid")


def test_sbatch_script_has_resources_signal_and_one_task_per_gpu(tmp_path, monkeypatch):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")  # submitit looks for srun
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    overrides = [
        "hydra/launcher=submitit_slurm", "trainer=ddp", "hydra.launcher.partition=a100",
        "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2", "trainer.num_nodes=2",
    ]  # fmt: skip
    cfg = compose_train(overrides, tmp_path / "run")
    lines = set(_sbatch_script(cfg, tmp_path / "submitit").splitlines())
    for flag in (
        "--partition=a100",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",  # one DDP rank per GPU: Lightning starts no process itself
        "--nodes=2",
        "--time=1440",
        "--mem=64GB",
        "--cpus-per-task=8",
        "--signal=USR1@120",  # Lightning's requeue signal, not submitit's USR2
        "--requeue",
    ):
        assert f"#SBATCH {flag}" in lines, flag
    local = compose_train(["hydra/launcher=submitit_local"], tmp_path / "local")
    assert local.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")


def test_requeued_job_resumes_from_its_newest_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"a")
    hpc.write_bytes(b"b")
    os.utime(last, (1000, 1000))
    os.utime(hpc, (2000, 2000))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeue_checkpoint(tmp_path) is None  # a fresh job starts from scratch
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeue_checkpoint(tmp_path) == str(hpc)
    os.utime(last, (3000, 3000))  # a periodic checkpoint after the signal one: it is newer
    assert requeue_checkpoint(tmp_path) == str(last)
    assert requeue_checkpoint(tmp_path / "elsewhere") is None


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes(cache_dir, tmp_path):
    """SIGUSR1 at step 3 of 6 under SLURM: Lightning writes hpc_ckpt_1.ckpt and runs
    `scontrol requeue <job>`; the job is killed; the requeued job resumes at step 3."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    log = tmp_path / "scontrol.log"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = subprocess_env(cache_dir)
    env.update(
        PATH=f"{fake_bin}:{env['PATH']}",
        PYTHONPATH=f"{TESTS}:{env.get('PYTHONPATH', '')}",
        SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NAME="train",
        SLURM_JOB_ID="4242", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
        SLURM_NODELIST="node1",
    )  # fmt: skip
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mpcl.train", f"hydra.run.dir={run_dir}", *tiny_synthetic(),
        f"paths.cache_dir={cache_dir}", "trainer.max_steps=6", "trainer.val_check_interval=6",
        "evaluate=false", "callbacks.figures=null", "callbacks.progress_bar=null",
        "+callbacks.time_limit._target_=hydra_targets.SlurmTimeLimitAt",
        "+callbacks.time_limit.step=3",
    ]  # fmt: skip
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -9, first.stderr[-3000:]  # killed after the requeue
    assert log.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True, map_location="cpu")
    assert hpc["global_step"] == 3
    second = subprocess.run(
        cmd, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in second.stdout + second.stderr  # restored from it
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
