"""ClassMix (DACS) and the strong photometric augmentation of the mixed image.

The mixed image x_M = (1 - M) * x_T + M * x_S pastes half of the classes present in each
source label onto the target image; the mixed label pastes the source label onto the
pseudo-label, and the mixed quality weight is w_M = w_T * (1 - M) + 1 * M.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from mpcl.data.labels import IGNORE_INDEX


def class_mix_mask(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, pick half ((n + n % 2) / 2) of the classes present and mask their pixels.

    Unlike the published code (classes drawn over the whole batch, ignore label included),
    classes are drawn per image and the ignore label is never picked.

    Args:
        labels: (B, H, W) int64 source labels, 255 = ignore.

    Returns:
        (B, H, W) bool mask M, True where the source pixel is pasted.
    """
    masks = []
    for label in labels:
        classes = torch.unique(label)
        classes = classes[classes != IGNORE_INDEX]
        n = classes.numel()
        order = torch.randperm(n, generator=generator, device="cpu").to(classes.device)
        chosen = classes[order[: (n + n % 2) // 2]]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """M * source + (1 - M) * target. mask: (B, H, W) bool; source/target: (B, ..., H, W)."""
    m = mask.view(mask.shape[0], *([1] * (source.ndim - 3)), *mask.shape[1:])
    return torch.where(m, source, target)


class StrongAugment:
    """DACS's strong augmentation of the mixed image, per image.

    Colour jitter (brightness = contrast = saturation = hue = 0.2) with probability 0.8 and
    Gaussian blur with probability 0.5, sigma ~ U(0.15, 1.15), an odd kernel of about 10% of
    the image side. Input and output are (B, 3, H, W) float in [0, 1].
    """

    def __init__(
        self,
        color_jitter: float = 0.2,
        color_jitter_p: float = 0.8,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.15, 1.15),
    ) -> None:
        self.jitter = v2.RandomApply([v2.ColorJitter(*(color_jitter,) * 4)], p=color_jitter_p)
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        side = max(images.shape[-2:])
        kernel = int(round(0.1 * side)) // 2 * 2 + 1  # odd, about 10% of the side
        blur = v2.GaussianBlur(kernel_size=kernel, sigma=self.blur_sigma)
        for img in images:
            img = self.jitter(img)
            if torch.rand(()) < self.blur_p:
                img = blur(img)
            out.append(img.clamp(0.0, 1.0))
        return torch.stack(out)
