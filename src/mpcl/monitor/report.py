"""The end-of-run report: per-class target IoU, mIoU, and where logs and checkpoints are."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mpcl.monitor.dashboard import is_offline


def _log_dir(trainer: L.Trainer) -> str | None:
    """The first logger's directory, as ``trainer.log_dir`` gives it, without its broadcast."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    return getattr(logger, "log_dir", None) or logger.save_dir


def final_report(
    cfg: DictConfig, module: L.LightningModule, trainer: L.Trainer, metrics: dict[str, float]
) -> None:
    """Print the IoU table and the log/checkpoint/W&B locations (rank 0 only).

    Nothing here may be a collective (e.g. ``trainer.log_dir`` broadcasts): under DDP the
    other ranks have already returned.
    """
    if trainer.global_rank != 0:
        return
    console = Console()
    iou = module.last_val_iou
    if iou is not None:
        table = Table(title="target val IoU (%)")
        table.add_column("class")
        table.add_column("IoU", justify="right")
        for name, value in zip(module.class_names, iou.tolist(), strict=True):
            table.add_row(name, "absent" if math.isnan(value) else f"{100 * value:.1f}")
        table.add_row("[bold]mIoU", f"[bold]{metrics.get('val/mIoU', float('nan')):.2f}")
        if "val/mIoU_prototype" in metrics:
            table.add_row("mIoU (prototype output)", f"{metrics['val/mIoU_prototype']:.2f}")
        console.print(table)
    # Paths are never wrapped (soft_wrap): rich would fold them at 80 columns in a log file.
    console.print(f"logs: {_log_dir(trainer) or cfg.paths.output_dir}", soft_wrap=True)
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    if ckpt:
        console.print(f"checkpoint: {ckpt}", soft_wrap=True)
    for logger in trainer.loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        if is_offline(logger):
            run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-<id>
            console.print(
                f"W&B run (offline): {run_dir}\n  upload it later with: wandb sync {run_dir}",
                soft_wrap=True,
            )
        else:
            console.print(f"W&B run: {logger.experiment.url}", soft_wrap=True)
