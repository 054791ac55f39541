"""The console commands around Hydra: stored overrides from a checkpoint, the checkpoint read
once on its way to Lightning, and one line with an exit status for each error type."""

from __future__ import annotations

import signal

import pytest
import torch
from conftest import tiny_synthetic
from faults import TINY_MODEL, error_lines, run_main

import mpcl.train
from mpcl.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    CheckpointError,
    ConfigError,
    RunInterrupted,
    TrainingDiverged,
)
from mpcl.run.cli import _ckpt_argument, checkpoint_overrides, report_error

RECORD = {
    "overrides": [
        "experiment=x",
        "prototype.K=3",
        "trainer.max_steps=9",
        "logger=wandb",
        "task_name=t",
    ]
}


def test_stored_overrides_go_first_unless_the_command_line_sets_them():
    argv = ["ckpt_path=a.ckpt", "trainer.max_steps=20"]
    assert checkpoint_overrides(argv, "train", RECORD) == [
        "experiment=x",
        "prototype.K=3",
        "logger=wandb",
    ]
    # eval/predict do not switch loggers and callbacks back on
    assert checkpoint_overrides(argv, "eval", RECORD) == ["experiment=x", "prototype.K=3"]
    assert checkpoint_overrides(argv, "train", None) == []


def test_the_last_ckpt_path_on_the_command_line_counts():
    assert _ckpt_argument(["ckpt_path=a", "x=1", "ckpt_path=b"]) == "b"
    assert _ckpt_argument(["ckpt_path=null"]) is None and _ckpt_argument(["-m"]) is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad value x"), EXIT_BAD_INPUT),
        (CheckpointError("bad weights"), EXIT_BAD_INPUT),
        (FileNotFoundError("no such file y"), EXIT_BAD_INPUT),
        (TrainingDiverged("training diverged at step 2"), EXIT_DIVERGED),
        (RunInterrupted(signal.SIGTERM, 3, "/r/last.ckpt"), 128 + signal.SIGTERM),
    ],
)
def test_each_error_type_has_its_exit_status(error, code, capsys):
    with pytest.raises(SystemExit) as info, report_error():
        raise error
    assert info.value.code == code == getattr(error, "exit_code", EXIT_BAD_INPUT)
    err = capsys.readouterr().err
    assert str(error).splitlines()[0] in err


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError), report_error():
        raise KeyError("a bug")


@pytest.mark.slow
def test_a_resume_reads_its_checkpoint_once(cache_dir, tmp_path, monkeypatch):
    """``ckpt_path=`` is read by the command line; the run and Lightning get what it read."""
    argv = [
        f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={tmp_path}",
        *tiny_synthetic(),
        *TINY_MODEL,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.figures=null",
        "evaluate=false",
    ]
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 0, err[-3000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    real, reads = torch.load, []

    def counting_load(f, *args, **kwargs):
        name = str(getattr(f, "name", getattr(f, "path", f)))
        if name.endswith(".ckpt"):
            reads.append(name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    code, out, err = run_main(mpcl.train.main, [f"ckpt_path={ckpt}", "trainer.max_steps=3"])
    assert code == 0, error_lines(err) or err[-3000:]
    assert reads == [str(ckpt.resolve())] or reads == [str(ckpt)], reads
