"""DAFormer's ImageNet Feature Distance against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpcl.data.labels import IGNORE_INDEX, NUM_CLASSES, THING_CLASSES
from mpcl.uda.feature_distance import (
    FeatureDistance,
    downscale_label_by_ratio,
    feature_distance_loss,
)


def test_downscale_label_by_ratio_against_loop():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, (2, 8, 8)))
    labels[0, :4, :4] = 1  # a pure cell
    labels[1, 4:, 4:] = IGNORE_INDEX
    out = downscale_label_by_ratio(labels, (2, 2), min_ratio=0.75, num_classes=3)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                cell = labels[b, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].flatten().tolist()
                counts = {c: cell.count(c) for c in set(cell) if c != IGNORE_INDEX}
                best = max(counts, key=counts.get) if counts else None
                expected = best if best is not None and counts[best] / 16 >= 0.75 else 255
                assert out[b, i, j].item() == expected


def test_feature_distance_mean_l2_over_thing_cells():
    f = torch.zeros(1, 3, 2, 2, requires_grad=True)
    g = torch.zeros(1, 3, 2, 2)
    g[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # distance 5 in a "car" cell
    g[0, :, 1, 1] = 1.0  # a road cell: not counted
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 13  # car
    loss = feature_distance_loss(f, g, labels, THING_CLASSES, NUM_CLASSES)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert f.grad is not None
    zeros = torch.zeros(1, 4, 4, dtype=torch.long)
    assert feature_distance_loss(f, g, zeros, THING_CLASSES, NUM_CLASSES).item() == 0.0
    assert not math.isnan(loss.item())


def _feature_distance_indexing(f, g, labels, classes=THING_CLASSES, min_ratio=0.75):
    """The previous implementation: boolean indexing (a host sync on a GPU)."""
    dist = torch.norm(f - g.detach(), dim=1)
    cells = downscale_label_by_ratio(labels, f.shape[-2:], min_ratio, NUM_CLASSES)
    mask = torch.isin(cells, torch.tensor(list(classes)))
    return dist[mask].mean() if mask.any() else dist.sum() * 0.0


def test_feature_distance_masked_mean_equals_boolean_indexing_with_gradients():
    torch.manual_seed(0)
    labels = torch.randint(0, 19, (2, 4, 8)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels[0, :4, :4] = IGNORE_INDEX
    labels[1, 4:8, 8:12] = 2  # a stuff cell next to the things
    for seed in range(3):
        torch.manual_seed(seed)
        f = torch.randn(2, 5, 4, 8, requires_grad=True)
        g = torch.randn(2, 5, 4, 8)
        ours = feature_distance_loss(f, g, labels, THING_CLASSES, NUM_CLASSES)
        (grad,) = torch.autograd.grad(ours, f)
        ref = _feature_distance_indexing(f, g, labels)
        (ref_grad,) = torch.autograd.grad(ref, f)
        assert ref.item() > 0
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grad, ref_grad)


def test_downscale_label_by_ratio_ignores_out_of_range_labels():
    labels = torch.full((1, 4, 4), 19)  # not a class of the 19-class space
    labels[0, :, :2] = 0
    out = downscale_label_by_ratio(labels, (1, 2), min_ratio=0.75, num_classes=NUM_CLASSES)
    assert out.tolist() == [[[0, IGNORE_INDEX]]]


def test_feature_distance_of_a_custom_label_set_counts_its_own_thing_classes():
    # 5 classes, thing = {1, 3}: a cell of class 1 counts, a cell of class 2 does not.
    f = torch.zeros(1, 3, 2, 2)
    g = torch.zeros(1, 3, 2, 2)
    g[0, :, 0, 0] = torch.tensor([0.0, 3.0, 4.0])  # class 1 cell: distance 5
    g[0, :, 0, 1] = 7.0  # class 2 cell: not a thing
    labels = torch.full((1, 4, 4), 4)
    labels[0, :2, :2] = 1
    labels[0, :2, 2:] = 2
    assert feature_distance_loss(f, g, labels, (1, 3), 5).item() == pytest.approx(5.0)


def test_feature_distance_without_thing_classes_is_off_and_skips_the_encoder(caplog):
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the frozen encoder ran")

    fd = FeatureDistance(Boom(), num_classes=5, classes=())
    assert "no thing classes" in caplog.text
    features = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = fd(features, torch.zeros(1, 3, 8, 8), torch.zeros(1, 8, 8, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match=r"classes \[7\] are not class indices of the 5-class"):
        FeatureDistance(Boom(), num_classes=5, classes=(7,))
