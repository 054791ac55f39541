"""MIC's block mask."""

from __future__ import annotations

import pytest
import torch

from mpcl.uda.masking import block_mask


def test_block_mask_ratio_and_blocks():
    gen = torch.Generator().manual_seed(0)
    keep = block_mask(torch.zeros(4, 3, 128, 96), block_size=16, ratio=0.7, generator=gen)
    assert keep.shape == (4, 1, 128, 96)
    assert abs(keep.mean().item() - 0.3) < 0.08
    # Constant inside each 16x16 block.
    blocks = keep.unfold(2, 16, 16).unfold(3, 16, 16)
    assert torch.all(blocks.amin((-1, -2)) == blocks.amax((-1, -2)))
    with pytest.raises(ValueError, match="mask_ratio"):
        block_mask(torch.zeros(1, 3, 8, 8), 4, 1.5)
