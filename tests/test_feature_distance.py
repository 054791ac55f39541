"""DAFormer's ImageNet Feature Distance against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpcl.data.labels import IGNORE_INDEX, THING_CLASSES
from mpcl.uda.feature_distance import downscale_label_by_ratio, feature_distance_loss


def test_downscale_label_by_ratio_against_loop():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 3, (2, 8, 8)))
    labels[0, :4, :4] = 1  # a pure cell
    labels[1, 4:, 4:] = IGNORE_INDEX
    out = downscale_label_by_ratio(labels, (2, 2), min_ratio=0.75)
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
    loss = feature_distance_loss(f, g, labels)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert f.grad is not None
    assert feature_distance_loss(f, g, torch.zeros(1, 4, 4, dtype=torch.long)).item() == 0.0
    assert not math.isnan(loss.item())


def _feature_distance_indexing(f, g, labels, classes=THING_CLASSES, min_ratio=0.75):
    """The previous implementation: boolean indexing (a host sync on a GPU)."""
    dist = torch.norm(f - g.detach(), dim=1)
    cells = downscale_label_by_ratio(labels, f.shape[-2:], min_ratio)
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
        ours = feature_distance_loss(f, g, labels)
        (grad,) = torch.autograd.grad(ours, f)
        ref = _feature_distance_indexing(f, g, labels)
        (ref_grad,) = torch.autograd.grad(ref, f)
        assert ref.item() > 0
        torch.testing.assert_close(ours, ref)
        torch.testing.assert_close(grad, ref_grad)


def test_downscale_label_by_ratio_ignores_out_of_range_labels():
    labels = torch.full((1, 4, 4), 19)  # not a class of the 19-class space
    labels[0, :, :2] = 0
    out = downscale_label_by_ratio(labels, (1, 2), min_ratio=0.75)
    assert out.tolist() == [[[0, IGNORE_INDEX]]]
