"""mpcl.prototypes.losses: contrastive (Eq. 17) and consistency (Eqs. 11-12) vs Python loops."""

import math

import pytest
import torch

from mpcl.prototypes import class_scores, consistency_loss, contrastive_loss

C, K, N = 3, 2, 6


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(N, C, K, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=gen)
    positive = labels * K + torch.randint(0, K, (N,), generator=gen)
    weights = torch.rand(N, generator=gen, dtype=torch.float64)
    return sim, labels, positive, weights


@pytest.mark.parametrize("in_class", [True, False])
@pytest.mark.parametrize("mask_class", [None, 2])
def test_contrastive_matches_loop(in_class, mask_class):
    sim, labels, positive, weights = _data()
    tau = 0.1
    if mask_class is not None:  # uninitialised class: no positive, not a negative
        keep = labels != mask_class
        sim, labels, positive, weights = sim[keep], labels[keep], positive[keep], weights[keep]
    valid_classes = torch.ones(C, dtype=torch.bool)
    if mask_class is not None:
        valid_classes[mask_class] = False
    valid = valid_classes.repeat_interleave(K)
    total = 0.0
    for i in range(len(labels)):
        pos = int(positive[i])
        pos_term = math.exp(float(sim[i].flatten()[pos]) / tau)
        denom = 0.0
        for c in range(C):
            for k in range(K):
                p = c * K + k
                if p == pos:
                    denom += pos_term
                elif valid[p] and (in_class or c != int(labels[i])):
                    denom += math.exp(float(sim[i, c, k]) / tau)
        total += -float(weights[i]) * math.log(pos_term / denom)
    expected = total / len(labels)
    got = contrastive_loss(sim, positive, weights, tau, valid_classes, in_class_negatives=in_class)
    assert math.isclose(float(got), expected, rel_tol=1e-10)


def test_without_in_class_negatives_is_smaller():
    sim, _, positive, weights = _data(1)
    with_in = contrastive_loss(sim, positive, weights, 0.1, in_class_negatives=True)
    without = contrastive_loss(sim, positive, weights, 0.1, in_class_negatives=False)
    assert without < with_in


def test_consistency_matches_loop():
    sim, labels, positive, weights = _data(2)
    tau = 0.1
    valid = torch.tensor([True, True, False])
    keep = labels != 2
    sim, labels, positive, weights = sim[keep], labels[keep], positive[keep], weights[keep]
    total = 0.0
    for i in range(len(labels)):
        g = [max(float(sim[i, c, k]) for k in range(K)) for c in range(C)]  # Eq. 11
        denom = sum(math.exp(g[c] / tau) for c in range(C) if valid[c])
        total += -float(weights[i]) * math.log(math.exp(g[int(labels[i])] / tau) / denom)
    got = consistency_loss(sim, positive, weights, tau, valid)
    assert math.isclose(float(got), total / len(labels), rel_tol=1e-10)
    torch.testing.assert_close(class_scores(sim), sim.max(2).values)


def test_empty_inputs_give_zero_with_grad():
    sim = torch.zeros(0, C, K, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.long)
    loss = contrastive_loss(sim, idx, torch.zeros(0), 0.1) + consistency_loss(
        sim, idx, torch.zeros(0), 0.1
    )
    loss.backward()
    assert float(loss) == 0.0
