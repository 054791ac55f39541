"""Where a run continues from: the checkpoint read once, its step checked for every training
run, its weights checked against the model, a requeued SLURM job's own checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import mpcl.run.checkpoint as checkpoint_module
from mpcl.errors import ConfigError
from mpcl.run.resume import CheckpointFile, resume_for_training


def _ckpt(path: Path, step: int, model: nn.Module | None = None) -> Path:
    state = (model or nn.Linear(2, 2)).state_dict()
    record = {"config": {}, "overrides": ["seed=3"], "version": "0.1.0"}
    torch.save({"state_dict": state, "global_step": step, "mpcl": record}, path)
    return path


def _cfg(tmp_path: Path, ckpt: Path | None, max_steps: int = 10, task_name: str = "train"):
    return OmegaConf.create(
        {
            "ckpt_path": str(ckpt) if ckpt else None,
            "task_name": task_name,
            "trainer": {"max_steps": max_steps},
            "paths": {"output_dir": str(tmp_path / "run")},
        }
    )


def test_checkpoint_file_reads_once_and_tells_step_and_record(tmp_path):
    f = CheckpointFile.read(_ckpt(tmp_path / "a.ckpt", 4))
    assert f.step == 4 and f.record["overrides"] == ["seed=3"]
    assert f.is_of(tmp_path / "." / "a.ckpt") and not f.is_of(tmp_path / "b.ckpt")
    assert not f.is_of(None)


@pytest.mark.parametrize("task_name", ["train", "myrun"])
def test_a_resume_with_nothing_left_to_train_is_refused_whatever_the_task_name(tmp_path, task_name):
    ckpt = _ckpt(tmp_path / "a.ckpt", 120)
    with pytest.raises(ConfigError, match="nothing left to train; set trainer.max_steps above 120"):
        resume_for_training(_cfg(tmp_path, ckpt, max_steps=60, task_name=task_name))
    assert resume_for_training(_cfg(tmp_path, ckpt, max_steps=121)).step == 120


def test_resume_uses_the_file_already_read(tmp_path, monkeypatch):
    ckpt = _ckpt(tmp_path / "a.ckpt", 2)
    given = CheckpointFile.read(ckpt)
    reads = []
    monkeypatch.setattr(checkpoint_module, "_load", lambda p: reads.append(p))
    assert resume_for_training(_cfg(tmp_path, ckpt), given) is given
    assert reads == []
    other = _ckpt(tmp_path / "b.ckpt", 2)  # a different file is read
    monkeypatch.undo()
    assert resume_for_training(_cfg(tmp_path, other), given).path == other


def test_a_requeued_job_resumes_from_its_own_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, None)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    _ckpt(last, 5)
    assert resume_for_training(cfg) is None  # a fresh job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_for_training(cfg).path == last


def test_weights_of_another_model_are_one_line(tmp_path):
    f = CheckpointFile.read(_ckpt(tmp_path / "a.ckpt", 1, nn.Linear(2, 3)))
    with pytest.raises(ConfigError, match="does not match the configured model"):
        f.load_into(nn.Linear(2, 2))
    model = nn.Linear(2, 3)
    f.load_into(model)
    assert torch.equal(model.weight, f.contents["state_dict"]["weight"])
