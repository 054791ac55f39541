"""Checkpoint files: one-line errors for unreadable or mismatched files, the hand-over of an
already read checkpoint to Lightning, and stale temp files cleared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mpcl.errors import ConfigError
from mpcl.io import temp_name
from mpcl.run.checkpoint import (
    AtomicCheckpointIO,
    check_state_dict,
    read_checkpoint,
    remove_stale_checkpoint_temps,
    stored_run,
)


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "it is empty"),
        (b"PK\x03\x04 truncated", "cannot read checkpoint"),
        ({"weights": 1}, "has no state_dict"),
    ],
)
def test_unreadable_checkpoints_are_one_line(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        _save(path, content)
    with pytest.raises(ConfigError, match=message) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_read_checkpoint_and_stored_run(tmp_path):
    record = {"config": {"seed": 1}, "overrides": ["seed=1"], "version": "0.1.0"}
    path = _save(tmp_path / "a.ckpt", {"state_dict": {"w": torch.ones(2)}, "mpcl": record})
    checkpoint = read_checkpoint(path)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.ones(2))
    assert stored_run(checkpoint) == record
    assert stored_run({"state_dict": {}}) is None


def test_check_state_dict_names_the_first_difference():
    model = nn.Linear(3, 2)
    check_state_dict(model, model.state_dict(), "same.ckpt")
    other = nn.Linear(4, 2).state_dict()
    with pytest.raises(ConfigError, match=r"weight is \[2, 4\] in the checkpoint but \[2, 3\]"):
        check_state_dict(model, other, "other.ckpt")
    with pytest.raises(ConfigError, match=r"missing \['bias'\]"):
        check_state_dict(model, {"weight": model.weight}, "partial.ckpt")


def test_checkpoint_io_hands_over_what_was_read_once(tmp_path, monkeypatch):
    path = _save(tmp_path / "last.ckpt", {"state_dict": {}, "global_step": 3})
    loaded = {"state_dict": {}, "global_step": 3, "marker": True}
    io = AtomicCheckpointIO(loaded=(path, loaded))
    reads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or {"read": True})
    assert io.load_checkpoint(str(tmp_path / "." / "last.ckpt")) is loaded  # same file
    assert reads == []
    assert io.load_checkpoint(path) == {"read": True}  # handed over once only
    assert len(reads) == 1


def test_stale_temps_are_cleared_in_the_log_dir_and_beside_the_resume(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs" / "r1" / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    for d in (runs, elsewhere):
        d.mkdir(parents=True)
    dead_pid = 2**22 + 17  # above Linux's pid_max default: no such process
    stale = [
        temp_name(d / "last.ckpt").with_name(f".last.ckpt.{dead_pid}.tmp")
        for d in (runs, elsewhere)
    ]
    for p in stale:
        p.write_bytes(b"x")
    live = temp_name(runs / "step.ckpt")  # this process is alive: its temp stays
    live.write_bytes(b"x")
    assert remove_stale_checkpoint_temps(tmp_path / "logs", elsewhere) == 2
    assert not any(p.exists() for p in stale) and live.exists()
