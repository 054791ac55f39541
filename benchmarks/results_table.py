"""Summarise Hydra multirun jobs: final target mIoU per configuration, mean and std over seeds.

    python benchmarks/results_table.py logs/bench_mpcl/multiruns/<date>  [more multirun dirs]

Each job's final ``val/mIoU`` (and ``val/mIoU_prototype``) is read from its CSV log; jobs
that differ only in ``seed`` are grouped. Wall time is from the job's config file to its
last checkpoint (training + final validation).
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def final_metric(metrics_csv: Path, key: str) -> float | None:
    """The last non-empty value of column ``key`` in a Lightning CSV log."""
    value = None
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get(key):
                value = float(row[key])
    return value


def job_summary(job: Path) -> dict | None:
    overrides = (job / ".hydra" / "overrides.yaml").read_text().splitlines()
    overrides = [o.removeprefix("- ").strip() for o in overrides if o.strip()]
    metrics = job / "csv" / "metrics.csv"
    ckpt = job / "checkpoints" / "last.ckpt"
    if not metrics.is_file() or not ckpt.is_file():
        return None  # still running or failed
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), "0")
    config = " ".join(
        o for o in overrides if not o.startswith(("seed=", "task_name=", "callbacks."))
    )
    miou = final_metric(metrics, "val/mIoU")
    if miou is None:
        return None  # not validated yet
    return {
        "config": config or "(default)",
        "seed": seed,
        "miou": miou,
        "miou_proto": final_metric(metrics, "val/mIoU_prototype"),
        "minutes": (ckpt.stat().st_mtime - (job / ".hydra" / "config.yaml").stat().st_mtime) / 60,
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(dirs: list[str]) -> None:
    groups: dict[str, list[dict]] = defaultdict(list)
    for d in dirs:
        for job in sorted(Path(d).glob("*/.hydra")):
            summary = job_summary(job.parent)
            if summary is not None:
                groups[summary["config"]].append(summary)
    print("| configuration | seeds | target mIoU | per seed | prototype-output mIoU | min/run |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for config, runs in groups.items():
        mious = [r["miou"] for r in runs if r["miou"] is not None]
        protos = [r["miou_proto"] for r in runs if r["miou_proto"] is not None]
        per_seed = ", ".join(f"{r['miou']:.1f}" for r in runs if r["miou"] is not None)
        minutes = statistics.mean(r["minutes"] for r in runs)
        seeds = ",".join(r["seed"] for r in runs)
        print(
            f"| {config} | {seeds} | {_mean_std(mious)} | {per_seed} | {_mean_std(protos)} | {minutes:.1f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
