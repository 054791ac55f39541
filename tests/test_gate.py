"""benchmarks/gate.py: the gate's means and intervals against scipy, its verdicts, its command."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

_path = Path(__file__).parents[1] / "benchmarks" / "gate.py"
_spec = importlib.util.spec_from_file_location("gate", _path)
gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate)


def _fake_run(root: Path, name: str, quality: list[float], share: list[float]) -> None:
    run = root / name / "csv"
    run.mkdir(parents=True)
    rows = ["step,train/quality_weight,train/prototype/target_share,val/mIoU"]
    rows += [f"{i},{q},{s}," for i, (q, s) in enumerate(zip(quality, share, strict=True))]
    rows += ["99,,,21.0", "150,0.99,0.99,"]  # a validation row; a step past the window
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_mean_ci_matches_scipy():
    from scipy import stats

    values = [0.54, 0.58, 0.43, 0.54, 0.12, 0.62, 0.39, 0.38, 0.47, 0.49, 0.33]
    mean, low, high = gate.mean_ci(values)
    want = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert math.isclose(mean, sum(values) / len(values))
    assert math.isclose(low, want[0], rel_tol=1e-6) and math.isclose(high, want[1], rel_tol=1e-6)


def test_summary_reads_the_first_100_steps_and_gives_the_verdict(tmp_path):
    passing = gate.run_name(6000, 0.968, 0)
    _fake_run(tmp_path, passing, [0.4, 0.7] * 50, [0.12, 0.16] * 50)  # mean 0.55, 14 %
    failing = gate.run_name(1500, 0.968, 0)
    _fake_run(tmp_path, failing, [0.3, 0.5] * 50, [0.05, 0.06] * 50)  # mean 0.4, 5.5 %
    lines = gate.summarise(tmp_path, [1500, 3000, 6000], [0.968], [0])
    assert len(lines) == 4  # header, rule, the two finished runs (3000 has none)
    assert lines[2].startswith("| 1500 | 0.968 | 0 | 100 | 0.400 [")
    assert lines[2].endswith("| quality fails; share fails |")
    assert lines[3].startswith("| 6000 | 0.968 | 0 | 100 | 0.550 [")
    assert "| 14.0 % [" in lines[3] and lines[3].endswith("| quality passes; share passes |")


def test_a_ci_across_the_line_is_said(tmp_path):
    name = gate.run_name(6000, 0.968, 0)
    _fake_run(tmp_path, name, [0.2, 0.82] * 50, [0.2] * 100)  # mean 0.51, wide interval
    line = gate.summarise(tmp_path, [6000], [0.968], [0])[2]
    assert "quality passes (the CI spans the line)" in line


def test_the_command_composes(tmp_path, monkeypatch):
    from mpcl.run.cli import precheck

    cmd = gate.command(tmp_path / "run", 6000, 0.9, 3)
    assert cmd[:3] == [sys.executable, "-m", "mpcl.train"]
    monkeypatch.setenv("MPCL_CACHE_DIR", str(tmp_path / "cache"))
    assert precheck("train", cmd[3:]) == (tmp_path / "run").absolute()
