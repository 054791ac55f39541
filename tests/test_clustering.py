"""mpcl.prototypes.clustering: Sinkhorn-Knopp (Eqs. 13-14) and K-Means, against references."""

import itertools

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mpcl.prototypes import kmeans, sinkhorn


def plain_sinkhorn(similarity: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """Textbook plain-domain Sinkhorn-Knopp: columns to L/K, then rows to 1."""
    num_rows, K = similarity.shape
    q = torch.exp(similarity / epsilon)
    for _ in range(n_iters):
        q = q * (num_rows / K) / q.sum(0, keepdim=True)
        q = q / q.sum(1, keepdim=True)
    return q


def test_matches_plain_domain_at_few_and_many_iterations():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    for n_iters in (3, 1000):
        expected = plain_sinkhorn(sim, 0.5, n_iters)
        torch.testing.assert_close(sinkhorn(sim, 0.5, n_iters), expected, rtol=1e-9, atol=1e-12)


def test_marginals_and_non_negativity():
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    q = sinkhorn(sim, 0.3, 500)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(30, dtype=torch.float64))
    torch.testing.assert_close(q.sum(0), torch.full((5,), 30 / 5, dtype=torch.float64))


def test_small_epsilon_gives_exact_optimal_transport():
    # Exact equipartitioned assignment by enumeration: 6 pixels, 3 prototypes, 2 each.
    gen = torch.Generator().manual_seed(2)
    sim = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    best, best_score = None, -float("inf")
    for labels in itertools.product(range(3), repeat=6):
        if sorted(labels) != [0, 0, 1, 1, 2, 2]:
            continue
        score = sum(float(sim[i, k]) for i, k in enumerate(labels))
        if score > best_score:
            best, best_score = labels, score
    q = sinkhorn(sim, 0.01, 2000)
    assert tuple(q.argmax(1).tolist()) == best
    assert float((q * sim).sum()) > best_score - 0.1  # transport value near the optimum


def test_planted_clusters_with_paper_settings():
    gen = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(5, 32, generator=gen), dim=1)
    truth = torch.arange(5).repeat_interleave(20)
    x = torch.nn.functional.normalize(centres[truth] + 0.05 * torch.randn(100, 32, generator=gen))
    sim = -(torch.cdist(x, centres) ** 2)
    q = sinkhorn(sim, epsilon=0.05, n_iters=3)
    assert torch.equal(q.argmax(1), truth)


def test_large_similarity_magnitudes_stay_finite():
    sim = torch.tensor([[-400.0, -800.0, -1200.0], [-1300.0, -390.0, -800.0]])
    q = sinkhorn(sim, 0.05, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def test_groups_equal_independent_problems():
    gen = torch.Generator().manual_seed(4)
    sim = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    groups = torch.randint(0, 4, (50,), generator=gen)
    groups[:4] = torch.arange(4)
    q = sinkhorn(sim, 0.2, 5, groups=groups, num_groups=6)
    for g in range(4):
        sel = groups == g
        torch.testing.assert_close(q[sel], sinkhorn(sim[sel], 0.2, 5))


def test_empty_input_and_bad_epsilon():
    assert sinkhorn(torch.zeros(0, 3), 0.05, 3, groups=torch.zeros(0, dtype=torch.long)).shape == (
        0,
        3,
    )
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(4, 3), 0.0, 3)


def test_kmeans_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(5)
    centres = 3 * torch.randn(5, 16, generator=gen)
    truth = torch.arange(5).repeat_interleave(40)
    x = centres[truth] + 0.2 * torch.randn(200, 16, generator=gen)
    found, assign = kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert adjusted_rand_score(truth.numpy(), assign.numpy()) == 1.0
    # Each found centre is the mean of its cluster.
    for k in range(5):
        torch.testing.assert_close(found[k], x[assign == k].mean(0))
    with pytest.raises(ValueError, match="at least"):
        kmeans(x[:3], 5)
