"""Sweep summaries: every job of a Hydra multirun, its overrides vs the final target mIoU.

At the end of a multirun the :class:`SweepSummary` Hydra callback (``conf/hydra/default.yaml``)
writes ``summary.md`` and ``summary.csv`` into the sweep directory and prints the Markdown;
the same from the command line, for finished, running or several sweeps:

    mpcl-summarize logs/train/multiruns/<date>            # python -m mpcl.monitor.summary ...
    mpcl-summarize logs/a/multiruns/* logs/b/multiruns/*  # several sweeps in one table

The table is the paper's shape: with two swept parameters (besides ``seed``) it is pivoted,
rows = the first parameter, columns = the second (Tables IX / X: K x lambda_1); with ``seed``
swept each cell is mean +- std over the seeds (sample std, n - 1). The CSV has one row per
job: its overrides, mIoU, prototype-output mIoU, status, minutes, directory, and for a failed
job its exit status and one-line error (from ``<job>/job.json``, ``mpcl.run.launch``).

A job's metrics are the last ``val/mIoU`` and ``val/mIoU_prototype`` of its CSV log
(``<job>/csv/metrics.csv``, written by ``logger=csv`` and ``logger=wandb``); without one,
the job's return value (``optimized_metric``, recorded by the callback) stands in for mIoU.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mpcl.io import atomic_write_bytes
from mpcl.run.launch import job_dirs, read_job_record

log = logging.getLogger(__name__)

METRICS = {"mIoU": "val/mIoU", "mIoU (prototype output)": "val/mIoU_prototype"}
# Overrides that say where things are, not what was trained: never a table dimension.
_NOT_PARAMETERS = ("paths.", "hydra.", "task_name", "ckpt_path")


@dataclass
class Job:
    """One job of a sweep: its overrides (in command-line order) and final metrics."""

    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "missing"  # finished | failed | running/missing
    minutes: float | None = None
    exit_status: int | None = None  # a failed job's
    error: str | None = None  # a failed job's one line


def _final_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last non-empty value of each of METRICS' columns in a Lightning CSV log."""
    found: dict[str, float] = {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for name, key in METRICS.items():
                if row.get(key):
                    found[name] = float(row[key])
    return found


def _read_overrides(job_dir: Path) -> dict[str, str]:
    items = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml") or []
    pairs = (str(item).split("=", 1) for item in items if "=" in str(item))
    return {key.lstrip("+~"): value for key, value in pairs}


def read_job(job_dir: str | Path) -> Job:
    """Overrides, final metrics and status of one job directory (``<sweep>/<num>/``)."""
    job_dir = Path(job_dir)
    job = Job(job_dir, _read_overrides(job_dir))
    record = read_job_record(job_dir) or {}
    job.status = record.get("status", job.status)
    if job.status == "failed":
        job.exit_status, job.error = record.get("exit_status"), record.get("error")
    metrics_csv = job_dir / "csv" / "metrics.csv"
    if metrics_csv.is_file():
        job.metrics = _final_metrics(metrics_csv)
        start = (job_dir / ".hydra" / "config.yaml").stat().st_mtime
        job.minutes = (metrics_csv.stat().st_mtime - start) / 60
    if "mIoU" not in job.metrics and isinstance(record.get("return_value"), int | float):
        job.metrics["mIoU"] = float(record["return_value"])
    if job.status == "missing" and job.metrics:
        job.status = "finished"  # a sweep run before the callback existed
    return job


def find_jobs(sweep_dirs: Sequence[str | Path]) -> list[Job]:
    """Every job (a folder with ``.hydra/overrides.yaml``) under the sweep directories."""
    jobs = []
    for sweep in sweep_dirs:
        sweep = Path(sweep)
        if not sweep.is_dir():
            raise FileNotFoundError(f"{sweep} is not a directory: give a multirun directory")
        jobs += [read_job(p) for p in job_dirs(sweep)]
    if not jobs:
        raise FileNotFoundError(
            f"no Hydra jobs (*/.hydra/overrides.yaml) under {', '.join(map(str, sweep_dirs))}"
        )
    return jobs


# ---------------------------------------------------------------------------- tables


def swept_parameters(jobs: Sequence[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in command-line order."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    keys = [k for k in keys if not k.startswith(_NOT_PARAMETERS)]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def _sort_key(value: str | None) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _label(value: str | None) -> str:
    return "(default)" if value is None else str(value)


def _values(jobs: Sequence[Job], key: str) -> list[str | None]:
    return sorted({job.overrides.get(key) for job in jobs}, key=_sort_key)


def format_cell(values: Sequence[float]) -> str:
    """'-' for none, '12.34' for one, '12.34 ± 0.56' (sample std) for several."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _cell(jobs: Sequence[Job], metric: str, where: dict[str, str | None]) -> str:
    chosen = [j for j in jobs if all(j.overrides.get(k) == v for k, v in where.items())]
    return format_cell(
        [j.metrics[metric] for j in chosen if not math.isnan(j.metrics.get(metric, math.nan))]
    )


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "---:") -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + f" {align} |" * (len(header) - 1)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def metric_table(jobs: Sequence[Job], metric: str) -> str:
    """One metric over the swept parameters: pivoted for two, a column for one or more."""
    params = [p for p in swept_parameters(jobs) if p != "seed"]
    if len(params) == 2:
        rows_key, cols_key = params
        cols = _values(jobs, cols_key)
        rows = [
            [_label(r), *(_cell(jobs, metric, {rows_key: r, cols_key: c}) for c in cols)]
            for r in _values(jobs, rows_key)
        ]
        return _markdown([f"{rows_key} \\ {cols_key}", *map(_label, cols)], rows)
    combos: list[tuple] = []
    for job in jobs:
        combo = tuple(job.overrides.get(p) for p in params)
        if combo not in combos:
            combos.append(combo)
    combos.sort(key=lambda c: [_sort_key(v) for v in c])
    rows = [
        [*map(_label, combo), _cell(jobs, metric, dict(zip(params, combo)))] for combo in combos
    ]
    return _markdown([*(params or ["configuration"]), metric], rows or [["(one job)", "-"]])


def summary_markdown(jobs: Sequence[Job], title: str = "Sweep summary") -> str:
    """The Markdown report: one table per metric (pivoted / over seeds), then every job."""
    params = swept_parameters(jobs)
    seeds = len({j.overrides.get("seed") for j in jobs}) if "seed" in params else 1
    finished = sum(j.status == "finished" for j in jobs)
    failed = [j for j in jobs if j.status == "failed"]
    common = [f"{k}={v}" for k, v in jobs[0].overrides.items() if k not in params]
    counts = f"{len(jobs)} jobs, {finished} finished" + (f", {len(failed)} failed" * bool(failed))
    out = [f"# {title}", "", counts + "."]
    if common:
        out.append("Common overrides: " + " ".join(f"`{c}`" for c in common))
    over = f", mean ± std over {seeds} seeds" if seeds > 1 else ""
    for metric in METRICS:
        if any(metric in j.metrics for j in jobs):
            out += ["", f"## target {metric} (%){over}", "", metric_table(jobs, metric)]
    header = ["job", *params, *METRICS, "status", "min"]
    rows = [
        [
            _job_name(j),
            *(_label(j.overrides.get(p)) for p in params),
            *(format_cell([j.metrics[m]] if m in j.metrics else []) for m in METRICS),
            j.status,
            None if j.minutes is None else f"{j.minutes:.1f}",
        ]
        for j in jobs
    ]
    out += ["", "## jobs", "", _markdown(header, rows)]
    if failed:
        out += ["", "## failed jobs", ""]
        out += [f"- {_job_name(j)}: exit {j.exit_status}: {_error(j)}" for j in failed]
    return "\n".join(out) + "\n"


def _error(job: Job) -> str:
    return str(job.error or "no error recorded").removeprefix("error: ")


def _job_name(job: Job) -> str:
    return f"{job.path.parent.name}/{job.path.name}"


def summary_csv(jobs: Sequence[Job]) -> str:
    """One row per job: every override key (union over jobs), the metrics, status, dir."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["job", *keys, "mIoU", "mIoU_prototype", "status", "minutes", "dir"]
    writer.writerow([*header, "exit_status", "error"])
    for job in jobs:
        writer.writerow(
            [
                _job_name(job),
                *(job.overrides.get(k, "") for k in keys),
                *(f"{job.metrics[m]:.4f}" if m in job.metrics else "" for m in METRICS),
                job.status,
                "" if job.minutes is None else f"{job.minutes:.2f}",
                str(job.path),
                "" if job.exit_status is None else job.exit_status,
                job.error or "",
            ]
        )
    return buffer.getvalue()


def summarize(sweep_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> str:
    """Build the summary of ``sweep_dirs``; write summary.md/csv into ``out_dir`` if given."""
    jobs = find_jobs(sweep_dirs)
    title = "Sweep summary: " + ", ".join(str(Path(d)) for d in sweep_dirs)
    markdown = summary_markdown(jobs, title)
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_bytes(out_dir / "summary.md", markdown.encode())
        atomic_write_bytes(out_dir / "summary.csv", summary_csv(jobs).encode())
    return markdown


# ---------------------------------------------------------------------------- Hydra callback


class SweepSummary(Callback):
    """Hydra callback: when the multirun ends, writes and prints the sweep summary
    (``<sweep dir>/summary.md``, ``summary.csv``), failed jobs included; each job's status
    and return value come from its ``job.json`` (``mpcl.run.launch.JobOutcome``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            markdown = summarize([sweep_dir], out_dir=sweep_dir)
        except (OSError, ValueError) as e:  # never fail a finished sweep over its summary
            log.warning("no sweep summary for %s: %s", sweep_dir, e)
            return
        print(f"\n{markdown}\nsummary: {sweep_dir / 'summary.md'}, {sweep_dir / 'summary.csv'}")


# ---------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``mpcl-summarize DIR [DIR ...] [--out DIR]``: print (and write) the sweep summary."""
    parser = argparse.ArgumentParser(
        prog="mpcl-summarize", description="Summarise Hydra multirun sweeps (mIoU per job)."
    )
    parser.add_argument("sweep_dirs", nargs="+", help="multirun directories")
    parser.add_argument(
        "--out", help="write summary.md and summary.csv here (default: the single sweep dir)"
    )
    args = parser.parse_args(argv)
    out = args.out or (args.sweep_dirs[0] if len(args.sweep_dirs) == 1 else None)
    try:
        print(summarize(args.sweep_dirs, out_dir=out), end="")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out:
        print(f"summary: {Path(out) / 'summary.md'}, {Path(out) / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
