"""mpcl.prototypes.diagnostics: the logged numbers against direct per-pixel loops."""

import math

import pytest
import torch

from mpcl.prototypes import CentroidPrototypes, PrototypeLearning
from mpcl.prototypes.diagnostics import step_diagnostics

C, K, N = 3, 2, 40


def _step(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sim = torch.randn(N, C, K, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (N,), generator=gen)
    active = torch.rand(N, generator=gen) < 0.7
    assignment = torch.softmax(torch.randn(N, K, generator=gen, dtype=torch.float64), 1)
    positive = labels * K + assignment.argmax(1)
    return sim, labels, active, assignment, positive


@pytest.mark.parametrize("with_refined", [False, True])
def test_diagnostics_match_loops(with_refined):
    sim, labels, active, assignment, positive = _step()
    initialized = torch.tensor([True, True, False])
    refined = torch.tensor([True, False, False]) if with_refined else None
    gen = torch.Generator().manual_seed(3)
    mean, start = torch.randn(2, C, K, 5, generator=gen, dtype=torch.float64)
    out = step_diagnostics(
        sim, labels, active, assignment, positive, initialized, refined, mean, start
    )

    rows = [i for i in range(N) if active[i]]
    entropy = sum(
        -sum(float(q) * math.log(max(float(q), 1e-12)) for q in assignment[i]) for i in rows
    )
    used = {int(positive[i]) for i in rows}
    present = {int(labels[i]) for i in rows}
    usage = sum(sum((c * K + k) in used for k in range(K)) / K for c in present) / len(present)
    correct = 0
    for i in rows:
        scores = [max(float(s) for s in sim[i, c]) for c in range(C)]
        best = max((c for c in range(C) if initialized[c]), key=lambda c: scores[c])
        correct += best == int(labels[i])
    shares = []
    for c in present:
        counts = [sum(int(positive[i]) == c * K + k for i in rows) for k in range(K)]
        shares.append(min(counts) / (sum(counts) / K))
    drift = [
        sum(math.dist(mean[c, k].tolist(), start[c, k].tolist()) for k in range(K)) / K
        for c in range(C)
        if initialized[c]
    ]
    expected = {
        "num_initialized": 2.0,
        "num_pixels": float(len(rows)),
        "assignment_entropy": entropy / len(rows) / math.log(K),
        "prototype_usage": usage,
        "proto_accuracy": correct / len(rows),
        "assignment_balance": sum(shares) / len(shares),
    }
    if with_refined:
        expected["num_refined"] = 1.0
    expected["drift"] = sum(drift) / len(drift)
    assert list(out) == list(expected)
    for key, value in expected.items():
        assert out[key].dim() == 0 and not out[key].requires_grad
        assert math.isclose(float(out[key]), value, rel_tol=1e-6), key  # float32 counts


def test_no_active_pixel_gives_zeros():
    sim, labels, _, assignment, positive = _step(1)
    none = torch.zeros(N, dtype=torch.bool)
    out = step_diagnostics(sim, labels, none, assignment, positive, torch.ones(C, dtype=bool))
    assert float(out["num_pixels"]) == 0 and float(out["num_initialized"]) == C
    for key in ("assignment_entropy", "prototype_usage", "proto_accuracy", "assignment_balance"):
        assert float(out[key]) == 0.0, key


@pytest.mark.parametrize("early_start", [False, True])
def test_the_step_logs_the_diagnostics(early_start):
    torch.manual_seed(0)
    module = PrototypeLearning(
        CentroidPrototypes,
        K=K,
        dim=8,
        num_classes=C,
        feature_bank_size=C * 40,
        bank_max_per_step=10,
        early_start=early_start,
    ).train()
    features = torch.randn(2, 8, 8, 8)
    labels = torch.randint(0, C, (2, 8, 8))
    out = module(features, labels)
    names = ["loss", "loss_contrast", "loss_consistency", "num_initialized", "num_pixels"]
    names += ["assignment_entropy", "prototype_usage", "proto_accuracy", "assignment_balance"]
    assert list(out) == names + (["num_refined"] if early_start else []) + ["drift"]
