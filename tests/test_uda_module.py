"""The self-training step's pseudo-labels, quality weight and mixed weights (Eq. 16), checked
against a direct computation; and the segmentor interface: a third, trivial segmentor trains
with prototypes through the unchanged UDA module."""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from mpcl.data.labels import CLASS_NAMES
from mpcl.models.encoders import MiT
from mpcl.models.heads import SegFormerHead
from mpcl.models.segmentor import PrototypeView, Segmentor, weighted_cross_entropy
from mpcl.prototypes import GaussianPrototypes, PrototypeLearning
from mpcl.uda.module import UDAModule
from mpcl.uda.optim import build_scheduler
from mpcl.uda.pseudo_label import pseudo_label

NUM_CLASSES = 19


def test_pseudo_label_and_quality_weight():
    b, h, w = 2, 32, 32
    # Teacher logits: class 3 everywhere; confident (p > 0.968) on the left 12 columns only.
    logits = torch.zeros(b, NUM_CLASSES, h, w)
    logits[:, 3] = 2.0
    logits[:, 3, :, :12] = 10.0
    valid = torch.ones(b, h, w)
    valid[:, -4:] = 0  # padding rows of the target crop
    labels, weights, quality = pseudo_label(logits, 0.968, valid)
    probs = torch.softmax(logits.double(), 1).max(1).values  # float64 reference
    q = (probs >= 0.968).double().mean()
    assert abs(q.item() - 12 / 32) < 1e-12  # one scalar per batch: the confident share
    assert abs(quality.item() - q.item()) < 1e-6
    assert torch.equal(labels, torch.full((b, h, w), 3))
    torch.testing.assert_close(weights, quality * valid)
    _, no_valid, _ = pseudo_label(logits, 0.968)
    assert torch.all(no_valid == quality)


class _Recording(Segmentor):
    """A Segmentor that records the labels and weights its loss sees (the teacher, a copy,
    shares the list) and whose teacher logits are fixed."""

    def __init__(self, teacher_logits: Tensor) -> None:
        super().__init__(
            MiT("b0", depths=(1, 1, 1, 1)),
            SegFormerHead([32, 64, 160, 256], 32, num_classes=NUM_CLASSES),
        )
        self.teacher_logits = teacher_logits
        self.seen: list[tuple[Tensor, Tensor | None]] = []

    def seg_loss(self, out: dict, labels: Tensor, weights: Tensor | None) -> Tensor:
        self.seen.append((labels, weights))
        return super().seg_loss(out, labels, weights)

    def predict(self, images: Tensor) -> Tensor:
        return self.teacher_logits


def _module(student: nn.Module, **kwargs: Any) -> UDAModule:
    module = UDAModule(
        student,
        CLASS_NAMES,
        functools.partial(torch.optim.AdamW, lr=1e-3),
        functools.partial(build_scheduler, max_steps=10, warmup_steps=0),
        strong_augment=False,
        **kwargs,
    )
    module.log = lambda *a, **k: None
    module.optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    return module


def test_self_training_step_feeds_the_mixed_labels_and_weights():
    torch.manual_seed(0)
    b, h, w = 2, 32, 32
    logits = torch.zeros(b, NUM_CLASSES, h, w)
    logits[:, 3] = 2.0
    logits[:, 3, :, :12] = 10.0
    module = _module(_Recording(logits))
    valid = torch.ones(b, h, w)
    valid[:, -4:] = 0
    batch = {
        "source_image": torch.rand(b, 3, h, w),
        "source_label": torch.full((b, h, w), 7).index_fill_(2, torch.arange(16, 32), 5),
        "target_image": torch.rand(b, 3, h, w),
        "target_valid": valid,
    }
    module.training_step(batch, 0)
    (y_s, w_s), (y_m, w_m) = module.student.seen
    assert w_s is None and torch.equal(y_s, batch["source_label"])
    _, _, q = pseudo_label(logits, 0.968)
    # ClassMix pastes one of the source classes {7, 5} (the mask M) on pseudo-label 3.
    pasted = y_m != 3
    assert torch.equal(y_m[pasted], y_s[pasted]) and pasted.any() and (~pasted).any()
    expected_w = torch.where(pasted, torch.ones(()), q * valid)  # w_M = w_T (1 - M) + M
    torch.testing.assert_close(w_m, expected_w)


class TinySegmentor(nn.Module):
    """A third segmentor, written against the interface only: two convolutions, logits at
    stride 2, prototype features at stride 4 from a second view of the same image."""

    resolutions = ("fine", "coarse")

    def __init__(self, num_classes: int = NUM_CLASSES, proto_dim: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)
        self.proto_head = nn.Conv2d(16, proto_dim, 1)

    @property
    def prototype_dim(self) -> int:
        return self.proto_head.out_channels

    def forward_train(
        self, images: Tensor, with_features: bool = True, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        feats = self.encoder(images)
        half = F.avg_pool2d(feats, 2)
        return {
            "logits": self.classifier(feats),
            "views": (self.proto_head(feats), self.proto_head(half)),
            "encoder_features": [feats],
            "encoder_input": images,
        }

    def seg_loss(self, out: dict[str, Any], labels: Tensor, weights: Tensor | None) -> Tensor:
        return weighted_cross_entropy(out["logits"], labels, weights)

    def prototype_views(self, out: dict, labels: Tensor, weights: Tensor) -> list[PrototypeView]:
        return [
            PrototypeView(r, f, labels, weights) for r, f in zip(self.resolutions, out["views"])
        ]

    def predict(self, images: Tensor) -> Tensor:
        logits = self.classifier(self.encoder(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear")

    def predict_features(self, images: Tensor) -> Tensor:
        return self.proto_head(self.encoder(images))


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"bank_mode": "queue"}, {"early_start": True}])
def test_a_new_segmentor_trains_with_prototypes(options):
    torch.manual_seed(0)
    student = TinySegmentor()
    prototype = PrototypeLearning(
        GaussianPrototypes,
        num_classes=NUM_CLASSES,
        K=2,
        dim=student.prototype_dim,
        resolutions=student.resolutions,
        feature_bank_size=NUM_CLASSES * 20,
        **options,
    )
    module = UDAModule(
        student,
        CLASS_NAMES,
        functools.partial(torch.optim.AdamW, lr=1e-3),
        functools.partial(build_scheduler, max_steps=6, warmup_steps=0),
        prototype=prototype,
    )
    # Two classes in fixed halves of each image: their banks fill within a few steps.
    labels = torch.zeros(6, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    items = [
        {
            "source_image": torch.rand(3, 16, 16),
            "source_label": y,
            "target_image": torch.rand(3, 16, 16),
        }
        for y in labels
    ]
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(items, batch_size=2))
    assert trainer.global_step == 6
    assert set(prototype.feature_banks) == {"fine", "coarse"}
    assert prototype.prototypes.initialized[:2].all()  # both classes learned prototypes
    logged = trainer.callback_metrics
    assert {"train/loss_contrast_fine", "train/loss_contrast_coarse"} <= set(logged)
    assert torch.isfinite(logged["train/loss"])


def test_each_prototype_loss_sees_only_its_domains():
    torch.manual_seed(0)
    student = TinySegmentor()
    prototype = PrototypeLearning(
        GaussianPrototypes,
        num_classes=NUM_CLASSES,
        K=2,
        dim=8,
        resolutions=student.resolutions,
        feature_bank_size=380,
    )
    seen = []

    def recording_forward(features, labels, weights=None, resolution=None, **masks):
        seen.append((resolution, features.shape[0], masks))
        return PrototypeLearning.forward(prototype, features, labels, weights, resolution, **masks)

    prototype.forward = recording_forward
    module = _module(
        student, prototype=prototype, contrast_domains=["source"], consistency_domains=["mixed"]
    )
    b = 2
    batch = {
        "source_image": torch.rand(b, 3, 16, 16),
        "source_label": torch.randint(0, 3, (b, 16, 16)),
        "target_image": torch.rand(b, 3, 16, 16),
    }
    module.training_step(batch, 0)
    assert [r for r, _, _ in seen] == ["fine", "coarse"]
    for _, rows, masks in seen:  # rows: source images first, then mixed ones
        assert rows == 2 * b
        source_rows = [True] * b + [False] * b
        assert masks["contrast_pixels"].all(dim=(1, 2)).tolist() == source_rows
        assert (~masks["contrast_pixels"]).all(dim=(1, 2)).tolist() == source_rows[::-1]
        assert masks["consistency_pixels"].all(dim=(1, 2)).tolist() == source_rows[::-1]
        assert (~masks["consistency_pixels"]).all(dim=(1, 2)).tolist() == source_rows

    seen.clear()  # the default: both losses on every prototype domain, no masks
    _module(student, prototype=prototype).training_step(batch, 0)
    assert [masks for _, _, masks in seen] == [{}, {}]

    with pytest.raises(ValueError, match=r"uda.contrast_domains=\['mixed'\]: choose a subset"):
        _module(
            student, prototype=prototype, prototype_domains=["source"], contrast_domains=["mixed"]
        )
