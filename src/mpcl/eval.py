"""Evaluate a checkpoint on a target val set: per-class IoU, mIoU (and 16/13-class means for
Synthia), for the student and for the prototype-based output; writes JSON and Markdown.

    python -m mpcl.eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
    python -m mpcl.eval experiment=mic_gaussian data=synthia2cs ckpt_path=... paths.data_dir=/data

The model is rebuilt from the config the checkpoint carries (explicit overrides win; older
checkpoints need the run's experiment and overrides), then its weights are loaded strictly. Inference follows the
protocol: images at ``benchmark.eval_resize`` (sliding windows for HRDA/MIC), logits resized
back to the full label resolution. Only the target val set is read (the source data need not
be on disk), in one process whatever the checkpoint was trained with (DDP included).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mpcl.errors import ConfigError
from mpcl.io import atomic_write_bytes
from mpcl.metrics import iou_table, miou
from mpcl.run.build import build_module, build_target, build_trainer
from mpcl.run.cli import run_cli
from mpcl.run.config import validate
from mpcl.run.resume import CheckpointFile
from mpcl.run.runlog import echo


def results_table(results: dict) -> str:
    """A Markdown table of per-class IoU and the means."""
    lines = ["| class | IoU (%) |", "| --- | ---: |"]
    for name, value in results["per_class_iou"].items():
        lines.append(f"| {name} | {'absent' if value is None else f'{value:.1f}'} |")
    for key, value in results["means"].items():
        lines.append(f"| **{key}** | **{value:.2f}** |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig, checkpoint: CheckpointFile | None = None) -> dict:
    """Build the model, load the checkpoint (``checkpoint``: ``cfg.ckpt_path`` already read,
    else read here), validate; returns and writes the results."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m mpcl.eval ckpt_path=<file.ckpt>")
    validate(cfg)
    checkpoint = checkpoint or CheckpointFile.read(cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    dataset = build_target(cfg)
    module = build_module(cfg)
    trainer = build_trainer(cfg, single_process=True)
    checkpoint.load_into(module)
    loader = DataLoader(
        dataset, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers
    )
    trainer.validate(module, dataloaders=loader, verbose=False)
    iou = module.last_val_iou
    means = {"mIoU": 100 * miou(iou)}
    for name, classes in (cfg.get("class_subsets") or {}).items():
        means[name] = 100 * miou(iou, classes)
    proto = trainer.callback_metrics.get("val/mIoU_prototype")
    if proto is not None:
        means["mIoU (prototype output)"] = float(proto)
    results = {
        "ckpt_path": str(cfg.ckpt_path),
        "per_class_iou": {
            n: None if math.isnan(v) else v for n, v in iou_table(iou, module.class_names)
        },
        "means": means,
    }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_table(results).encode())
    echo(results_table(results))
    echo(f"results: {out / 'results.json'} and {out / 'results.md'}")
    return results


def main() -> None:
    run_cli("eval", evaluate)


if __name__ == "__main__":
    main()
