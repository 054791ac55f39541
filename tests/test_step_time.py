"""The GPU benchmarks keep working (CPU, scaled down): step time, anchors, gpu_check.sh."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: trains, spawns processes or runs a script


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_benchmark_runs_and_reports_overhead(capsys):
    step_time = _load("step_time")
    rows = step_time.main(
        ["--experiments", "hrda_baseline", "hrda_gaussian", "--iters", "1", "--warmup", "1",
         "--crop", "64", "--tiny"]
    )  # fmt: skip
    assert [r["experiment"] for r in rows] == ["hrda_baseline", "hrda_gaussian"]
    assert all(r["s_iter"] > 0 for r in rows)
    assert rows[1]["overhead"].endswith("%")
    out = capsys.readouterr().out
    assert "| hrda_gaussian | 64 |" in out and "hours / 60k iters" in out


def test_anchors_time_each_model_or_say_why_not(capsys):
    rows = _load("anchors").main(["--size", "32", "--iters", "1", "--warmup", "0", "--tiny"])
    timed = {r["name"]: r for r in rows if "s_iter" in r}
    assert "mpcl MiT-B5 + DAFormer head" in timed and "timm pvt_v2_b5 (backbone)" in timed
    assert all(r["s_iter"] > 0 for r in timed.values())
    out = capsys.readouterr().out
    assert out.count("\n| ") == 2 + len(rows)  # header rule and one row per model
    assert "transformers SegFormer-B5" in out


def test_gpu_check_fast_dev_run_step_on_the_cpu(tmp_path):
    """The script's data trees and its fdr command, scaled down on the CPU."""
    tiny = [
        "model.encoder.depths=[1,1,1,1]", "benchmark.source_resize=[64,128]",
        "benchmark.target_resize=[64,128]", "benchmark.crop_size=64",
        "benchmark.eval_resize=[64,128]", "benchmark.rcs_min_pixels=5", "data.num_workers=0",
        "prototype.feature_bank_size=380", "model.hr_crop_size=[32,32]",
        "model.hr_slide_window=[32,32]", "model.hr_slide_stride=[16,16]",
        "model.test_window=[64,128]", "model.test_stride=[32,64]",
    ]  # fmt: skip
    env = {**os.environ, "OUT": str(tmp_path), "TRAINER": "cpu", "STEPS": "fdr",
           "EXTRA": " ".join(tiny), "WANDB_MODE": "offline"}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert "experiment=mic_gaussian" in summary and "== fdr: rc=0" in summary
    assert list((tmp_path / "data" / "gta" / "images").glob("*.png"))
