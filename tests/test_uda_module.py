"""The self-training step's pseudo-labels, quality weight and mixed weights, checked against
a direct computation with a teacher whose outputs are known."""

from __future__ import annotations

import functools

import torch

import mpcl.uda.module as uda
from mpcl.models.encoders import MiT
from mpcl.models.heads import SegFormerHead
from mpcl.models.segmentor import Segmentor


def _module(**kwargs) -> uda.UDAModule:
    student = Segmentor(MiT("b0", depths=(1, 1, 1, 1)), SegFormerHead([32, 64, 160, 256], 32))
    module = uda.UDAModule(
        student, functools.partial(torch.optim.AdamW), max_steps=10, strong_augment=False, **kwargs
    )
    module.log = lambda *a, **k: None
    module.optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.1)
    return module


def test_quality_weight_pseudo_labels_and_mixed_weights(monkeypatch):
    torch.manual_seed(0)
    module = _module(pseudo_threshold=0.968)
    b, h, w = 2, 32, 32
    # Teacher logits: class 3 everywhere; confident (p > 0.968) on the left 12 columns only.
    logits = torch.zeros(b, 19, h, w)
    logits[:, 3] = 2.0
    logits[:, 3, :, :12] = 10.0
    monkeypatch.setattr(module.teacher.model, "predict", lambda x: logits)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[:, :8] = True  # pasted source rows
    monkeypatch.setattr(uda, "class_mix_mask", lambda labels: mask)
    seen = []
    real_loss = module._seg_loss
    monkeypatch.setattr(
        module, "_seg_loss", lambda out, y, wt: seen.append((y, wt)) or real_loss(out, y, wt)
    )
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[:, -4:] = False  # padding rows of the target crop
    batch = {
        "source_image": torch.rand(b, 3, h, w),
        "source_label": torch.full((b, h, w), 7),
        "target_image": torch.rand(b, 3, h, w),
        "target_valid": valid,
    }
    module.training_step(batch, 0)
    probs = torch.softmax(logits, 1).max(1).values
    q = (probs >= 0.968).float().mean()
    assert abs(q.item() - 12 / 32) < 1e-6  # one scalar per batch: the confident share
    (y_s, w_s), (y_m, w_m) = seen
    assert w_s is None and torch.equal(y_s, batch["source_label"])
    expected_labels = torch.where(mask, 7, 3)  # source label pasted on the pseudo-label
    assert torch.equal(y_m, expected_labels)
    expected_w = torch.where(mask, torch.ones(()), q * valid.float())  # w_M = w_T (1 - M) + M
    torch.testing.assert_close(w_m, expected_w)
