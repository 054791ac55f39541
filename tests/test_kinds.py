"""mpcl.prototypes.kinds: the prototypes' similarities (Eqs. 8-9) and EMA updates (Eqs. 20-21)."""

import math

import pytest
import torch
from torch.distributions import Independent, Normal

from mpcl.prototypes import CentroidPrototypes, GaussianPrototypes

KINDS = {"centroid": CentroidPrototypes, "gaussian": GaussianPrototypes}


def _random_gaussian_bank(num_classes=3, K=2, dim=8, seed=0) -> GaussianPrototypes:
    gen = torch.Generator().manual_seed(seed)
    bank = GaussianPrototypes(num_classes, K, dim, var_floor=1e-6).double()
    bank.mean.copy_(torch.randn(num_classes, K, dim, generator=gen))
    bank.var.copy_(0.1 + torch.rand(num_classes, K, dim, generator=gen))
    return bank


def test_gaussian_similarity_is_scaled_log_likelihood():
    bank = _random_gaussian_bank()
    x = torch.randn(7, 8, dtype=torch.float64)
    dist = Independent(Normal(bank.mean, bank.var.sqrt()), 1)  # batch (C, K), event D
    expected = dist.log_prob(x[:, None, None, :]) / 8  # documented scaling: divide by D
    torch.testing.assert_close(bank.similarity(x), expected, rtol=1e-10, atol=1e-10)


def test_centroid_similarity_is_negative_squared_distance():
    bank = CentroidPrototypes(3, 2, 8).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    expected = -((x[:, None, None, :] - bank.mean[None]) ** 2).sum(-1)
    torch.testing.assert_close(bank.similarity(x), expected)


def test_gaussian_logits_finite_at_d256():
    bank = GaussianPrototypes(19, 5, 256)
    bank.var.fill_(1e-12)  # collapsed clusters: the floor must take over
    x = torch.nn.functional.normalize(torch.randn(64, 256), dim=1)
    logits = bank.similarity(x) / 0.1
    assert torch.isfinite(logits).all()
    assert torch.isfinite(torch.log_softmax(logits.flatten(1), 1)).all()


@pytest.mark.parametrize("kind", ["centroid", "gaussian"])
def test_ema_update_by_hand_and_skips_empty(kind):
    bank = KINDS[kind](2, 2, 3).double()
    bank.initialized[0] = True  # class 1 stays uninitialised: never updated
    old_mean = bank.mean.clone()
    old_var = bank.var.clone() if kind == "gaussian" else None
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64)  # -> proto (0, 0)
    counts = torch.zeros(2, 2, dtype=torch.float64)
    sums = torch.zeros(2, 2, 3, dtype=torch.float64)
    sq = torch.zeros(2, 2, 3, dtype=torch.float64)
    counts[0, 0], sums[0, 0], sq[0, 0] = 2, a.sum(0), (a * a).sum(0)
    counts[1, 1], sums[1, 1], sq[1, 1] = 1, a[0], a[0] ** 2  # uninitialised class
    updated = bank.update(counts, sums, sq, momentum=0.9)

    assert updated.tolist() == [[True, False], [False, False]]
    expected_mean = old_mean.clone()
    expected_mean[0, 0] = 0.9 * old_mean[0, 0] + 0.1 * torch.tensor([2.0, 2.0, 2.0])
    torch.testing.assert_close(bank.mean, expected_mean.to(bank.mean))
    if kind == "gaussian":
        expected_var = old_var.clone()
        expected_var[0, 0] = 0.9 * old_var[0, 0] + 0.1 * torch.tensor([1.0, 0.0, 1.0])
        torch.testing.assert_close(bank.var, expected_var.to(bank.var))


def test_initialize_sets_flags_and_floor():
    bank = GaussianPrototypes(3, 2, 4, var_floor=1e-3)
    bank.initialize(1, torch.ones(2, 4), torch.zeros(2, 4))
    assert bank.initialized.tolist() == [False, True, False]
    assert torch.equal(bank.mean[1], torch.ones(2, 4))
    assert (bank.var[1] == 1e-3).all()


def test_bad_config_messages():
    with pytest.raises(ValueError, match="prototype.K=0 must be >= 1"):
        CentroidPrototypes(19, 0, 256)
    with pytest.raises(ValueError, match=r"prototype.K=2.5 must be >= 1 .*an integer"):
        GaussianPrototypes(19, 2.5, 256)
    with pytest.raises(ValueError, match="var_floor"):
        GaussianPrototypes(19, 5, 256, var_floor=0.0)
    with pytest.raises(ValueError, match=r"\(N, 256\)"):
        CentroidPrototypes(19, 5, 256).similarity(torch.zeros(3, 128))
    assert math.isclose(GaussianPrototypes(2, 1, 4).var[0, 0, 0].item(), 0.25)


@pytest.mark.parametrize("kind", ["centroid", "gaussian"])
def test_similarity_ignores_autocast(kind):
    bank = KINDS[kind](3, 2, 64)
    x = torch.nn.functional.normalize(torch.randn(10, 64), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = bank.similarity(x.bfloat16())
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, bank.similarity(x.bfloat16().float()))
