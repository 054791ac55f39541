"""Nothing lost (issue 9), tested by injecting the faults: the printed checkpoint is the final
model; checkpoints are atomic under SIGKILL and a full disk; SIGINT/SIGTERM save a resumable
checkpoint; a NaN loss stops the run; a checkpoint rebuilds its run; the log file holds the
console; and >= 30 kinds of bad input get one line and leave nothing behind.

Every interrupted run is resumed and must reach the uninterrupted run's weights bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from conftest import TINY_SYNTHETIC, subprocess_env, tiny_synthetic
from fake_trees import make_gta
from faults import TINY_MODEL, SignalAt, error_lines, run_main

import mpcl.eval
import mpcl.predict
import mpcl.prepare
import mpcl.train
from mpcl.errors import ConfigError
from mpcl.io import remove_stale_temps, temp_name
from mpcl.run.checkpoint import AtomicCheckpointIO

FAULTS = Path(__file__).parent / "faults.py"


def common(cache_dir: Path, log_dir: Path, experiment: str = "synthetic_gaussian") -> list[str]:
    """5 steps, periodic checkpoints at 2 and 4 (the final one at 5 is the fix under test)."""
    return [
        f"experiment={experiment}",
        f"paths.cache_dir={cache_dir}",
        f"paths.log_dir={log_dir}",
        *tiny_synthetic(experiment),
        *TINY_MODEL,
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.figures=null",
        "uda.scheduler.warmup_steps=4",
    ]


def printed_checkpoint(stdout: str) -> Path:
    return Path(re.search(r"checkpoint:\s*(\S+)", stdout).group(1))


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs after resume"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich must not fold the printed paths


@pytest.fixture(scope="module")
def baseline(cache_dir, tmp_path_factory):
    """The uninterrupted run, through the console entry: its printed checkpoint and mIoU."""
    logs = tmp_path_factory.mktemp("baseline")
    os.environ["COLUMNS"] = "400"
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        code, out, err = run_main(mpcl.train.main, common(cache_dir, logs))
    finally:
        os.environ.pop("COLUMNS", None)
    assert code == 0, err[-3000:]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    miou = float(re.search(r"mIoU\s*│\s*([\d.]+)", out).group(1))
    return {"ckpt": printed_checkpoint(out), "miou": miou, "out": out, "logs": logs}


def resume(command: str) -> Path:
    """Run a printed ``python -m mpcl.train ...`` command in this process; its checkpoint."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "mpcl.train"], command
    code, out, err = run_main(mpcl.train.main, argv[3:])
    assert code == 0, err[-3000:]
    return printed_checkpoint(out)


# ---------------------------------------------------------------- 1. the final checkpoint
@pytest.mark.slow
def test_printed_checkpoint_is_the_model_behind_the_printed_miou(baseline):
    ckpt = baseline["ckpt"]
    assert ckpt.name == "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 5
    names = sorted(p.name for p in ckpt.parent.iterdir())
    assert names == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt", "step_000005.ckpt"]
    # Evaluated from the checkpoint alone (item 8): the same mIoU as the run printed.
    code, out, err = run_main(mpcl.eval.main, [f"ckpt_path={ckpt}"])
    assert code == 0, err[-3000:]
    results = Path(re.search(r"results: (\S+)", out).group(1))
    assert json.loads(results.read_text())["means"]["mIoU"] == pytest.approx(
        baseline["miou"], abs=0.006
    )


# ---------------------------------------------------------------- 7. the log file
@pytest.mark.slow
def test_train_log_holds_what_the_console_shows(baseline):
    log = (baseline["ckpt"].parents[1] / "train.log").read_text()
    for text in (
        "config: experiment=synthetic_gaussian",
        "schedule: max_steps=5",
        "step 3/5 | train/loss",
        "validation at step 5: ",
        "target val IoU",
        f"{baseline['miou']:.2f}",
        f"checkpoint: {baseline['ckpt']}",
    ):
        assert text in log, text
    (validation,) = [line for line in log.splitlines() if "validation at step 5: " in line]
    assert "val/mIoU " in validation


# ---------------------------------------------------------------- 8. self-describing
@pytest.mark.slow
def test_checkpoint_rebuilds_its_run_and_explicit_overrides_win(baseline, tmp_path):
    ckpt = baseline["ckpt"]
    record = torch.load(ckpt, map_location="cpu", weights_only=True)["mpcl"]
    config = record["config"]
    assert config["model"]["proto_head"]["proto_dim"] == 32
    assert config["trainer"]["max_steps"] == 5
    assert "model.encoder.depths=[1,1,1,1]" in record["overrides"]
    # predict from the checkpoint alone, one explicit override
    code, out, err = run_main(
        mpcl.predict.main, [f"ckpt_path={ckpt}", "split=val", f"paths.log_dir={tmp_path}"]
    )
    assert code == 0, err[-3000:]
    (run,) = tmp_path.glob("predict/runs/*")
    assert len(list((run / "labelIds").glob("*.png"))) == 2  # benchmark.num_target_val=2
    assert "model.encoder.depths=[1,1,1,1]" in (run / ".hydra/overrides.yaml").read_text()
    # an explicit override wins over the stored one
    code, out, err = run_main(
        mpcl.eval.main, [f"ckpt_path={ckpt}", "prototype.K=2", f"paths.log_dir={tmp_path}"]
    )
    assert code == 2 and "does not match the configured model" in error_lines(err)[0]


# ---------------------------------------------------------------- 5. interrupts
@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(baseline, cache_dir, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption notice) in the middle of step 3, in this process."""
    build = mpcl.train.build

    def build_with_signal(cfg, *args):
        datamodule, module, trainer = build(cfg, *args)
        trainer.callbacks.insert(0, SignalAt(3, signal.SIGTERM))
        return datamodule, module, trainer

    monkeypatch.setattr(mpcl.train, "build", build_with_signal)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code, out, err = run_main(mpcl.train.main, common(cache_dir, tmp_path))
    monkeypatch.setattr(mpcl.train, "build", build)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert "interrupted by SIGTERM at step 3" in err
    command = re.search(r"resume with: (.+)", err).group(1)
    saved = Path(shlex.split(command)[-1].split("=", 1)[1])
    assert torch.load(saved, map_location="cpu", weights_only=True)["global_step"] == 3
    assert not [p for p in saved.parent.iterdir() if p.name.endswith(".tmp")]
    assert_same_weights(resume(command), baseline["ckpt"])  # the checkpoint alone resumes


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(baseline, cache_dir, tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C), from outside, mid-run."""
    proc = subprocess.Popen(
        [sys.executable, str(FAULTS), "slow", "0.2", "--", *common(cache_dir, tmp_path)],
        env=subprocess_env(cache_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(tmp_path.glob("train/runs/*/train.log"))
        if logs and "step 3/5" in logs[0].read_text():
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    step = int(re.search(r"interrupted by SIGINT at step (\d)", stderr).group(1))
    assert step in (4, 5)
    assert_same_weights(resume(re.search(r"resume with: (.+)", stderr).group(1)), baseline["ckpt"])


# ---------------------------------------------------------------- 3. atomic checkpoints
@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(baseline, cache_dir, tmp_path):
    argv = [*common(cache_dir, tmp_path), "callbacks.model_checkpoint.every_n_train_steps=3"]
    proc = subprocess.Popen(
        [sys.executable, str(FAULTS), "hang-in-save", "5", "--", *argv],
        env=subprocess_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:  # the final save (step 5) has written part of its temp file
        if line.startswith("HANG-IN-SAVE"):
            orphan = Path(line.split()[1])
            break
    proc.kill()
    proc.wait(timeout=60)
    ckpt_dir = orphan.parent
    assert orphan.stat().st_size == 65536 and orphan.name.startswith(".step_000005.ckpt.")
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["last.ckpt", "step_000003.ckpt"]
    last = ckpt_dir / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    final = resume(f"python -m mpcl.train ckpt_path={last}")
    assert not orphan.exists()  # cleaned at the next start
    assert_same_weights(final, baseline["ckpt"])


def test_failing_writer_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk mid-save (torch reports it as a RuntimeError over the OSError)."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    good = path.read_bytes()
    real_save = torch.save
    written_to = []

    def full_disk(obj, f, *args, **kwargs):
        written_to.append(Path(f.name))
        f.write(b"half a checkpoint")
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail] file write failed")  # noqa: B904 (as torch)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # never used: same directory
    with pytest.raises(OSError, match=f"could not write {path}: No space left on device"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert written_to[0].parent == tmp_path and written_to[0] == temp_name(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_file_size_limit_is_one_line_and_leaves_no_partial_checkpoint(baseline, tmp_path):
    """A real size limit (``ulimit -f``): the first checkpoint cannot be written."""
    limit = baseline["ckpt"].stat().st_size // 2
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code, out, err = run_main(
            mpcl.train.main,
            [
                f"ckpt_path={baseline['ckpt']}",
                "trainer.max_steps=7",
                f"paths.log_dir={tmp_path}",
            ],
        )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2, err[-3000:]
    (line,) = error_lines(err)
    assert re.search(r"could not write \S+/step_000006\.ckpt: File too large", line), line
    assert not [p for p in files_under(tmp_path) if ".ckpt" in p.name]


# ---------------------------------------------------------------- 4. divergence
@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_finite_checkpoint(
    cache_dir, tmp_path, monkeypatch
):
    import mpcl.models.segmentor as segmentor

    calls = []
    real = segmentor.weighted_cross_entropy

    def nan_at_step_3(logits, labels, weights=None):  # the mixed loss of step 3 (call 6)
        calls.append(1)
        loss = real(logits, labels, weights)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(segmentor, "weighted_cross_entropy", nan_at_step_3)
    argv = [*common(cache_dir, tmp_path), "trainer.log_every_n_steps=4"]  # checked at step 4
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 3, err[-3000:]
    (line,) = error_lines(err)
    assert line.startswith("error: training diverged at step 3: train/loss_mixed became nan")
    assert "(stopped at step 4)" in line
    last = Path(re.search(r"the last finite checkpoint is (\S+);", line).group(1))
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step_000002.ckpt"]
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )
    assert line in (last.parents[1] / "train.log").read_text()


@pytest.mark.slow
def test_huge_learning_rate_diverges_with_one_line(cache_dir, tmp_path):
    argv = [*common(cache_dir, tmp_path, "synthetic_baseline"), "uda.optimizer.lr=1e30"]
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 3, err[-3000:]
    (line,) = error_lines(err)
    assert line.startswith("error: training diverged at step ") and "uda.optimizer.lr" in line
    assert "IoU" not in out  # no normal-looking table


# ---------------------------------------------------------------- 2. checked image writes
def test_synthetic_cache_is_not_marked_complete_on_a_full_disk(tmp_path):
    from mpcl.data.synthetic import generate

    sizes = dict(image_size=(64, 128), num_source_train=2, num_target_train=2, num_target_val=1)
    stale = tmp_path / ".synthetic-v1-seed0-64x128-s2-t2-v1.tmp-999999999@x-abc"
    stale.mkdir()  # a killed generation on another machine, long ago
    os.utime(stale, (0, 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        with pytest.raises(OSError, match=r"could not write \S+/00000\.png: File too large"):
            generate(tmp_path, **sizes)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []  # no "complete" set, no temp dir, stale one gone
    root = generate(tmp_path, **sizes)
    assert json.loads((root / "meta.json").read_text())["source_train"] == 2
    assert len(list(root.rglob("*.png"))) == 2 * (2 + 2 * (2 + 1))  # images and labels


def test_figures_write_failure_names_the_file(tmp_path, monkeypatch):
    from mpcl.monitor.figures import save_png

    def full(path, data, sync=True):
        raise OSError(28, f"could not write {path}: No space left on device")

    monkeypatch.setattr("mpcl.io.atomic_write_bytes", full)
    with pytest.raises(OSError, match="predictions_step000010.png"):
        save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "predictions_step000010.png")


def test_stale_temps_are_removed_only_when_their_writer_is_gone(tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid  # a writer that has exited
    live = temp_name(tmp_path / "a.ckpt")  # this process: still writing
    live.write_bytes(b"x")
    killed = tmp_path / f".b.ckpt.{dead}@{live.name.split('@')[1].removesuffix('.tmp')}.tmp"
    killed.write_bytes(b"x")
    foreign_new = tmp_path / ".c.ckpt.1@otherhost.tmp"
    foreign_new.write_bytes(b"x")
    foreign_old = tmp_path / ".d.ckpt.1@otherhost.tmp"
    foreign_old.write_bytes(b"x")
    os.utime(foreign_old, (0, 0))
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign_new.name])


# ---------------------------------------------------------------- 6. the bad-input matrix
@pytest.fixture(scope="module")
def bad_trees(tmp_path_factory):
    """Dataset trees a user might point mpcl.prepare at by mistake."""
    d = tmp_path_factory.mktemp("bad")
    make_gta(d / "gta", n=2)
    make_gta(d / "corrupt", n=3)
    (d / "corrupt" / "labels" / "00001.png").write_bytes(b"not a png")
    make_gta(d / "label50", n=2)  # a trainId label from another label space, already there
    cv2.imwrite(
        str(d / "label50" / "labels" / "00001_labelTrainIds.png"), np.full((8, 8), 50, np.uint8)
    )
    (d / "a_file").write_text("x")
    return {"dir": d, "ckpt": None}


def bad_cache(cache_dir: Path, dest: Path, label: str | None = None, image: str | None = None):
    """A copy of the tiny synthetic benchmark in which ``label`` (a glob under the set's
    root) holds the value 50 somewhere, and ``image`` is cut to half its bytes."""
    (tiny,) = cache_dir.glob("synthetic-*-64x128-s6-t6-v2")  # TINY_SYNTHETIC's
    root = dest / tiny.name
    shutil.copytree(tiny, root)
    for path in root.glob(label) if label else ():
        ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        ids[0, :7] = 50
        cv2.imwrite(str(path), ids)
    for path in root.glob(image) if image else ():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def bad_files(baseline, bad_trees, cache_dir):
    """Checkpoints (and benchmark copies) a user might pass by mistake."""
    d = bad_trees["dir"]
    bad_cache(cache_dir, d / "val_label_50", label="real/val/labels/00000.png")
    (d / "empty.ckpt").write_bytes(b"")
    (d / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    good = baseline["ckpt"].read_bytes()
    (d / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    torch.save({"weights": torch.zeros(2)}, d / "foreign.ckpt")
    return {"dir": d, "ckpt": baseline["ckpt"]}


TRAIN, EVAL, PREDICT = mpcl.train.main, mpcl.eval.main, mpcl.predict.main
# (entry, arguments with {ckpt} / {bad} placeholders, fragments of the one error line)
HYDRA_CASES = [
    (TRAIN, ["experiment=does_not_exist"], ["unknown experiment 'does_not_exist': choose one of"]),
    (TRAIN, ["prototype=banana"], ["unknown prototype 'banana'"]),
    (TRAIN, ["trainer.max_steps=-5"], ["trainer.max_steps=-5 must be a positive integer"]),
    (TRAIN, ["trainer.max_steps=abc"], ["trainer.max_steps='abc' must be a positive integer"]),
    (TRAIN, ["trainer.max_stepz=5"], ["'trainer.max_stepz'", "did you mean trainer.max_steps"]),
    (TRAIN, ["modle=small"], ["'modle'", "did you mean model"]),
    (TRAIN, ["+trainer.max_steps=3"], ["An item is already at 'trainer.max_steps'"]),
    (TRAIN, ["trainer.max_steps=[1,"], ["'trainer.max_steps=[1,'"]),
    (TRAIN, ["prototype.K=0"], ["prototype.K=0 must be >= 1"]),
    (TRAIN, ["prototype.K=2.5"], ["prototype.K=2.5 must be >= 1", "(an integer"]),
    (TRAIN, ["prototype.temperature=0"], ["prototype.temperature=0 must be > 0"]),
    (TRAIN, ["prototype.lambda_contrast=-1"], ["prototype.lambda_contrast=-1 must be >= 0"]),
    (TRAIN, ["prototype.lambda_consistency=-0.5"], ["prototype.lambda_consistency=-0.5"]),
    (TRAIN, ["uda.optimizer.weight_decay=-0.1"], ["uda.optimizer.weight_decay=-0.1 must be >= 0"]),
    (TRAIN, ["uda.optimizer.lr=nan"], ["uda.optimizer.lr=nan must be > 0"]),
    (TRAIN, ["data.batch_size=0"], ["data.batch_size=0 must be a positive integer"]),
    (TRAIN, ["seed=abc"], ["seed='abc' must be an integer"]),
    (
        TRAIN,
        ["ckpt_path=/nonexistent/last.ckpt"],
        ["ckpt_path=/nonexistent/last.ckpt does not exist"],
    ),
    (TRAIN, ["ckpt_path={bad}/empty.ckpt"], ["empty.ckpt: it is empty (0 bytes"]),
    (TRAIN, ["ckpt_path={bad}/random.ckpt"], ["cannot read checkpoint", "random.ckpt"]),
    (TRAIN, ["ckpt_path={bad}/truncated.ckpt"], ["cannot read checkpoint", "truncated.ckpt"]),
    (TRAIN, ["ckpt_path={bad}/foreign.ckpt"], ["foreign.ckpt has no state_dict"]),
    (TRAIN, ["ckpt_path={ckpt}", "prototype.K=2", "trainer.max_steps=7"], ["does not match"]),
    (TRAIN, ["ckpt_path={ckpt}", "trainer.max_steps=3"], ["is at step 5 and trainer.max_steps=3"]),
    (  # issue 23, item 1: whatever the run is called
        TRAIN,
        ["ckpt_path={ckpt}", "trainer.max_steps=3", "task_name=myrun"],
        ["is at step 5 and trainer.max_steps=3"],
    ),
    (TRAIN, ["trainer.max_steps=4.5"], ["trainer.max_steps=4.5 must be a positive integer"]),
    (TRAIN, ["trainer.accelerator=gpu"], ["trainer.accelerator=gpu but this machine has no CUDA"]),
    (
        TRAIN,
        ["trainer=gpu"],
        ["trainer.accelerator=gpu but this machine has no CUDA", "trainer=cpu"],
    ),
    (TRAIN, ["paths.log_dir=/proc/mpcl-logs"], ["/proc is not writable", "paths.log_dir"]),
    (TRAIN, ["hydra.run.dir=/proc/mpcl-run"], ["/proc is not writable", "hydra.run.dir"]),
    (TRAIN, ["paths.cache_dir=/proc/mpcl-cache"], ["/proc/mpcl-cache is not writable"]),
    (TRAIN, ["uda.pseudo_threshold=2"], ["uda.pseudo_threshold=2 must be in (0, 1)"]),
    (TRAIN, ["experiment=daformer_baseline", "paths.data_dir=/nonexistent"], ["/nonexistent/gta"]),
    (EVAL, [], ["ckpt_path is required"]),
    (EVAL, ["ckpt_path=/nonexistent.ckpt"], ["/nonexistent.ckpt does not exist"]),
    (EVAL, ["ckpt_path={bad}/empty.ckpt"], ["empty.ckpt: it is empty"]),
    (EVAL, ["ckpt_path={bad}/random.ckpt"], ["random.ckpt"]),
    (EVAL, ["ckpt_path={bad}/foreign.ckpt"], ["foreign.ckpt has no state_dict"]),
    (EVAL, ["ckpt_path={ckpt}", "prototype.K=2"], ["does not match"]),
    (EVAL, ["ckpt_path={ckpt}", "data.val_batch_sise=2"], ["did you mean data.val_batch_size"]),
    (  # issue 23, item 2: a val label outside the class set, where eval reads it
        EVAL,
        ["ckpt_path={ckpt}", "paths.cache_dir={bad}/val_label_50"],
        ["label {bad}/val_label_50/", "/real/val/labels/00000.png holds the value 50"],
    ),
    (PREDICT, [], ["ckpt_path is required"]),
    (PREDICT, ["ckpt_path={bad}/truncated.ckpt"], ["truncated.ckpt"]),
    (PREDICT, ["ckpt_path={ckpt}", "split=banana"], ["unknown split 'banana'"]),
    (PREDICT, ["ckpt_path={ckpt}", "prototype=none"], ["does not match"]),
]
PREPARE_CASES = [
    (["gta", "--root", "/nonexistent"], ["/nonexistent"]),
    (["banana", "--root", "{bad}"], ["invalid choice: 'banana'"]),
    (["gta"], ["--root"]),
    (["gta", "--root", "{bad}/gta", "--workers", "abc"], ["--workers", "'abc'"]),
    (["cityscapes", "--root", "{bad}/gta"], ["leftImg8bit", "{bad}/gta"]),
    (["gta", "--root", "{bad}/corrupt", "--workers", "1"], ["{bad}/corrupt/labels/00001.png"]),
    (["gta", "--root", "{bad}/a_file"], ["{bad}/a_file"]),
    (  # issue 23, item 2: a trainId file already there, outside the class set
        ["gta", "--root", "{bad}/label50", "--workers", "1"],
        ["{bad}/label50/labels/00001_labelTrainIds.png holds the value 50"],
    ),
]


def _fill(args: list[str], files: dict) -> list[str]:
    return [a.format(ckpt=files["ckpt"], bad=files["dir"]) for a in args]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("entry", "args", "fragments"),
    HYDRA_CASES,
    ids=[f"{e.__module__.split('.')[1]}:{' '.join(a) or '-'}" for e, a, _ in HYDRA_CASES],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    entry, args, fragments, bad_files, cache_dir, tmp_path
):
    if "gpu" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    logs = tmp_path / "logs"
    tiny = [f"paths.log_dir={logs}", f"paths.cache_dir={cache_dir}"]
    if not any(a.startswith("experiment=") for a in args):  # the synthetic benchmark's sizes
        tiny += TINY_SYNTHETIC
    code, out, err = run_main(entry, [*tiny, *_fill(args, bad_files)])
    assert code == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in _fill(fragments, bad_files):
        assert fragment in lines[0], lines[0]
    assert files_under(logs) == []  # no run directory, no partial file
    assert not list(logs.glob("*/runs/*"))


@pytest.mark.parametrize(
    ("args", "fragments"), PREPARE_CASES, ids=[" ".join(a) for a, _ in PREPARE_CASES]
)
def test_prepare_bad_input_is_one_line_and_leaves_nothing(args, fragments, bad_trees):
    before = set(files_under(bad_trees["dir"]))
    code, out, err = run_main(
        lambda: sys.exit(mpcl.prepare.main(sys.argv[1:])), _fill(args, bad_trees)
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in _fill(fragments, bad_trees):
        assert fragment in lines[0], lines[0]
    new = set(files_under(bad_trees["dir"])) - before
    assert not [p for p in new if p.name.endswith(".tmp")]
    assert not (bad_trees["dir"] / "corrupt" / "labels" / "00001_labelTrainIds.png").exists()


def test_matrix_has_at_least_30_cases():
    assert len(HYDRA_CASES) + len(PREPARE_CASES) >= 30
    assert {e for e, _, _ in HYDRA_CASES} == {TRAIN, EVAL, PREDICT}


# ---------------------------------------------------------------- issue 23
def tiny_run(cache_dir: Path, log_dir: Path, steps: int = 3, experiment="synthetic_baseline"):
    """A few steps of the smallest run (no figures, a checkpoint every 2 steps)."""
    return [
        *common(cache_dir, log_dir, experiment),
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
    ]


@pytest.mark.slow
def test_sweep_runs_every_job_and_exits_non_zero(cache_dir, tmp_path):
    """The acceptance case: a diverging job and a good one, on Hydra's basic launcher."""
    argv = ["-m", "uda.optimizer.lr=1e30,6e-4", *tiny_run(cache_dir, tmp_path)]
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 4, err[-3000:]
    assert "Traceback" not in err
    (line,) = [x for x in error_lines(err) if "jobs failed" in x]
    assert line.startswith("error: 1 of 2 jobs failed: job 0 (exit 3: training diverged at step")
    (sweep,) = tmp_path.glob("train/multiruns/*")
    assert str(sweep / "summary.md") in line
    summary = (sweep / "summary.md").read_text()
    assert "2 jobs, 1 finished, 1 failed." in summary and summary in out
    assert re.search(r"\| \S+/0 \| 1e\+30 \| - \| - \| failed \|", summary)
    assert json.loads((sweep / "0" / "job.json").read_text())["exit_status"] == 3
    assert not list((sweep / "0").rglob("*.ckpt"))  # nothing after the divergence
    assert json.loads((sweep / "1" / "job.json").read_text())["status"] == "finished"
    assert state(sweep / "1" / "checkpoints" / "last.ckpt")  # the second job trained
    assert not list(sweep.rglob(".mpcl.lock"))


def test_failed_and_crashed_jobs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Bad input (exit 2) and a bug (exit 1, its traceback printed) in two jobs of three."""

    def fake_train(cfg, resume=None):
        if cfg.seed == 0:
            raise KeyError("a bug in job 0")
        if cfg.seed == 1:
            raise ConfigError("data.batch_size=0 must be a positive integer")
        return {"val/mIoU": 12.5}

    monkeypatch.setattr(mpcl.train, "train", fake_train)
    argv = ["-m", "seed=0,1,2", f"paths.log_dir={tmp_path}", "optimized_metric=val/mIoU"]
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 4, err[-3000:]
    assert "KeyError: 'a bug in job 0'" in err and "Traceback" in err  # a bug keeps it
    assert error_lines(err)[-1].startswith("error: 2 of 3 jobs failed: job 0 (exit 1: a bug: ")
    (sweep,) = tmp_path.glob("train/multiruns/*")
    records = [json.loads((sweep / str(i) / "job.json").read_text()) for i in range(3)]
    assert [r["exit_status"] for r in records] == [1, 2, 0]
    assert records[1]["error"] == "error: data.batch_size=0 must be a positive integer"
    assert records[2] == {**records[2], "status": "finished", "return_value": 12.5}
    summary = (sweep / "summary.md").read_text()
    assert "- " + sweep.name + "/1: exit 2: data.batch_size=0 must be a positive integer" in summary
    assert "| 2 | 12.50 |" in summary  # the finished job's value


@pytest.mark.slow
def test_submitit_sweep_runs_every_job_without_a_traceback(cache_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    argv = ["-m", "hydra/launcher=submitit_local", "data.batch_size=0,2"]
    argv += [*tiny_run(cache_dir, tmp_path, steps=2), "evaluate=false"]
    proc = subprocess.run(
        [sys.executable, "-m", "mpcl.train", *argv],
        env=subprocess_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "UncompletedJobError" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert line.startswith("error: 1 of 2 jobs failed: job 0 (exit 2: data.batch_size=0 must be")
    (sweep,) = tmp_path.glob("train/multiruns/*")
    assert "2 jobs, 1 finished, 1 failed." in (sweep / "summary.md").read_text()
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("label", "image", "fragment"),
    [
        ("source/train/labels/*.png", None, "/source/train/labels/0000"),
        (None, "source/train/images/*.png", "/source/train/images/0000"),
    ],
    ids=["source label 50", "truncated source image"],
)
def test_bad_training_files_are_one_line_and_no_checkpoint(
    label, image, fragment, cache_dir, tmp_path
):
    """A source label outside the class set (was an IndexError in the loss) and a truncated
    image (was read with a libjpeg/libpng warning) stop training where they are read."""
    bad = bad_cache(cache_dir, tmp_path / "cache", label=label, image=image)
    logs = tmp_path / "logs"
    argv = [*tiny_run(cache_dir, logs), f"paths.cache_dir={bad.parent}"]
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 2, err[-3000:]
    (line,) = error_lines(err)
    assert "Traceback" not in err and fragment in line, line
    assert "holds the value 50 at 7 pixels" in line if label else "truncated" in line
    assert not [p for p in files_under(logs) if p.suffix == ".ckpt"]


@pytest.mark.slow
def test_predict_images_keep_every_output_and_log_its_path(baseline, tmp_path):
    """``a.png`` and ``a.jpg``: two outputs, each path in predict.log; a truncated JPEG is one
    line naming it, before anything is written."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    cv2.imwrite(str(folder / "a.png"), rgb)
    cv2.imwrite(str(folder / "a.jpg"), rgb)
    cv2.imwrite(str(folder / "b.jpg"), rgb)
    logs = tmp_path / "logs"
    argv = [f"ckpt_path={baseline['ckpt']}", f"input={folder}", f"paths.log_dir={logs}"]
    code, out, err = run_main(mpcl.predict.main, argv)
    assert code == 0, err[-3000:]
    (run,) = logs.glob("predict/runs/*")
    assert sorted(p.name for p in (run / "labels").iterdir()) == ["a_jpg.png", "a_png.png", "b.png"]
    assert "3 predictions" in out
    log = (run / "predict.log").read_text()
    outputs = [p for p in files_under(run) if p.parent.name in ("labels", "overlay")]
    assert len(outputs) == 6 and all(str(p) in log for p in outputs)

    data = (folder / "b.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(data[: len(data) // 2])
    code, out, err = run_main(mpcl.predict.main, [*argv, f"paths.log_dir={tmp_path / 'logs2'}"])
    assert code == 2, err[-3000:]
    (line,) = error_lines(err)
    assert f"cannot read image {folder / 'b.jpg'}: the file is truncated" in line


@pytest.mark.slow
def test_predict_defaults_to_a_split_the_benchmark_has(baseline, tmp_path):
    code, out, err = run_main(
        mpcl.predict.main, [f"ckpt_path={baseline['ckpt']}", f"paths.log_dir={tmp_path}"]
    )
    assert code == 0, err[-3000:]
    (run,) = tmp_path.glob("predict/runs/*")
    assert len(list((run / "labelIds").glob("*.png"))) == 2  # the val split's 2 images
    assert str(run / "labelIds" / "00000.png") in (run / "predict.log").read_text()


@pytest.mark.slow
def test_eval_reads_only_the_target_in_one_process(baseline, tmp_path):
    """``trainer=ddp_sim`` (as a DDP checkpoint stores it): one process, one table; and
    ``data=gta2cs`` with only ``cityscapes/`` on disk evaluates (no GTA root needed)."""
    code, out, err = run_main(
        mpcl.eval.main,
        [f"ckpt_path={baseline['ckpt']}", "trainer=ddp_sim", f"paths.log_dir={tmp_path}"],
    )
    assert code == 0, err[-3000:]
    assert out.count("| **mIoU** |") == 1
    results = Path(re.search(r"results: (\S+)", out).group(1))
    assert json.loads(results.read_text())["means"]["mIoU"] == pytest.approx(
        baseline["miou"], abs=0.006
    )

    from fake_trees import make_cityscapes

    data = tmp_path / "data"
    make_cityscapes(data / "cityscapes", splits=("val",), per_city=1)
    argv = [
        f"ckpt_path={baseline['ckpt']}",
        "data=gta2cs",
        f"paths.data_dir={data}",
        "+data.target_val.prepared=false",  # the fake tree's raw label IDs
        "benchmark.eval_resize=[64,128]",
        f"paths.log_dir={tmp_path / 'gta2cs'}",
    ]
    code, out, err = run_main(mpcl.eval.main, argv)
    assert code == 0, err[-3000:]
    assert not (data / "gta").exists() and "GTA5" not in err
    (run,) = (tmp_path / "gta2cs").glob("eval/runs/*")
    assert json.loads((run / "results.json").read_text())["means"]["mIoU"] >= 0


@pytest.mark.slow
def test_printed_paths_are_whole_and_integers_stay_integers(cache_dir, tmp_path, monkeypatch):
    """80 columns, not a terminal (a SLURM log): the checkpoint path on one line on stdout
    and in train.log; ``trainer.max_steps=3e0`` trains 3 steps and is stored as 3."""
    monkeypatch.delenv("COLUMNS", raising=False)
    logs = tmp_path / ("a-long-directory-name-" * 3)
    argv = [*tiny_run(cache_dir, logs), "trainer.max_steps=3e0"]
    code, out, err = run_main(mpcl.train.main, argv)
    assert code == 0, err[-3000:]
    ckpt = printed_checkpoint(out)
    assert ckpt.is_file() and len(f"checkpoint: {ckpt}") > 80
    assert f"checkpoint: {ckpt}\n" in out
    assert f"checkpoint: {ckpt}\n" in (ckpt.parents[1] / "train.log").read_text()
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3 and saved["mpcl"]["config"]["trainer"]["max_steps"] == 3
    assert type(saved["mpcl"]["config"]["trainer"]["max_steps"]) is int
    assert "schedule: max_steps=3 " in out


class SignalTwice(L.Callback):
    """Ctrl-C twice in the middle of step ``step``: the second stops at once."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
def test_second_ctrl_c_exits_130_naming_the_last_intact_checkpoint(
    cache_dir, tmp_path, monkeypatch
):
    build = mpcl.train.build

    def build_with_signals(cfg, *args):
        datamodule, module, trainer = build(cfg, *args)
        trainer.callbacks.insert(0, SignalTwice(3))
        return datamodule, module, trainer

    monkeypatch.setattr(mpcl.train, "build", build_with_signals)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code, out, err = run_main(mpcl.train.main, tiny_run(cache_dir, tmp_path, steps=5))
    assert code == 130, err[-3000:]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    m = re.search(
        r"interrupted by SIGINT again at step 2: stopped at once; the last intact "
        r"checkpoint is (\S+)",
        err,
    )
    assert m, err[-3000:]
    last = Path(m.group(1))
    assert last.name == "last.ckpt" and torch.load(last, weights_only=True)["global_step"] == 2
    assert f"resume with: python -m mpcl.train ckpt_path={last}" in err
    assert "Detected KeyboardInterrupt" not in err + out


def test_a_live_run_dir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    """Item 5: ``hydra.run.dir=X`` while another live run writes there is one line, and
    nothing of the second run lands in X; a dead holder's lock is taken over."""
    from mpcl.io import host_tag
    from mpcl.run.rundir import LOCK_NAME, RunDirLock

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"{os.getppid()}@{host_tag()}\n")  # a live process
    code, out, err = run_main(
        mpcl.train.main, [f"hydra.run.dir={run}", f"paths.log_dir={tmp_path}"]
    )
    assert code == 2, err[-3000:]
    (line,) = error_lines(err)
    assert f"the run directory {run} is in use by another run ({os.getppid()}@" in line
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # no .hydra/ of the second

    child = subprocess.Popen(["true"])
    child.wait()
    (run / LOCK_NAME).write_text(f"{child.pid}@{host_tag()}\n")  # its writer is gone
    lock = RunDirLock(run)
    lock.acquire()
    assert (run / LOCK_NAME).read_text().startswith(f"{os.getpid()}@")
    with pytest.raises(ConfigError, match="is in use by another run"):
        RunDirLock(run).acquire()  # held by this (live) process
    lock.release()
    assert not (run / LOCK_NAME).exists()
