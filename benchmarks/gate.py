"""Issue 21's gate: is the pretrained start confident enough on the target for MPCL to act?

From ``init_from=source_only``, the default job (DACS + Gaussian MPCL) runs its first 100 UDA
steps with every step logged; the gate reads two columns of ``metrics.csv`` over those steps:

- ``train/quality_weight``: the share of target pixels whose teacher confidence reaches theta
  (Eq. 16), the weight every pseudo-labelled pixel gets; gate: mean >= 0.5.
- ``train/prototype/target_share``: the share of the prototype losses' pixel weight carried by
  target pixels; gate: mean >= 10 % (the ceiling is ~25 %, both losses on source and mixed
  views).

Each is printed as the mean over the 100 steps with its 95 % confidence interval (Student's t
over the per-step values; one batch a step, so neighbouring steps are nearly independent).
Logging every step matters: one batch's quality weight ranges 0.1-0.7, so a mean of the ten
rows that the default ``log_every_n_steps=10`` keeps is ~±0.05 off.

    # the starts of the table in docs/benchmarks.md (each start is built once, cached)
    python benchmarks/gate.py --root /tmp/gate --starts 1500 3000 6000 --run
    python benchmarks/gate.py --root /tmp/gate --starts 1500 6000 --theta 0.9 --run
    # summarise what is there
    python benchmarks/gate.py --root /tmp/gate --starts 1500 3000 6000 --theta 0.968 0.9

A run uses the scheduler of the 2000-step study (``trainer.max_steps=2000``) and stops after
100 batches (``+trainer.limit_train_batches=100 trainer.max_epochs=1``), so its first 100 steps
are those of a study run with the same seed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ablation import mean_ci  # noqa: E402

STEPS = 100
QUALITY, TARGET_SHARE = "train/quality_weight", "train/prototype/target_share"
GATE = {QUALITY: 0.5, TARGET_SHARE: 0.10}


def command(out: Path, start_steps: int, theta: float, seed: int) -> list[str]:
    """The training command of one gate run."""
    return [
        sys.executable, "-m", "mpcl.train", "init_from=source_only",
        f"pretrain.steps={start_steps}", f"uda.pseudo_threshold={theta}", f"seed={seed}",
        "trainer.max_steps=2000", f"+trainer.limit_train_batches={STEPS}",
        "trainer.max_epochs=1", f"trainer.val_check_interval={STEPS}",
        "trainer.log_every_n_steps=1", "evaluate=false",
        f"hydra.run.dir={out}", "callbacks.progress_bar=null",
    ]  # fmt: skip


def per_step(metrics_csv: Path, key: str, steps: int = STEPS) -> list[float]:
    """The values of column ``key`` logged at steps < ``steps`` (empty if none)."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) and int(r["step"]) < steps]


def run_name(start_steps: int, theta: float, seed: int) -> str:
    return f"start{start_steps}_theta{theta:g}_seed{seed}"


def summarise(root: Path, starts: list[int], thetas: list[float], seeds: list[int]) -> list[str]:
    """Markdown table lines, one per finished run."""
    lines = [
        "| start (source-only steps) | theta | seed | steps logged | mean quality weight "
        "[95 % CI] | mean target share [95 % CI] | gate (>= 0.5, >= 10 %) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for start, theta, seed in itertools.product(starts, thetas, seeds):
        metrics = root / run_name(start, theta, seed) / "csv" / "metrics.csv"
        quality, share = per_step(metrics, QUALITY), per_step(metrics, TARGET_SHARE)
        if not quality or not share:
            continue
        q, s = mean_ci(quality), mean_ci(share)
        verdict = [
            f"{name} {'passes' if m >= GATE[key] else 'fails'}"
            + (" (the CI spans the line)" if lo <= GATE[key] <= hi else "")
            for name, key, (m, lo, hi) in (("quality", QUALITY, q), ("share", TARGET_SHARE, s))
        ]
        lines.append(
            f"| {start} | {theta:g} | {seed} | {len(quality)} | {q[0]:.3f} [{q[1]:.3f}, "
            f"{q[2]:.3f}] | {100 * s[0]:.1f} % [{100 * s[1]:.1f}, {100 * s[2]:.1f}] | "
            f"{'; '.join(verdict)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("logs/gate"))
    parser.add_argument("--starts", nargs="+", type=int, default=[6000], metavar="STEPS")
    parser.add_argument("--theta", nargs="+", type=float, default=[0.968])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--run", action="store_true", help="train missing runs first")
    args = parser.parse_args(argv)
    if args.run:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for start, theta, seed in itertools.product(args.starts, args.theta, args.seeds):
            out = args.root / run_name(start, theta, seed)
            if len(per_step(out / "csv" / "metrics.csv", QUALITY)) == STEPS:
                continue  # finished
            cmd = command(out, start, theta, seed)
            print("+", " ".join(cmd), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            with Path(f"{out}.log").open("w") as log:
                if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                    sys.exit(f"error: gate run failed, see {out}.log")
    print("\n".join(summarise(args.root, args.starts, args.theta, args.seeds)))


if __name__ == "__main__":
    main()
