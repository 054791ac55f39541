"""Sweep summaries: pivot over two parameters, mean +- std over seeds, CSV per job, the CLI and
the Hydra callback at the end of a real 2 x 2 multirun."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest
from conftest import subprocess_env, tiny_synthetic

from mpcl.monitor.summary import main, summarize

ROOT = Path(__file__).parents[1]


def _fake_job(sweep: Path, num: int, overrides: list[str], miou: float | None, proto=None):
    """A finished job as Hydra + Lightning's CSVLogger leave it."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text("{}\n")
    if miou is not None:
        (job / "csv").mkdir()
        rows = [
            "step,train/loss,val/mIoU,val/mIoU_prototype",
            "9,1.0,,",
            f"9,,{miou},{proto or ''}",
        ]
        (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


def _table(markdown: str, title: str) -> list[list[str]]:
    """The rows of the Markdown table under the heading that starts with ``title``."""
    block = markdown.split(f"## {title}", 1)[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]


def test_pivot_over_k_and_lambda_with_mean_and_std_over_seeds(tmp_path):
    values = {}
    num = 0
    for k in (1, 3, 5):
        for lam in (0.05, 0.1):
            for seed in (0, 1, 2):
                miou = 50 + k + 10 * lam + 0.7 * seed * (k % 2) + 0.1 * num
                values.setdefault((k, lam), []).append(miou)
                overrides = [f"prototype.K={k}", f"prototype.lambda_contrast={lam}", f"seed={seed}"]
                _fake_job(tmp_path, num, ["data=gta2cs", *overrides], miou, proto=miou - 5)
                num += 1
    _fake_job(tmp_path, num, ["data=gta2cs", "prototype.K=7", "seed=0"], None)  # running
    # (K=7 was started without lambda: its column is "(default)")
    markdown = summarize([tmp_path], out_dir=tmp_path)
    rows = _table(markdown, "target mIoU (%), mean ± std over 3 seeds")
    assert rows[0] == ["prototype.K \\ prototype.lambda_contrast", "0.05", "0.1", "(default)"]
    assert [r[0] for r in rows[2:]] == ["1", "3", "5", "7"]
    for row in rows[2:5]:
        for lam, cell in zip((0.05, 0.1), row[1:3], strict=True):
            v = values[(int(row[0]), lam)]
            assert cell == f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
    assert rows[5][1:] == ["-", "-", "-"]  # K=7 has no result yet
    assert "Common overrides: `data=gta2cs`" in markdown
    assert "19 jobs, 18 finished." in markdown
    proto = _table(markdown, "target mIoU (prototype output) (%)")
    assert proto[2][1].startswith(f"{statistics.mean(values[(1, 0.05)]) - 5:.2f} ±")

    with (tmp_path / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 19 and (tmp_path / "summary.md").read_text() == markdown
    assert table[4]["prototype.K"] == "1" and table[4]["seed"] == "1"
    assert float(table[4]["mIoU"]) == pytest.approx(values[(1, 0.1)][1], abs=1e-4)
    assert table[-1]["status"] == "missing" and table[-1]["mIoU"] == ""


def test_one_parameter_gives_a_column_and_the_cli_writes_files(tmp_path, capsys):
    for i, k in enumerate((2, 1)):
        _fake_job(tmp_path, i, [f"prototype.K={k}"], 40.0 + k)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert _table(out, "target mIoU (%)")[2:] == [["1", "41.00"], ["2", "42.00"]]
    assert (tmp_path / "summary.csv").is_file()
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_every_tool_has_a_console_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) >= {
        "mpcl-train",
        "mpcl-eval",
        "mpcl-predict",
        "mpcl-prepare",
        "mpcl-summarize",
    }
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(import_module(module), func)), target


@pytest.mark.slow
def test_two_by_two_multirun_prints_the_pivoted_summary(cache_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "mpcl.train", "-m", "prototype.K=1,2", "prototype.lambda_contrast=0.05,0.1",
        f"paths.log_dir={tmp_path}", *tiny_synthetic(), "trainer.max_steps=1",
        "trainer.val_check_interval=1", "trainer.enable_checkpointing=false",
        "callbacks.model_checkpoint=null", "callbacks.figures=null",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(cache_dir), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = tmp_path.glob("train/multiruns/*")
    # Independently: each job's last val/mIoU from its own CSV log.
    miou = {}
    for job in sweep.glob("*/csv/metrics.csv"):
        overrides = (job.parents[1] / ".hydra" / "overrides.yaml").read_text()
        key = tuple(o in overrides for o in ("prototype.K=1", "prototype.lambda_contrast=0.05"))
        with job.open() as f:
            miou[key] = [float(r["val/mIoU"]) for r in csv.DictReader(f) if r["val/mIoU"]][-1]
    assert len(miou) == 4
    rows = _table(proc.stdout, "target mIoU (%)")
    assert rows[0] == ["prototype.K \\ prototype.lambda_contrast", "0.05", "0.1"]
    for row, k1 in zip(rows[2:], (True, False), strict=True):
        assert row[1:] == [f"{miou[(k1, True)]:.2f}", f"{miou[(k1, False)]:.2f}"]
    assert (sweep / "summary.md").read_text() in proc.stdout
