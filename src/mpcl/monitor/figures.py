"""Figures for the dashboard: segmentation masks, prototype t-SNE (Fig. 8) and per-prototype
activation maps (Fig. 7). Written as PNGs under ``<run dir>/figures`` and sent to W&B when a
``WandbLogger`` is attached.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mpcl.data.labels import IGNORE_INDEX
from mpcl.monitor.dashboard import wandb_loggers, wandb_step
from mpcl.monitor.images import labels as labels_rgb
from mpcl.monitor.images import rgb, save_png
from mpcl.monitor.viz import prototype_activation_maps, tsne_figure
from mpcl.prototypes import downsample

log = logging.getLogger(__name__)


@torch.no_grad()
def prototype_figures(
    module: L.LightningModule,
    images: torch.Tensor,
    labels: torch.Tensor,
    max_points: int = 2000,
    num_classes_shown: int = 3,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """t-SNE of prototype-space pixel features and activation maps for the first image.

    Args:
        module: a ``UDAModule`` with prototypes.
        images: (B, 3, H, W) target val images in [0, 1]; labels: (B, H, W) int64.

    Returns:
        {"tsne": (h, w, 3) uint8, "activation_maps": (h, w, 3) uint8}.
    """
    prototype = module.prototype
    features = module.student.predict_features(images)  # (B, D, h, w)
    small = downsample(labels, features.shape[-2:])  # (B, h, w)
    sim = prototype.prototype_similarity(features)  # (B, C, K, h, w)
    flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    classes = small.reshape(-1)
    keep = classes != IGNORE_INDEX
    own = sim.permute(0, 3, 4, 1, 2).reshape(-1, *sim.shape[1:3])  # (N, C, K)
    assign = own[torch.arange(len(classes)), classes.clamp(max=own.shape[1] - 1)].argmax(-1)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.nonzero(keep).squeeze(1)
    idx = idx[torch.randperm(len(idx), generator=gen)[:max_points]]
    tsne = tsne_figure(
        torch.nn.functional.normalize(flat[idx], dim=1),
        classes[idx],
        assign[idx],
        class_names=module.class_names,
    )
    present = torch.unique(small[0][small[0] != IGNORE_INDEX])
    counts = torch.stack([(small[0] == c).sum() for c in present]) if len(present) else present
    shown = present[counts.argsort(descending=True)][:num_classes_shown].tolist()
    maps = prototype_activation_maps(images[0], sim[0], shown, class_names=module.class_names)
    return {"tsne": tsne, "activation_maps": maps}


class Figures(L.Callback):
    """After each validation: predictions vs ground truth for a few val images, and (when
    prototypes are initialised) the prototype t-SNE and activation maps.

    Args:
        num_images: val images shown.
        tsne_points: pixels in the t-SNE (it is O(N^2): keep it small).
    """

    def __init__(self, num_images: int = 4, tsne_points: int = 1500) -> None:
        self.num_images = num_images
        self.tsne_points = tsne_points

    def _batch(self, trainer: L.Trainer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = trainer.datamodule.target_val
        items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        shapes = {tuple(it["image"].shape) for it in items}
        items = [it for it in items if tuple(it["image"].shape) == next(iter(shapes))]
        images = torch.stack([it["image"] for it in items]).to(device)
        return images, torch.stack([it["label"] for it in items]).to(device)

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0 or trainer.datamodule is None:
            return
        out_dir = Path(trainer.default_root_dir) / "figures"
        step = trainer.global_step
        images, labels = self._batch(trainer, module.device)
        preds = module.predict_logits(images).argmax(1)
        rows = [
            np.concatenate(
                [rgb(img), labels_rgb(p, module.palette), labels_rgb(t, module.palette)], 1
            )
            for img, p, t in zip(images, preds, labels, strict=True)
        ]
        panels = {"predictions": np.concatenate(rows, 0)}
        if module.prototype is not None and bool(module.prototype.prototypes.initialized.any()):
            panels |= prototype_figures(module, images, labels, self.tsne_points)
        for name, picture in panels.items():
            save_png(picture, out_dir / f"{name}_step{step:06d}.png")
        classes = dict(enumerate(module.class_names))
        for logger in wandb_loggers(trainer):
            import wandb

            masks = [
                wandb.Image(
                    rgb(img),
                    masks={
                        "predictions": {
                            "mask_data": p.cpu().numpy(),
                            "class_labels": classes,
                        },
                        "ground_truth": {
                            "mask_data": t.cpu().numpy(),
                            "class_labels": classes,
                        },
                    },
                )
                for img, p, t in zip(images, preds, labels, strict=True)
            ]
            # At the trainer/global_step of this validation's metrics (mpcl.monitor.dashboard).
            logger.log_metrics(
                {
                    "val/segmentation": masks,
                    **{f"val/{k}": wandb.Image(v) for k, v in panels.items()},
                },
                step=wandb_step(trainer),
            )
