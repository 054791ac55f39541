"""Target class separation in the student's encoder, per stage, for finished training runs.

``val/class_separation`` is Fisher's ratio of the target val features in *prototype space*:
the prototype head's embeddings, which only MPCL's losses train (with both losses off, the
head stays at its initial weights). Comparing arms of a study there confounds "MPCL shapes
the student's features" with "MPCL trains its own head". This script measures the space every
arm shares and trains, the encoder's four stages, from each run's final checkpoint:
trace(S_B) / trace(S_W) of the target val pixels' stage-i features (labels taken at the
stage's resolution, nearest), with `mpcl.metrics.ClassSeparation`.

    python benchmarks/separation.py --root /tmp/study --rows study_control study_mpcl \\
        --seeds 0 1 2 3 4 5 6 7 8 9 --baseline study_control

Each run's numbers are cached in ``<run>/encoder_separation.json`` (a rerun reads them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from ablation import paired_columns  # noqa: E402

CACHE = "encoder_separation.json"


@torch.no_grad()
def encoder_separation(run: Path) -> list[float]:
    """Fisher's ratio of the target val pixels in each encoder stage of ``run``'s final
    student (``run/checkpoints/last.ckpt``, built from ``run/.hydra/config.yaml``)."""
    cached = run / CACHE
    if cached.is_file():
        return json.loads(cached.read_text())
    import mpcl  # noqa: F401  (registers the config resolvers)
    from mpcl.metrics import ClassSeparation
    from mpcl.run.build import build_module, build_target
    from mpcl.run.resume import CheckpointFile

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    module = build_module(cfg)
    CheckpointFile.read(run / "checkpoints" / "last.ckpt").load_into(module)
    module.eval()
    loader = DataLoader(build_target(cfg), batch_size=4)
    metrics: list[ClassSeparation] = []
    for batch in loader:
        out = module.student.forward(module._resize_for_eval(batch["image"]), with_features=False)
        for i, features in enumerate(out["encoder_features"]):
            if len(metrics) <= i:
                metrics.append(ClassSeparation(module.num_classes, features.shape[1]))
            size = features.shape[-2:]
            labels = F.interpolate(batch["label"][:, None].float(), size=size, mode="nearest")
            flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
            metrics[i].update(flat, labels.long().reshape(-1))
    values = [float(m.compute()) for m in metrics]
    cached.write_text(json.dumps(values))
    return values


def summarise(root: Path, rows: list[str], seeds: list[int], baseline: str) -> list[str]:
    """Markdown lines: per row and stage, mean ± std and the paired difference to
    ``baseline`` with its 95 % CI, t-test and sign-flip p."""
    values = {
        (row, s): encoder_separation(root / f"{row}_{s}")
        for row in rows
        for s in seeds
        if (root / f"{row}_{s}" / "checkpoints" / "last.ckpt").is_file()
    }
    lines = [
        f"| row | stage | seeds | mean ± std | vs {baseline} (paired) | 95 % CI | t-test p | "
        "sign-flip p |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    stages = len(next(iter(values.values()))) if values else 0
    for row in rows:
        got = [s for s in seeds if (row, s) in values]
        for i in range(stages):
            a = [values[row, s][i] for s in got]
            if not a:
                continue
            spread = f" ± {statistics.stdev(a):.3f}" if len(a) > 1 else ""
            paired = [s for s in got if (baseline, s) in values]
            diff = ci = t_p = flip_p = "-"
            if row != baseline and len(paired) >= 2:
                x = [values[row, s][i] for s in paired]
                y = [values[baseline, s][i] for s in paired]
                d = [p - q for p, q in zip(x, y, strict=True)]
                diff = f"{statistics.mean(d):+.3f} (n={len(d)})"
                ci, t_p, flip_p = paired_columns(x, y, digits=3)
            lines.append(
                f"| {row} | {i + 1} | {','.join(map(str, got))} | {statistics.mean(a):.3f}"
                f"{spread} | {diff} | {ci} | {t_p} | {flip_p} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--rows", nargs="+", required=True, metavar="ROW")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--baseline", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("\n".join(summarise(args.root, args.rows, args.seeds, args.baseline)))


if __name__ == "__main__":
    main()
