"""W&B dashboards and training debug images.

- Run config: the composed, resolved Hydra config (:func:`log_config`, called by
  ``mpcl.train``), so ``prototype.K``, the lambdas, ``seed``, data, model and experiment are
  all filterable in the W&B table.
- Run name: the experiment and the command-line overrides (``synthetic_gaussian
  prototype.K=3 seed=1``); group: the multirun (``train/<sweep dir>``); both are resolvers
  used by ``conf/logger/wandb.yaml``.
- Everything is logged at ``trainer/global_step`` (:func:`log_to_wandb`), the x-axis Lightning
  declares for its own metrics, with the value Lightning gives the metrics of the same step
  (never with W&B's own ``step=``). File names (``step_<n>``) count completed steps, as the
  checkpoints do: the images of file ``step_000002`` sit at ``trainer/global_step`` 1.
- :class:`WandbExtras`: per-class target IoU as a W&B table after each validation; the final
  checkpoint as a model artifact when the run is online.

Debug images of the training step: ``mpcl.monitor.debug_images``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# Overrides that are not part of what was trained: left out of run names.
_NAME_SKIP = ("paths.", "hydra.", "logger", "experiment", "ckpt_path", "callbacks.", "task_name")


def wandb_loggers(trainer: L.Trainer) -> list:
    """The trainer's WandbLoggers (empty off rank 0: Lightning only logs there)."""
    if trainer.global_rank != 0:
        return []
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def is_offline(logger: Any) -> bool:
    """True for a WandbLogger writing an offline run (``offline=True`` or WANDB_MODE)."""
    import os

    mode = os.environ.get("WANDB_MODE", "")
    return bool(getattr(logger, "_offline", False)) or mode in ("offline", "dryrun", "disabled")


# ---------------------------------------------------------------------------- run identity


def run_name() -> str:
    """``<experiment> <key=value ...>`` from the Hydra job (the ``mpcl.run_name`` resolver)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "mpcl"
    hydra_cfg = HydraConfig.get()
    experiment = hydra_cfg.runtime.choices.get("experiment") or hydra_cfg.job.name
    overrides = [
        o.lstrip("+~")
        for o in hydra_cfg.overrides.task
        if not o.lstrip("+~").startswith(_NAME_SKIP)
    ]
    return " ".join([str(experiment), *overrides])


def run_group() -> str:
    """``<task_name>/<sweep dir name>`` in a multirun, "" for a single run
    (``mpcl.run_group``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return ""
    sweep = Path(str(hydra_cfg.sweep.dir))
    if sweep.parent.name == "multiruns":  # <log_dir>/<task_name>/multiruns/<date>
        return f"{sweep.parent.parent.name}/{sweep.name}"
    return sweep.name


def log_config(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Put the composed, resolved config (without the ``hydra`` node) in every W&B run's
    config (rank 0)."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)  # Hydra's own settings (present when composed by the API)
    container = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.experiment.config.update(container, allow_val_change=True)


def wandb_step(trainer: L.Trainer) -> int:
    """The ``trainer/global_step`` value Lightning logs the current metrics at.

    Lightning's step counter is the 0-based index of the optimisation step: the metrics of
    the k-th step, and the validation after it, are logged at k - 1 (``trainer.global_step``
    is already k then). Lightning's own LearningRateMonitor logs at this counter too.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_to_wandb(trainer: L.Trainer, data: dict[str, Any]) -> None:
    """Log ``data`` (images, tables, scalars) to every W&B run at ``trainer/global_step``,
    the same x value as the metrics Lightning logs at this point."""
    for logger in wandb_loggers(trainer):
        logger.log_metrics(data, step=wandb_step(trainer))


# ---------------------------------------------------------------------------- callbacks


class WandbExtras(L.Callback):
    """Per-class IoU table after each validation; the final checkpoint as an artifact (online
    runs only: offline runs keep it on disk, ``wandb sync`` does not upload artifacts)."""

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        iou = module.last_val_iou
        if trainer.sanity_checking or iou is None or not wandb_loggers(trainer):
            return
        import wandb

        names = module.class_names
        rows = [
            [name, None if np.isnan(v) else round(100 * float(v), 2)]
            for name, v in zip(names, iou.tolist(), strict=True)
        ]
        log_to_wandb(trainer, {"val/IoU_table": wandb.Table(columns=["class", "IoU"], data=rows)})

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        if not ckpt or not Path(ckpt).is_file():
            return
        for logger in wandb_loggers(trainer):
            if is_offline(logger):
                continue
            import wandb

            run = logger.experiment
            artifact = wandb.Artifact(f"model-{run.id}", type="model")
            artifact.add_file(str(ckpt), name="last.ckpt")
            run.log_artifact(artifact, aliases=["last", f"step-{trainer.global_step}"])
