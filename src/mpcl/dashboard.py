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
- :class:`DebugImages`: every N steps, the step's source, target, mixed image, pseudo-label,
  quality weight, ClassMix and MIC masks (and prototype activation maps) as one PNG grid
  under ``<run dir>/debug/`` and on W&B, as DAFormer's debug output.

The UDA module exposes its intermediates through ``module.debug_images``: None normally;
:class:`DebugImages` sets it to an empty dict before a step it wants to see, the training
step fills it (tensors, detached), the callback reads and clears it after the step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mpcl.data.labels import CLASS_NAMES, colorize
from mpcl.io import write_image

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
        iou = getattr(module, "last_val_iou", None)
        if trainer.sanity_checking or iou is None or not wandb_loggers(trainer):
            return
        import wandb

        names = getattr(module, "class_names", CLASS_NAMES)
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


def _rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(
        np.uint8
    )


def _gray(values: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 (viridis), e.g. weights and masks."""
    v = (values.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(v, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def _labels(labels: torch.Tensor) -> np.ndarray:
    return colorize(labels.detach().cpu().numpy().astype(np.int64).clip(0, 255))


# Panel order and how each intermediate is drawn (keys the training step may fill).
PANELS: dict[str, Any] = {
    "source": _rgb,
    "source_label": _labels,
    "target": _rgb,
    "pseudo_label": _labels,
    "quality_weight": _gray,
    "classmix_mask": _gray,
    "mixed": _rgb,
    "mixed_label": _labels,
    "mic_masked": _rgb,
    "mic_mask": _gray,
}


def debug_grid(images: dict[str, torch.Tensor], max_rows: int = 2) -> np.ndarray:
    """One row per sample, one titled column per intermediate.

    Args:
        images: name -> (B, 3, H, W) images in [0, 1], (B, H, W) labels, or (B, [1,] H, W)
            weights / masks in [0, 1] (sizes may differ: panels are resized to the first).
        max_rows: samples shown.

    Returns:
        (rows * H + 16, columns * W, 3) uint8 RGB.
    """
    names = [n for n in PANELS if n in images]
    first = images[names[0]]
    height, width = first.shape[-2:]
    rows = []
    for b in range(min(max_rows, first.shape[0])):
        cells = []
        for name in names:
            value = images[name][b]
            if value.dim() == 3 and value.shape[0] == 1:
                value = value[0]
            cell = PANELS[name](value)
            if cell.shape[:2] != (height, width):
                cell = cv2.resize(cell, (width, height), interpolation=cv2.INTER_NEAREST)
            cells.append(cell)
        rows.append(np.concatenate(cells, axis=1))
    grid = np.concatenate(rows, axis=0)
    header = np.full((16, grid.shape[1], 3), 255, np.uint8)
    for i, name in enumerate(names):
        cv2.putText(header, name, (i * width + 2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0))
    return np.concatenate([header, grid], axis=0)


class DebugImages(L.Callback):
    """Every ``every_n_steps`` steps: the training step's intermediates as a PNG grid
    (``<run dir>/debug/step_<global step>.png``) and on W&B at ``trainer/global_step``, with
    the prototype activation maps of the mixed image once prototypes exist.

    Args:
        every_n_steps: interval in optimisation steps (DAFormer: 1000).
        max_rows: samples of the batch shown.
    """

    def __init__(self, every_n_steps: int = 1000, max_rows: int = 2) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.debug_images.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The step about to run ends at global_step + 1: ask for its images if that is due.
        due = trainer.global_rank == 0 and (trainer.global_step + 1) % self.every_n_steps == 0
        module.debug_images = {} if due else None

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        images = getattr(module, "debug_images", None)
        module.debug_images = None
        if not images:
            return
        step = trainer.global_step
        panels = {"panels": debug_grid(images, self.max_rows)}
        maps = self._activation_maps(module, images)
        if maps is not None:
            panels["prototype_maps"] = maps
        out_dir = Path(trainer.default_root_dir) / "debug"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, rgb in panels.items():
            suffix = "" if name == "panels" else f"_{name}"
            write_image(out_dir / f"step_{step:06d}{suffix}.png", rgb[..., ::-1].copy())
        if wandb_loggers(trainer):
            import wandb

            data = {f"debug/{k}": wandb.Image(v) for k, v in panels.items()}
            data |= self._wandb_masks(images)
            log_to_wandb(trainer, data)

    def _activation_maps(self, module: L.LightningModule, images: dict) -> np.ndarray | None:
        """Fig. 7 maps of the mixed (else source) image's own classes, or None."""
        prototype = getattr(module, "prototype", None)
        key = "mixed" if "mixed" in images else "source"
        if prototype is None or key not in images:
            return None
        if not bool(prototype.prototypes.initialized.any()):
            return None
        from mpcl.viz import prototype_activation_maps

        image = images[key][:1]  # (1, 3, H, W) in [0, 1]
        student = module.student
        was_training = student.training
        student.eval()  # no dropout, running BatchNorm statistics: a pure read
        try:
            features = student.predict_features(image)  # (1, D, H/4, W/4)
        finally:
            student.train(was_training)
        sim = prototype.prototype_similarity(features)[0]  # (C, K, h, w)
        label_key = f"{key}_label"
        present = prototype.prototypes.initialized.nonzero().squeeze(1).tolist()
        if label_key in images:
            labels = torch.unique(images[label_key][0])
            present = [c for c in present if c in labels.tolist()] or present
        return prototype_activation_maps(image[0], sim, present[:3], class_names=CLASS_NAMES)

    @staticmethod
    def _wandb_masks(images: dict) -> dict:
        """Target with its pseudo-label and mixed image with its label as W&B mask overlays."""
        import wandb

        classes = dict(enumerate(CLASS_NAMES)) | {255: "ignore"}
        out = {}
        for image_key, label_key in (("target", "pseudo_label"), ("mixed", "mixed_label")):
            if image_key in images and label_key in images:
                mask = images[label_key][0].detach().cpu().numpy().astype(np.uint8)
                out[f"debug/{image_key}"] = wandb.Image(
                    _rgb(images[image_key][0]),
                    masks={label_key: {"mask_data": mask, "class_labels": classes}},
                )
        return out
