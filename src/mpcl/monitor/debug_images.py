"""Training debug images, as DAFormer's debug output: every N steps, the step's source, target,
mixed image, pseudo-label, quality weight, ClassMix and MIC masks (and the prototype activation
maps of the mixed image) as one PNG grid under ``<run dir>/debug/`` and on W&B.

The training step returns its intermediates (detached) under ``outputs["images"]``; the
callback reads them on the steps it is due and touches nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch

from mpcl.io import write_image
from mpcl.monitor.dashboard import log_to_wandb, wandb_loggers
from mpcl.monitor.images import gray, labels, rgb
from mpcl.monitor.viz import prototype_activation_maps

# Panel order and how each intermediate is drawn (keys the training step may fill).
PANELS: dict[str, Any] = {
    "source": rgb,
    "source_label": labels,
    "target": rgb,
    "pseudo_label": labels,
    "quality_weight": gray,
    "classmix_mask": gray,
    "mixed": rgb,
    "mixed_label": labels,
    "mic_masked": rgb,
    "mic_mask": gray,
}


def debug_grid(
    images: dict[str, torch.Tensor], palette: np.ndarray, max_rows: int = 2
) -> np.ndarray:
    """One row per sample, one titled column per intermediate.

    Args:
        images: name -> (B, 3, H, W) images in [0, 1], (B, H, W) labels, or (B, [1,] H, W)
            weights / masks in [0, 1] (sizes may differ: panels are resized to the first).
        palette: (C, 3) uint8 RGB class colours of the labels.
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
            draw = PANELS[name]
            cell = draw(value, palette) if draw is labels else draw(value)
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

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # global_step counts the step just taken; the step's intermediates are in its outputs.
        if trainer.global_rank != 0 or trainer.global_step % self.every_n_steps:
            return
        images = outputs.get("images") if isinstance(outputs, dict) else None
        if not images:
            return
        step = trainer.global_step
        panels = {"panels": debug_grid(images, module.palette, self.max_rows)}
        maps = self._activation_maps(module, images)
        if maps is not None:
            panels["prototype_maps"] = maps
        out_dir = Path(trainer.default_root_dir) / "debug"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, picture in panels.items():
            suffix = "" if name == "panels" else f"_{name}"
            write_image(out_dir / f"step_{step:06d}{suffix}.png", picture[..., ::-1].copy())
        if wandb_loggers(trainer):
            import wandb

            data = {f"debug/{k}": wandb.Image(v) for k, v in panels.items()}
            data |= self._wandb_masks(images, module.class_names)
            log_to_wandb(trainer, data)

    def _activation_maps(self, module: L.LightningModule, images: dict) -> np.ndarray | None:
        """Fig. 7 maps of the mixed (else source) image's own classes, or None."""
        prototype = module.prototype
        key = "mixed" if "mixed" in images else "source"
        if prototype is None or key not in images:
            return None
        if not bool(prototype.prototypes.initialized.any()):
            return None
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
            shown = torch.unique(images[label_key][0]).tolist()
            present = [c for c in present if c in shown] or present
        return prototype_activation_maps(image[0], sim, present[:3], class_names=module.class_names)

    @staticmethod
    def _wandb_masks(images: dict, class_names: list[str]) -> dict:
        """Target with its pseudo-label and mixed image with its label as W&B mask overlays."""
        import wandb

        classes = dict(enumerate(class_names)) | {255: "ignore"}
        out = {}
        for image_key, label_key in (("target", "pseudo_label"), ("mixed", "mixed_label")):
            if image_key in images and label_key in images:
                mask = images[label_key][0].detach().cpu().numpy().astype(np.uint8)
                out[f"debug/{image_key}"] = wandb.Image(
                    rgb(images[image_key][0]),
                    masks={label_key: {"mask_data": mask, "class_labels": classes}},
                )
        return out
