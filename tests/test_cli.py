"""The console commands around Hydra: stored overrides from a checkpoint, the checkpoint read
once on its way to Lightning, and one line with an exit status for each error type."""

from __future__ import annotations

import io
import os
import signal
import sys
from contextlib import redirect_stdout

import pytest
import torch
from conftest import tiny_synthetic
from faults import TINY_MODEL, error_lines, run_main

import mpcl.train
from mpcl.errors import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_SWEEP_FAILED,
    CheckpointError,
    ConfigError,
    RunInterrupted,
    SweepFailed,
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
        (SweepFailed("1 of 2 jobs failed: job 0 (exit 3: ...)"), EXIT_SWEEP_FAILED),
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
        # a path (str or Path: a Path's .name is only its last part) or an open file
        name = str(f) if isinstance(f, str | os.PathLike) else str(getattr(f, "name", f))
        if name.endswith(".ckpt"):
            reads.append(name)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    code, out, err = run_main(mpcl.train.main, [f"ckpt_path={ckpt}", "trainer.max_steps=3"])
    assert code == 0, error_lines(err) or err[-3000:]
    assert reads == [str(ckpt.resolve())] or reads == [str(ckpt)], reads


@pytest.mark.parametrize(
    ("argv0", "prog"),
    [("mpcl.train", "python -m mpcl.train"), ("/venv/bin/mpcl-train", "mpcl-train")],
)
def test_help_is_a_short_usage_with_examples_named_as_typed(argv0, prog, monkeypatch):
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    out = io.StringIO()
    with pytest.raises(SystemExit) as info, redirect_stdout(out):
        mpcl.train.main()
    text = out.getvalue()
    assert info.value.code == 0
    assert text.startswith(f"usage: {prog} [-m] ")
    assert f"  {prog} -m prototype.K=1,3,5" in text  # the README's examples, first
    assert text.index("examples:") < text.index("config groups")
    assert "prototype: centroid, gaussian, none" in text
    assert f"{prog} [overrides] --cfg job" in text
    assert len(text.splitlines()) < 50 and "_target_" not in text  # no config dump


def test_prepare_help_names_the_command_as_typed(monkeypatch, capsys):
    import mpcl.prepare

    monkeypatch.setattr(sys, "argv", ["/venv/bin/mpcl-prepare", "--help"])
    with pytest.raises(SystemExit):
        mpcl.prepare.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: mpcl-prepare ")
