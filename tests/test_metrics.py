"""Per-class IoU and mIoU against a direct confusion-matrix computation."""

from __future__ import annotations

import math

import numpy as np
import torch

from mpcl.metrics import iou_table, miou, segmentation_iou


def _direct_iou(pred: np.ndarray, target: np.ndarray, c: int) -> np.ndarray:
    valid = target != 255
    cm = np.zeros((c, c), dtype=np.int64)
    for t, p in zip(target[valid], pred[valid], strict=True):
        cm[t, p] += 1
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def test_iou_matches_confusion_matrix_over_batches():
    rng = np.random.default_rng(0)
    metric = segmentation_iou(num_classes=6)
    preds, targets = [], []
    for _ in range(3):
        p = rng.integers(0, 5, (2, 16, 16))  # class 5 never predicted
        t = rng.integers(0, 4, (2, 16, 16))  # classes 4, 5 never in target
        t[:, :3] = 255
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
        preds.append(p)
        targets.append(t)
    got = metric.compute().numpy()
    expected = _direct_iou(np.concatenate(preds).ravel(), np.concatenate(targets).ravel(), 6)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[4] == 0.0  # only predicted: counts as 0
    assert math.isnan(got[5])  # absent from both: NaN, left out of the mean
    assert (
        miou(torch.from_numpy(got)) == np.nanmean(expected).astype(np.float32).item()
        or abs(miou(torch.from_numpy(got)) - np.nanmean(expected)) < 1e-6
    )
    assert abs(miou(torch.from_numpy(got), classes=[0, 1]) - expected[:2].mean()) < 1e-6
    assert iou_table(torch.from_numpy(got), [str(i) for i in range(6)])[0][0] == "0"


def test_logits_input_is_argmaxed():
    metric = segmentation_iou(num_classes=3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 1.0
    metric.update(logits, torch.full((1, 2, 2), 2))
    assert metric.compute()[2].item() == 1.0


def test_class_separation_is_fishers_ratio_against_a_direct_computation():
    from mpcl.metrics import ClassSeparation

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (60,), generator=gen)
    labels[:5] = 255  # ignored
    features[labels == 1] += 3.0  # class 1 apart
    metric = ClassSeparation(num_classes=4, dim=4)
    metric.update(features[:30].float(), labels[:30])  # two batches
    metric.update(features[30:].float(), labels[30:])
    keep = labels != 255
    x, y = features[keep].float().double(), labels[keep]
    overall = x.mean(0)
    within = sum(((x[y == c] - x[y == c].mean(0)) ** 2).sum() for c in y.unique())
    between = sum((y == c).sum() * ((x[y == c].mean(0) - overall) ** 2).sum() for c in y.unique())
    assert math.isclose(float(metric.compute()), float(between / within), rel_tol=1e-9)
    apart = float(metric.compute())
    metric.reset()
    metric.update(torch.randn(60, 4, generator=gen), labels)  # no structure: a small ratio
    assert float(metric.compute()) < apart / 10
