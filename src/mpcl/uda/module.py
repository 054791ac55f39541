"""The LightningModule: one training step is the paper's Algorithm 1 on DACS/DAFormer/HRDA/MIC.

    python -m mpcl.train                              # self-training + Gaussian MPCL, synthetic
    python -m mpcl.train uda=source_only prototype=none
    python -m mpcl.train experiment=mic_gaussian      # GTA -> Cityscapes, full size

Step t (``training_step``; the numbers match the comments in the code):
  1. teacher <- EMA(student), alpha_t = min(1 - 1/(t+1), 0.999)                     (Eq. 2)
  2. student(x_S) -> segmentation loss on y_S (+ ImageNet Feature Distance)          (Eq. 1)
  3. teacher(x_T) -> pseudo-label, quality weight w_T                                 (Eq. 16)
  4. ClassMix -> x_M, y_M, w_M = w_T (1 - M) + M; strong augmentation of x_M
  5. student(x_M) -> weighted segmentation loss on y_M                               (Eq. 3)
  6. MPCL: prototype losses on the source and/or mixed prototype views               (Eq. 18)
  7. MIC: student(masked x_T) -> weighted loss on the step-3 pseudo-labels
  8. sum: L_seg = L_ce^S + L_ce^T (Eq. 4) plus the prototype losses (Eq. 19); Lightning
     runs backward and the AdamW step.

The student is any ``SegmentationModel`` (``mpcl.models.segmentor``): this module never asks
which; the model owns its loss (``seg_loss``) and its prototype views (``prototype_views``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import reset_seed
from torch import nn

from mpcl.data.labels import IGNORE_INDEX, default_palette
from mpcl.metrics import ClassSeparation, miou, segmentation_iou
from mpcl.models.segmentor import SegmentationModel
from mpcl.prototypes import PrototypeLearning
from mpcl.streams import RandomStreams
from mpcl.uda.feature_distance import FeatureDistance
from mpcl.uda.masking import MaskedConsistency
from mpcl.uda.mixing import StrongAugment, class_mix_mask, mix
from mpcl.uda.optim import build_optimizer, param_groups
from mpcl.uda.pseudo_label import pseudo_label
from mpcl.uda.teacher import EMATeacher

METHODS = ("dacs", "source_only", "oracle")
PROTOTYPE_DOMAINS = ("source", "mixed")
# The random consumers of the step, each with its own stream (mpcl.streams); the prototypes
# keep theirs (feature-bank picks, K-Means seeding).
STREAMS = ("classmix", "augment", "mic_augment", "mic_mask", "hrda_crop")


class UDAModule(L.LightningModule):
    """Student, EMA teacher and (optionally) MPCL prototypes; composed by Hydra.

    Args:
        student: a ``SegmentationModel`` (images (B, 3, H, W) in [0, 1]).
        optimizer: partial optimizer (AdamW with lr, weight decay, betas) taking ``params``.
        scheduler: partial lr scheduler taking ``optimizer`` (warm-up + poly).
        prototype: a ``PrototypeLearning`` built for the student, or None for the baseline.
        method: "dacs" (self-training), "source_only" or "oracle" (target labels).
        head_lr_mult: lr multiplier of every non-encoder parameter (10).
        layer_decay: None, or layer-wise lr decay of the encoder (ViTs; ``optim.param_groups``).
        ema_alpha: teacher momentum ceiling. pseudo_threshold: theta of Eq. 16.
        strong_augment: colour jitter + blur on the mixed (and masked) image.
        mic: a ``MaskedConsistency``, or None.
        feature_distance: partial ``FeatureDistance`` taking ``encoder`` (the student's,
            copied and frozen as the ImageNet reference), or None.
        prototype_domains: which features feed the prototypes (clustering, updates, feature
            bank): "source", "mixed" or both (Table VII).
        contrast_domains: which of ``prototype_domains`` feed the contrastive loss (Eq. 17);
            None = all of them.
        consistency_domains: which of ``prototype_domains`` feed the consistency loss
            (Eq. 12); None = all of them.
        eval_resize: (H, W) the test image is resized to before inference (logits are
            resized back to the label size), or None to infer at the loaded size.
        class_subsets: extra mIoU over class subsets, e.g. {"mIoU16": [...]} (Synthia).
        class_names: the label space, in label-id order (the data config's ``class_names``);
            C = its length, which the student's heads and the prototypes must share.
        diagnostics_every: every N steps, the ratio of the prototype losses' gradient to the
            segmentation losses' at the encoder output (``prototype/grad_ratio``; two extra
            backward passes through the heads); 0 = never.
        seed: the run's seed: ClassMix, the strong augmentation, MIC's augmentation and masks
            draw from their own streams (``mpcl.streams``), so switching a component on or off
            leaves the other draws of the run identical.
        palette: (C, 3) RGB colours of the classes (the data config's ``palette``) for
            figures, debug images and overlays; None: distinct default colours.
    """

    def __init__(
        self,
        student: SegmentationModel,
        class_names: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        prototype: PrototypeLearning | None = None,
        method: str = "dacs",
        head_lr_mult: float = 10.0,
        layer_decay: float | None = None,
        ema_alpha: float = 0.999,
        pseudo_threshold: float = 0.968,
        strong_augment: bool = True,
        mic: MaskedConsistency | None = None,
        feature_distance: Callable[..., FeatureDistance] | None = None,
        prototype_domains: Sequence[str] = PROTOTYPE_DOMAINS,
        contrast_domains: Sequence[str] | None = None,
        consistency_domains: Sequence[str] | None = None,
        eval_resize: Sequence[int] | None = None,
        class_subsets: dict[str, Sequence[int]] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        diagnostics_every: int = 50,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"uda.method={method!r} is unknown: choose one of {METHODS}")
        if not 0.0 < pseudo_threshold < 1.0:
            raise ValueError(f"uda.pseudo_threshold={pseudo_threshold} must be in (0, 1)")
        bad = [d for d in prototype_domains if d not in PROTOTYPE_DOMAINS]
        if bad or not prototype_domains:
            raise ValueError(
                f"uda.prototype_domains={list(prototype_domains)}: choose a non-empty subset of "
                f"{PROTOTYPE_DOMAINS}"
            )
        for key, chosen in (
            ("contrast_domains", contrast_domains),
            ("consistency_domains", consistency_domains),
        ):
            if chosen is not None and not set(chosen) <= set(prototype_domains):
                raise ValueError(
                    f"uda.{key}={list(chosen)}: choose a subset of uda.prototype_domains="
                    f"{list(prototype_domains)} (or null for all of them)"
                )
        num_classes = len(class_names)
        if prototype is not None and prototype.num_classes != num_classes:
            raise ValueError(
                f"the prototypes have {prototype.num_classes} classes but class_names has "
                f"{num_classes}: set prototype.num_classes=${{num_classes}}"
            )
        if prototype is not None and student.prototype_dim != prototype.dim:
            raise ValueError(
                f"the student's prototype head gives {student.prototype_dim}-dim features but "
                f"the prototypes are {prototype.dim}-dim: build them with mpcl.train.build_module"
            )
        self.save_hyperparameters(
            ignore=["student", "optimizer", "scheduler", "prototype", "mic", "feature_distance"]
        )
        self.student = student
        self.teacher = EMATeacher(student, ema_alpha) if method == "dacs" else None
        self.prototype = prototype
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.method = method
        self.strong_augment = StrongAugment() if strong_augment else None
        self.mic = mic
        # A frozen copy of the initial (ImageNet) encoder serves as the reference.
        self.feature_distance = (
            feature_distance(encoder=student.encoder) if feature_distance else None
        )
        self.class_names = list(class_names)
        self.num_classes = num_classes
        # (C, 3) uint8 class colours (read by mpcl.monitor and mpcl.predict)
        self.palette = default_palette(num_classes) if palette is None else np.asarray(palette)
        if self.palette.shape != (num_classes, 3):
            raise ValueError(
                f"palette has shape {self.palette.shape}, expected ({num_classes}, 3): one RGB "
                "colour per class"
            )
        self.palette = self.palette.astype(np.uint8)
        self.class_subsets = {k: list(v) for k, v in (class_subsets or {}).items()}
        self.streams = RandomStreams(seed, STREAMS)
        self.val_iou = segmentation_iou(num_classes)
        self.val_proto_iou = segmentation_iou(num_classes) if prototype is not None else None
        # Fisher's ratio of the target val features in prototype space (docs/method.md).
        self.val_separation = (
            ClassSeparation(num_classes, prototype.dim) if prototype is not None else None
        )
        self.diagnostics_every = diagnostics_every
        # The last validation's per-class IoU (C,) on the CPU and the step it ran at (read by
        # the report, the dashboard and mpcl.eval); None / -1 before the first validation.
        self.last_val_iou: torch.Tensor | None = None
        self.last_val_step: int = -1

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """One step; returns what callbacks read as ``outputs``: ``loss`` (the Eq. 19 sum),
        ``logs`` (each loss term, the quality weight and prototype diagnostics, detached) and
        ``images`` (the step's intermediates, detached, for ``mpcl.monitor.debug_images``)."""
        if self.method == "dacs":
            return self._self_training_step(batch)
        # Supervised baselines: one labelled domain, same losses as the source branch.
        if self.method == "oracle" and "target_label" not in batch:
            raise ValueError("uda=oracle needs a labelled target train set")
        domain = "source" if self.method == "source_only" else "target"
        images, labels = batch[f"{domain}_image"], batch[f"{domain}_label"]
        out = self.student.forward_train(images, generator=self.streams["hrda_crop"])
        loss = self.student.seg_loss(out, labels, None)
        logs = {"loss_source": loss}
        if self.prototype is not None:
            ones = torch.ones_like(labels, dtype=torch.float32)
            loss = loss + self._prototype_loss([(out, labels, ones)], logs)
        images = {domain: images, f"{domain}_label": labels}
        return self._log_train(loss, logs, images)

    def _prototype_losses_of(self, domain: str) -> set[str]:
        """The prototype losses fed by a domain's pixels (uda.*_domains; None = all)."""
        hp = self.hparams
        chosen = {"contrast": hp.contrast_domains, "consistency": hp.consistency_domains}
        return {loss for loss, ds in chosen.items() if ds is None or domain in ds}

    def _prototype_loss(
        self,
        domains: list[tuple[dict, torch.Tensor, torch.Tensor]],
        logs: dict,
        losses: list[set[str]] | None = None,
    ) -> torch.Tensor:
        """Eq. 18 on the student's prototype views of each (output, labels, weights) domain
        (``losses``: per domain, the prototype losses it feeds; None = both); adds the loss
        terms and diagnostics to ``logs``, returns the weighted loss."""
        views = [self.student.prototype_views(out, y, w) for out, y, w in domains]
        proto = self.prototype.forward_views(views, losses)
        logs |= {k if k.startswith("loss") else f"prototype/{k}": v for k, v in proto.items()}
        return logs.pop("loss")

    def _self_training_step(self, batch: dict) -> torch.Tensor:
        x_s, y_s, x_t = batch["source_image"], batch["source_label"], batch["target_image"]
        hp = self.hparams
        student = self.student
        logs: dict[str, torch.Tensor] = {}
        # 1. EMA teacher (Eq. 2).
        logs["ema_alpha"] = torch.tensor(self.teacher.update(student, self.global_step))

        # 2. Source: supervised loss (+ ImageNet Feature Distance on the last encoder stage).
        crops = self.streams["hrda_crop"]  # HRDA's detail crops (other students draw none)
        out_s = student.forward_train(x_s, generator=crops)
        loss_source = student.seg_loss(out_s, y_s, None)
        loss = loss_source
        logs["loss_source"] = loss_source
        if self.feature_distance is not None:
            fd = self.feature_distance(out_s["encoder_features"][-1], out_s["encoder_input"], y_s)
            loss = loss + self.feature_distance.weight * fd
            logs["loss_feature_distance"] = fd

        # 3. Teacher pseudo-labels and the quality weight (Eq. 16): one scalar per batch.
        with torch.no_grad():
            y_t, w_t, quality = pseudo_label(
                self.teacher.model.predict(x_t), hp.pseudo_threshold, batch.get("target_valid")
            )
        logs["quality_weight"] = quality

        # 4. ClassMix: paste half of the source classes onto the target.
        mask = class_mix_mask(y_s, self.num_classes, self.streams["classmix"])
        x_m = mix(mask, x_s, x_t)
        y_m = mix(mask, y_s, y_t)
        w_m = mix(mask, torch.ones_like(w_t), w_t)
        if self.strong_augment is not None:
            x_m = self.strong_augment(x_m, self.streams["augment"])
        images = {
            "source": x_s, "source_label": y_s, "target": x_t, "pseudo_label": y_t,
            "quality_weight": w_m, "classmix_mask": mask, "mixed": x_m, "mixed_label": y_m,
        }  # fmt: skip

        # 5. Mixed: the weighted loss on the mixed labels (Eq. 3).
        out_m = student.forward_train(x_m, generator=crops)
        loss_mixed = student.seg_loss(out_m, y_m, w_m)
        loss = loss + loss_mixed
        logs["loss_mixed"] = loss_mixed

        # 6. MPCL: contrastive + consistency losses on source and/or mixed views (Eq. 18).
        if self.prototype is not None:
            views = {  # source pixels: weight 1
                "source": (out_s, y_s, torch.ones_like(y_s, dtype=torch.float32)),
                "mixed": (out_m, y_m, w_m),
            }
            names = [d for d in PROTOTYPE_DOMAINS if d in hp.prototype_domains]
            losses = [self._prototype_losses_of(d) for d in names]
            proto_loss = self._prototype_loss([views[d] for d in names], logs, losses)
            logs["prototype/target_share"] = self._target_share(views, names, mask)
            if self.diagnostics_every and self.global_step % self.diagnostics_every == 0:
                logs["prototype/grad_ratio"] = self._grad_ratio(proto_loss, loss, (out_s, out_m))
            loss = loss + proto_loss

        # 7. MIC: the masked target, trained on the unmasked target's pseudo-labels.
        if self.mic is not None:
            x_k, keep = self.mic(
                x_t, self.strong_augment, self.streams["mic_augment"], self.streams["mic_mask"]
            )
            images |= {"mic_masked": x_k, "mic_mask": keep}
            # No prototype loss reads the masked pass: no prototype head (44% of a forward).
            out_k = student.forward_train(x_k, with_features=False, generator=crops)
            loss_masked = student.seg_loss(out_k, y_t, w_t)
            loss = loss + self.mic.weight * loss_masked
            logs["loss_masked"] = loss_masked
        # 8. Eq. 19 (the self-training part is Eq. 4: loss_source + loss_mixed): Lightning
        # backpropagates the sum.
        return self._log_train(loss, logs, images)

    @staticmethod
    @torch.no_grad()
    def _target_share(views: dict, names: list[str], pasted: torch.Tensor) -> torch.Tensor:
        """The share of the prototype losses' pixel weight that target pixels carry: the
        mixed image's unpasted labelled pixels (weight w_T) over all labelled pixels of the
        prototype views (source pixels weight 1, mixed w^M). 0-dim; 0 without a mixed view."""
        total = torch.zeros((), device=pasted.device)
        for name in names:
            _, labels, weights = views[name]
            total = total + (weights * (labels != IGNORE_INDEX)).sum()
        if "mixed" not in names:
            return total * 0
        _, labels, weights = views["mixed"]
        target = (weights * ((labels != IGNORE_INDEX) & ~pasted)).sum()
        return target / total.clamp_min(1e-12)

    @staticmethod
    def _grad_ratio(
        proto_loss: torch.Tensor, seg_loss: torch.Tensor, outputs: Sequence[dict]
    ) -> torch.Tensor:
        """||d proto_loss / d f|| / ||d seg_loss / d f|| over the encoder outputs f of the
        source and mixed passes: how hard the prototype losses pull on the shared encoder
        compared with the segmentation losses. Leaves every parameter's .grad untouched."""
        features = [f for out in outputs for f in out["encoder_features"] if f.requires_grad]
        if not features or not proto_loss.requires_grad:
            return proto_loss.detach() * 0
        norms = []
        for term in (proto_loss, seg_loss):
            grads = torch.autograd.grad(term, features, retain_graph=True, allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else term.new_zeros(()))
        return (norms[0] / norms[1].clamp_min(1e-12)).detach()

    def _log_train(self, loss: torch.Tensor, logs: dict, images: dict) -> dict[str, Any]:
        batch_size = next(iter(images.values())).shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in logs.items():
            show = name in ("loss_contrast", "loss_consistency", "quality_weight")
            self.log(f"train/{name}", value, prog_bar=show, batch_size=batch_size)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        # Lightning hands the extra keys to the callbacks as they are: detach them here.
        return {
            "loss": loss,
            "logs": {k: v.detach() if torch.is_tensor(v) else v for k, v in logs.items()},
            "images": {k: v.detach() for k, v in images.items()},
        }

    # ------------------------------------------------------------------ evaluation
    def _resize_for_eval(self, images: torch.Tensor) -> torch.Tensor:
        size = self.hparams.eval_resize
        if size is None or tuple(images.shape[-2:]) == tuple(size):
            return images
        return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Student logits (B, C, H, W) at the input size: inferred at ``eval_resize`` (sliding
        window for HRDA), then bilinearly resized back."""
        logits = self.student.predict(self._resize_for_eval(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def prototype_logits(
        self, images: torch.Tensor, features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prototype-based output (Table VI): (B, C, H, W) class scores from the prototypes
        (``features``: the images' prototype features, if already computed)."""
        if features is None:
            features = self.student.predict_features(self._resize_for_eval(images))
        scores = self.prototype.predict(features)
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        self.val_iou.update(self.predict_logits(images).argmax(1), labels)
        if self.prototype is None:
            return
        features = self.student.predict_features(self._resize_for_eval(images))  # (B, D, h, w)
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
        if self.prototype.normalize_features:  # the space the prototypes live in
            flat = F.normalize(flat, dim=1)
        small = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")
        self.val_separation.update(flat, small.long().reshape(-1))
        if bool(self.prototype.prototypes.initialized.any()):
            logits = self.prototype_logits(images, features)
            self.val_proto_iou.update(logits.argmax(1), labels)

    def on_validation_epoch_end(self) -> None:
        iou = self.val_iou.compute()
        self.val_iou.reset()
        self.log("val/mIoU", 100 * miou(iou), prog_bar=True)
        for name, classes in self.class_subsets.items():
            self.log(f"val/{name}", 100 * miou(iou, classes))
        for name, value in zip(self.class_names, iou, strict=True):
            self.log(f"val/IoU/{name}", 100 * value)
        self.last_val_iou = iou.cpu()
        self.last_val_step = self.global_step
        if self.val_proto_iou is not None and self.val_proto_iou.update_count > 0:
            self.log("val/mIoU_prototype", 100 * miou(self.val_proto_iou.compute()))
        if self.val_proto_iou is not None:
            self.val_proto_iou.reset()
        if self.val_separation is not None and self.val_separation.update_count > 0:
            self.log("val/class_separation", self.val_separation.compute().float())
            self.val_separation.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict:
        modules = nn.ModuleDict({"student": self.student})
        if self.prototype is not None:
            modules["prototype"] = self.prototype  # trainable parts, if any, are heads
        groups = param_groups(modules, self.hparams.head_lr_mult, self.hparams.layer_decay)
        optimizer = build_optimizer(self.optimizer_factory, groups)
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ exact resume
    def setup(self, stage: str) -> None:
        # Lightning's DDP reseeds each rank here (after the model was built); do the same in one
        # process, so that N ranks draw the step's random choices from the same stream as one
        # process on the union batch. A resumed run then restores its saved RNG states.
        if stage == "fit":
            reset_seed()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Tensors and plain Python types only, so that weights_only loading accepts them.
        name, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "streams": {name: g.get_state() for name, g in self._streams().items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
        if states.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        streams = self._streams()
        for name, state in (states.get("streams") or {}).items():
            if name in streams:  # a stream a checkpoint lacks keeps its fresh state
                streams[name].set_state(state)

    def _streams(self) -> dict[str, torch.Generator]:
        """Every stream of the step by name (the prototypes' under ``prototype.``)."""
        found = {name: self.streams[name] for name in self.streams}
        if self.prototype is not None:
            streams = self.prototype.streams
            found |= {f"prototype.{name}": streams[name] for name in streams}
        return found
