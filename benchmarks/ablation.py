"""The ablation ladder on the embedded benchmark: run it, or summarise finished runs.

    # list the rows
    python benchmarks/ablation.py --list
    # run rows x seeds one after the other (skips finished runs), then summarise
    python benchmarks/ablation.py --root /tmp/abl --rows baseline gaussian queue early \\
        --seeds 0 1 2 --run
    # summarise what is there (default), e.g. the whole ladder with 5 seeds, and keep the
    # per-run values
    python benchmarks/ablation.py --root /tmp/abl --seeds 0 1 2 3 4 --csv runs.csv

Each run is ``python -m mpcl.train <row overrides> <--extra> seed=N hydra.run.dir=ROOT/ROW_N``;
its final ``val/mIoU`` (and ``val/mIoU_prototype``) is read from ROOT/ROW_N/csv/metrics.csv.
The summary prints per-seed values, mean ± std, and against the baseline row (paired by
seed): the mean difference, the paired t-test's two-sided p-value and the exact two-sided
p-value of the paired sign-flip (randomisation) test. With n seeds the sign-flip test cannot
go below 2 / 2^n (0.25 for 3 seeds, 0.0625 for 5).

A longer schedule for the prototypes to act: ``--extra trainer.max_steps=2000
trainer.val_check_interval=2000 uda.scheduler.warmup_steps=300`` (one run is then about
3x the default's time).

Issue 21's paired study (from the cached source-only start, common random numbers), two runs
at a time, against the control with both prototype losses off:

    python benchmarks/ablation.py --root /tmp/study --rows study_control study_mpcl \
        --seeds 0 1 2 3 4 5 6 7 8 9 --baseline study_control --run --workers 2 --csv study.csv
    # the same pairs on another logged value, e.g. the target class separation
    python benchmarks/ablation.py --root /tmp/study --rows study_control study_mpcl \
        --seeds 0 1 2 3 4 5 6 7 8 9 --baseline study_control --metric val/class_separation
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MPCL = "experiment=synthetic_gaussian"  # the default main job: DACS + Gaussian MPCL
STUDY = ["init_from=source_only", "trainer.max_steps=2000", "trainer.val_check_interval=2000"]
NO_LOSSES = ["prototype.lambda_contrast=0", "prototype.lambda_consistency=0"]
# name -> overrides; groups follow the paper's tables and issue #11's items.
LADDER: dict[str, tuple[str, list[str]]] = {
    "baseline": ("Table VI", ["experiment=synthetic_baseline"]),
    "gaussian": ("Table VI", [MPCL]),
    "centroid": ("Table VI", ["experiment=synthetic_centroid"]),
    "K1": ("Table VI / IX", [MPCL, "prototype.K=1"]),
    "no_in_class": ("Table VI", [MPCL, "prototype.in_class_negatives=false"]),
    "contrast_only": ("Table VI", [MPCL, "prototype.lambda_consistency=0"]),
    "consistency_only": ("Table VI", [MPCL, "prototype.lambda_contrast=0"]),
    "K3": ("Table IX", [MPCL, "prototype.K=3"]),
    "K10": ("Table IX", [MPCL, "prototype.K=10"]),
    "lambda1_0.05": ("Table X", [MPCL, "prototype.lambda_contrast=0.05"]),
    "lambda1_0.2": ("Table X", [MPCL, "prototype.lambda_contrast=0.2"]),
    "lambda2_0.05": ("Table X", [MPCL, "prototype.lambda_consistency=0.05"]),
    "lambda2_0.2": ("Table X", [MPCL, "prototype.lambda_consistency=0.2"]),
    "bank_12k": ("Table XI", [MPCL, "prototype.feature_bank_size=12000"]),
    "bank_24k": ("Table XI", [MPCL, "prototype.feature_bank_size=24000"]),
    "theta_0.9": ("Table XI", [MPCL, "uda.pseudo_threshold=0.9"]),
    "theta_0.99": ("Table XI", [MPCL, "uda.pseudo_threshold=0.99"]),
    # One alpha for the teacher (Eq. 2) and the prototypes (Eqs. 20-21), as in the paper.
    "alpha_0.99": ("Table XI", [MPCL, "uda.ema_alpha=0.99"]),
    "alpha_0.9999": ("Table XI", [MPCL, "uda.ema_alpha=0.9999"]),
    "queue": ("item 1", [MPCL, "prototype.bank_mode=queue"]),
    "queue_12k": (
        "item 1",
        [MPCL, "prototype.bank_mode=queue", "prototype.feature_bank_size=12000"],
    ),
    "queue_24k": (
        "item 1",
        [MPCL, "prototype.bank_mode=queue", "prototype.feature_bank_size=24000"],
    ),
    "early": ("item 2", [MPCL, "prototype.early_start=true"]),
    "queue_early": ("items 1+2", [MPCL, "prototype.bank_mode=queue", "prototype.early_start=true"]),
    "consistency_mixed": ("item 3", [MPCL, "uda.consistency_domains=[mixed]"]),
    "contrast_source": ("item 3", [MPCL, "uda.contrast_domains=[source]"]),
    # Issue #14: a tiny randomly initialised DINOv2-style ViT instead of MiT-B0.
    "vfm_baseline": ("issue 14", ["experiment=synthetic_vfm_baseline"]),
    "vfm_gaussian": ("issue 14", ["experiment=synthetic_vfm_gaussian"]),
    # Issue 21's study: from the cached source-only start (init_from=source_only), 2000
    # iterations, common random numbers; the control switches both prototype losses off.
    "study_control": ("issue 21", [MPCL, *STUDY, *NO_LOSSES]),
    "study_mpcl": ("issue 21", [MPCL, *STUDY]),
    "study_K1": ("issue 21", [MPCL, *STUDY, "prototype.K=1"]),
    "study_dacs": ("issue 21", ["experiment=synthetic_baseline", *STUDY]),
}


def final_metric(metrics_csv: Path, key: str) -> float | None:
    """The last non-empty value of column ``key`` in a Lightning CSV log (None if absent)."""
    if not metrics_csv.is_file():
        return None
    value = None
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get(key):
                value = float(row[key])
    return value


def _t_sf_two_sided(t: float, df: int) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with ``df`` degrees of freedom.

    Uses P(|T| >= t) = I_x(df / 2, 1 / 2) with x = df / (df + t^2), the regularised
    incomplete beta function, evaluated by its continued fraction (Numerical Recipes).
    """
    if math.isinf(t):
        return 0.0
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_front += a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def t_quantile(p: float, df: int) -> float:
    """The t value with two-sided tail probability ``p`` (e.g. 0.05 -> the 97.5 % quantile),
    by bisection on ``_t_sf_two_sided``."""
    low, high = 0.0, 1e3
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_sf_two_sided(mid, df) > p else (low, mid)
    return (low + high) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the ``level`` confidence interval of the mean (Student's t; nan below 2)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(1 - level, len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval of the mean paired difference a - b (Student's t)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2:
        return float("nan"), float("nan")
    return mean_ci(diffs, level)[1:]


def paired_columns(a: list[float], b: list[float], digits: int) -> tuple[str, str, str]:
    """The summary tables' paired columns of a vs b: 95 % CI, t-test p, sign-flip p."""
    ci = "[{:+.{n}f}, {:+.{n}f}]".format(*paired_ci(a, b), n=digits)
    return ci, f"{paired_t_test(a, b):.3f}", f"{sign_flip_test(a, b):.3f}"


def paired_t_test(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of the paired t-test of a vs b (same seeds, same order)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    if n < 2:
        return float("nan")
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 1.0 if statistics.mean(diffs) == 0 else 0.0
    return _t_sf_two_sided(statistics.mean(diffs) / (sd / math.sqrt(n)), n - 1)


def sign_flip_test(a: list[float], b: list[float]) -> float:
    """Exact two-sided p-value of the paired randomisation test: over all 2^n sign flips
    of the differences, the share whose |mean| is at least the observed |mean|."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if not diffs:
        return float("nan")
    observed = abs(sum(diffs)) - 1e-12
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed for signs in flips)
    return hits / len(flips)


def run(root: Path, rows: list[str], seeds: list[int], extra: list[str], workers: int = 1) -> None:
    """Train rows x seeds, ``workers`` at a time (each with cores / workers torch threads);
    finished runs (with a val/mIoU) are skipped, so an interrupted study picks up again."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    commands = []
    for seed, name in itertools.product(seeds, rows):  # seed-major: pairs complete early
        out = root / f"{name}_{seed}"
        if final_metric(out / "csv" / "metrics.csv", "val/mIoU") is not None:
            continue
        cmd = [sys.executable, "-m", "mpcl.train", *LADDER[name][1], *extra, f"seed={seed}"]
        commands.append([*cmd, f"hydra.run.dir={out}", "callbacks.progress_bar=null"])

    def one(cmd: list[str]) -> int:
        print("+", " ".join(cmd), flush=True)
        log = Path(cmd[-2].split("=", 1)[1] + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode

    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(one, commands))
    failed = [c[-2] for c, code in zip(commands, codes, strict=True) if code]
    if failed:
        sys.exit(f"error: {len(failed)} of {len(commands)} runs failed: {', '.join(failed)}")


def summarise(
    root: Path, rows: list[str], seeds: list[int], baseline: str, metric: str = "val/mIoU"
) -> list[str]:
    """Markdown table lines: per-seed ``metric`` (a run's last logged value), mean ± std,
    paired tests against ``baseline``."""

    def values(name: str, key: str = metric) -> dict[int, float]:
        found = {s: final_metric(root / f"{name}_{s}" / "csv" / "metrics.csv", key) for s in seeds}
        return {s: v for s, v in found.items() if v is not None}

    digits = 2 if "IoU" in metric else 3  # IoUs are percentages; ratios need more
    base = values(baseline)
    lines = [
        f"| row | group | seeds | per seed | {metric} mean ± std | vs {baseline} (paired) | "
        "95 % CI | t-test p | sign-flip p | prototype-output mIoU |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in rows:
        got = values(name)
        if not got:
            continue
        seeds_run = sorted(got)
        per_seed = ", ".join(f"{got[s]:.{digits}f}" for s in seeds_run)
        mean_std = _mean_std(list(got.values()), digits)
        proto = values(name, "val/mIoU_prototype")
        proto_text = _mean_std(list(proto.values())) if proto else "-"
        paired = [s for s in seeds_run if s in base]
        if name == baseline or len(paired) < 2:
            diff = ci = t_p = flip_p = "-"
        else:
            a, b = [got[s] for s in paired], [base[s] for s in paired]
            d = [x - y for x, y in zip(a, b, strict=True)]
            diff = (
                f"{statistics.mean(d):+.{digits}f} ± {statistics.stdev(d):.{digits}f} (n={len(d)})"
            )
            ci, t_p, flip_p = paired_columns(a, b, digits)
        lines.append(
            f"| {name} | {LADDER.get(name, ('-',))[0]} | {','.join(map(str, seeds_run))} | "
            f"{per_seed} | {mean_std} | {diff} | {ci} | {t_p} | {flip_p} | {proto_text} |"
        )
    return lines


def write_csv(root: Path, rows: list[str], seeds: list[int], path: Path) -> int:
    """One line per finished run (row, group, seed, val/mIoU, val/mIoU_prototype, overrides):
    the raw numbers behind the tables, to keep beside them. Returns the number of runs."""
    written = 0
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["row", "group", "seed", "miou", "miou_prototype", "overrides"])
        for name, seed in itertools.product(rows, seeds):
            metrics = root / f"{name}_{seed}" / "csv" / "metrics.csv"
            miou = final_metric(metrics, "val/mIoU")
            if miou is None:
                continue
            proto = final_metric(metrics, "val/mIoU_prototype")
            group, overrides = LADDER[name]
            out.writerow([name, group, seed, f"{miou:.4f}",
                          "" if proto is None else f"{proto:.4f}", " ".join(overrides)])  # fmt: skip
            written += 1
    return written


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("logs/ablation"))
    parser.add_argument("--rows", nargs="+", default=list(LADDER), metavar="ROW")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--run", action="store_true", help="train missing runs first")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument(
        "--metric", default="val/mIoU", help="the metrics.csv column compared (last value)"
    )
    parser.add_argument("--csv", type=Path, help="also write every finished run's values here")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (with --run)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (group, overrides) in LADDER.items():
            print(f"{name:18s} {group:14s} {' '.join(overrides)}")
        return
    unknown = [r for r in args.rows if r not in LADDER]
    if unknown:
        sys.exit(f"error: unknown rows {unknown}: see --list")
    if args.run:
        run(args.root, args.rows, args.seeds, args.extra, args.workers)
    print("\n".join(summarise(args.root, args.rows, args.seeds, args.baseline, args.metric)))
    if args.csv:
        write_csv(args.root, args.rows, args.seeds, args.csv)


if __name__ == "__main__":
    main()
