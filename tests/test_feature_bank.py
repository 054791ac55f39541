"""FeatureBank.add against a direct per-class description of the ring buffer."""

import pytest
import torch

from mpcl.prototypes.feature_bank import FeatureBank


def _rows_of(x: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r.tolist()) for r in x}


def _check_add(bank: FeatureBank, features, labels, mask) -> None:
    """One add: every class c writes min(n_c, m) distinct features of its own masked-in
    pixels at rows pointer_c, pointer_c + 1, ... (mod S); nothing else changes."""
    before = bank.features.clone()
    pointer, count = bank.pointer.clone(), bank.count.clone()
    bank.add(features, labels, mask)
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask
    for c in range(bank.num_classes):
        own = _rows_of(features[keep & (labels == c)])
        taken = min(len(own), bank.max_per_step)
        rows = [(int(pointer[c]) + j) % bank.slots for j in range(taken)]
        written = bank.features[c, rows]
        assert len(_rows_of(written)) == taken and _rows_of(written) <= own
        untouched = [r for r in range(bank.slots) if r not in rows]
        assert torch.equal(bank.features[c, untouched], before[c, untouched])
        assert int(bank.pointer[c]) == (int(pointer[c]) + taken) % bank.slots
        assert int(bank.count[c]) == min(int(count[c]) + taken, bank.slots)


@pytest.mark.parametrize("masked", [False, True])
def test_add_fills_each_class_ring_as_described(masked):
    gen = torch.Generator().manual_seed(0)
    bank = FeatureBank(num_classes=4, dim=3, size=4 * 10, max_per_step=4)
    for step in range(8):  # 8 x 4 > 10 slots: the rings wrap
        n = int(torch.randint(0, 30, (), generator=gen))
        features = torch.randn(n, 3, generator=gen)  # distinct rows (continuous values)
        labels = torch.randint(0, 4, (n,), generator=gen)
        labels[labels == 3] = 2 if step % 2 else 3  # class 3 is absent in odd steps
        mask = torch.rand(n, generator=gen) < 0.6 if masked else None
        if masked:  # outside the mask, labels may be anything (e.g. the ignore index)
            labels = torch.where(mask, labels, torch.full_like(labels, 255))
        _check_add(bank, features, labels, mask)
    assert (bank.count == 10).sum() >= 2


def test_add_chooses_pixels_uniformly():
    torch.manual_seed(0)
    bank = FeatureBank(num_classes=2, dim=1, size=2 * 50, max_per_step=3)
    features = torch.arange(10.0)[:, None]
    labels = torch.zeros(10, dtype=torch.long)
    chosen = torch.zeros(10)
    calls = 2000
    for _ in range(calls):
        bank.pointer.zero_()
        bank.add(features, labels)
        chosen[bank.features[0, :3, 0].long()] += 1
    # Each pixel is one of the 3 of 10 with probability 0.3: 600 +- 20.5 (binomial std).
    assert torch.all((chosen - 600).abs() < 5 * 20.5), chosen


def test_add_of_no_pixels_changes_nothing():
    bank = FeatureBank(num_classes=3, dim=2, size=30)
    bank.add(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    bank.add(torch.ones(5, 2), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool))
    assert bank.count.sum() == 0 and bank.pointer.sum() == 0 and bank.features.abs().sum() == 0
