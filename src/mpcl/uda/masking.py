"""MIC's masked image consistency: blank random blocks of the target image."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mpcl.distributed import host_to_device, rank_rand
from mpcl.models.segmentor import IMAGENET_MEAN


def block_mask(
    images: torch.Tensor, block_size: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A keep-mask of blocks: each block is blanked with probability ``ratio``.

    Args:
        images: (B, C, H, W) images (only the shape and device are used).

    Returns:
        (B, 1, H, W) float mask, 1 = keep, 0 = blanked; blocks of ``block_size`` pixels.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"uda.mic.mask_ratio={ratio} must be in [0, 1)")
    b, _, h, w = images.shape
    keep = rank_rand(b, 1, -(-h // block_size), -(-w // block_size), generator=generator) > ratio
    keep = host_to_device(keep.float(), images.device)
    keep = F.interpolate(keep, scale_factor=block_size, mode="nearest")
    return keep[..., :h, :w]


class MaskedConsistency(nn.Module):
    """MIC: the student must segment a block-masked target like the teacher saw it unmasked.

    As MIC: the target image is strongly augmented first (if ``augment``), then blocks are
    blanked to the ImageNet mean (0 once normalised). The UDA step trains the student on the
    masked image with the unmasked image's pseudo-labels and quality weights, times ``weight``.

    Args:
        block_size: mask block side in pixels (MIC: 64).
        mask_ratio: probability that a block is blanked (MIC: 0.7).
        weight: loss weight lambda_m (MIC: 1).
        augment: colour jitter + blur before masking.
    """

    def __init__(
        self,
        block_size: int = 64,
        mask_ratio: float = 0.7,
        weight: float = 1.0,
        augment: bool = True,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"uda.mic.block_size={block_size} must be >= 1 pixel")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"uda.mic.mask_ratio={mask_ratio} must be in [0, 1)")
        self.block_size = block_size
        self.mask_ratio = mask_ratio
        self.weight = weight
        self.augment = augment
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(
        self,
        images: torch.Tensor,
        strong_augment: Callable[..., torch.Tensor] | None = None,
        augment_generator: torch.Generator | None = None,
        mask_generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1] -> masked images (B, 3, H, W) and the keep-mask
        (B, 1, H, W), 1 = kept. The augmentation and the mask draw from their own CPU
        generators (the run's ``mic_augment`` / ``mic_mask`` streams; default: the global one)."""
        x = images
        if self.augment and strong_augment is not None:
            x = strong_augment(x, augment_generator)
        keep = block_mask(images, self.block_size, self.mask_ratio, mask_generator)
        return keep * x + (1 - keep) * self.mean, keep

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, mask_ratio={self.mask_ratio}, "
            f"weight={self.weight}, augment={self.augment}"
        )
