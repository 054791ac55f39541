"""ClassMix (DACS) and the strong photometric augmentation of the mixed image.

The mixed image x_M = (1 - M) * x_T + M * x_S pastes half of the classes present in each
source label onto the target image; the mixed label pastes the source label onto the
pseudo-label, and the mixed quality weight is w_M = w_T * (1 - M) + 1 * M.

Everything here runs as batched tensor ops on the images' device without a host sync: the
random choices are drawn on the CPU generator (torch's global RNG unless one is given, so an
exact resume reproduces them) and copied to the device once, never read back. Under DDP they
are drawn for the union batch and each rank keeps its images' rows (``rank_rand``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mpcl.distributed import host_to_device, rank_rand

# torchvision's ITU-R 601-2 luma weights (rgb_to_grayscale), as its ColorJitter uses them.
_LUMA = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's operations, in its numbering


def class_mix_mask(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per image, pick half ((n + n % 2) / 2) of the n classes present and mask their pixels.

    Unlike the published code (classes drawn over the whole batch, ignore label included),
    classes are drawn per image and the ignore label is never picked. The choice is a uniform
    random subset: every class gets a CPU-drawn random key, absent classes sort last, and the
    classes whose key ranks among the first ceil(n / 2) are pasted.

    Args:
        labels: (B, H, W) int64 source labels in [0, num_classes); anything else (255 = ignore)
            is never pasted.
        generator: the CPU generator of the random keys (default: torch's global one).

    Returns:
        (B, H, W) bool mask M, True where the source pixel is pasted.
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    # Ignored (and out-of-range) pixels go to an extra bin C that is never picked.
    bins = torch.where((flat >= 0) & (flat < num_classes), flat, num_classes)
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
    present = present.scatter_(1, bins, True)[:, :num_classes]  # (B, C) class histogram > 0
    keys = host_to_device(rank_rand(b, num_classes, generator=generator), labels.device)
    keys = keys.masked_fill(~present, 2.0)  # absent classes rank after all present ones
    rank = keys.argsort(dim=1).argsort(dim=1)  # (B, C) position in a random order
    half = (present.sum(dim=1, keepdim=True) + 1) // 2  # ceil(n / 2)
    chosen = present & (rank < half)
    chosen = torch.cat([chosen, chosen.new_zeros(b, 1)], dim=1)  # the ignore bin: never
    return chosen.gather(1, bins).view_as(labels)


def mix(mask: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """M * source + (1 - M) * target. mask: (B, H, W) bool; source/target: (B, ..., H, W)."""
    m = mask.view(mask.shape[0], *([1] * (source.ndim - 3)), *mask.shape[1:])
    return torch.where(m, source, target)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images in [0, 1] (torchvision's adjust_hue, per image).

    Args:
        images: (B, 3, H, W) float in [0, 1].
        shift: (B,) hue shift in [-0.5, 0.5] (fraction of the colour circle).

    Returns:
        (B, 3, H, W): RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB.
    """
    r, g, b = images.unbind(1)
    v, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = v - minc
    grey = delta == 0  # no hue: h = s = 0 (denominators replaced by 1 to avoid NaN)
    s = delta / torch.where(grey, 1.0, v)
    d = torch.where(grey, 1.0, delta)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h * (1.0 / 6.0) + 1.0).fmod(1.0)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    # HSV -> RGB: channel n (R = 5, G = 3, B = 1) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * h).remainder(6.0)
        channels.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's gaussian_blur with one sigma per image, as two separable 1-D passes.

    Args:
        images: (B, C, H, W) float.
        kernel_size: odd kernel side (the same for every image).
        sigma: (B,) standard deviation in pixels.

    Returns:
        (B, C, H, W), reflect-padded like torchvision (the 2-D Gaussian kernel is the outer
        product of two 1-D ones, so two passes equal its 2-D convolution).
    """
    b, c, h, w = images.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, device=images.device, dtype=images.dtype)
    kernel = torch.softmax(-((x / sigma.view(-1, 1)) ** 2), dim=1)  # (B, k)
    kernel = kernel.repeat_interleave(c, dim=0)  # (B * C, k): one group per image channel
    pad = kernel_size // 2
    out = F.pad(images.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    out = F.conv2d(out, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return out.view(b, c, h, w)


class StrongAugment:
    """DACS's strong augmentation of the mixed image, drawn per image, applied batched.

    Per image: with probability ``color_jitter_p`` torchvision's ColorJitter (brightness,
    contrast, saturation factors ~ U(1 - s, 1 + s), hue shift ~ U(-s, s), s = 0.2, applied
    in a uniformly random order), then with probability ``blur_p`` a Gaussian blur, sigma ~
    U(0.15, 1.15), an odd kernel of about 10% of the image side; finally a clamp to [0, 1].
    This is the distribution of ``v2.RandomApply([v2.ColorJitter(...)])`` + ``v2.GaussianBlur``
    applied image by image, computed for the whole batch at once.
    """

    def __init__(
        self,
        color_jitter: float = 0.2,
        color_jitter_p: float = 0.8,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.15, 1.15),
    ) -> None:
        if not 0.0 <= color_jitter <= 0.5:
            raise ValueError(f"color_jitter={color_jitter} must be in [0, 0.5] (hue range)")
        self.color_jitter = color_jitter
        self.color_jitter_p = color_jitter_p
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image random parameters, on the CPU.

        Returns:
            jitter (B,) bool; order (B, 4) a permutation of (BRIGHTNESS, CONTRAST, SATURATION,
            HUE); factors (B, 4) brightness/contrast/saturation factors and the hue shift;
            blur (B,) bool; sigma (B,).
        """
        s = self.color_jitter
        u = rank_rand(batch_size, 11, generator=generator)
        low = torch.tensor([1.0 - s, 1.0 - s, 1.0 - s, -s], device="cpu")
        return {
            "jitter": u[:, 0] < self.color_jitter_p,
            "order": u[:, 1:5].argsort(dim=1),  # a uniformly random permutation
            "factors": low + 2.0 * s * u[:, 5:9],
            "blur": u[:, 9] < self.blur_p,
            "sigma": self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * u[:, 10],
        }

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> augmented (B, 3, H, W) in [0, 1]; the parameters are
        drawn from ``generator`` (CPU; default: torch's global one)."""
        return self.apply(images, self.sample(images.shape[0], generator))

    @torch.no_grad()
    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment ``images`` (B, 3, H, W) in [0, 1] with ``params`` from ``sample``."""
        b, device = images.shape[0], images.device
        jitter, blur, factors = params["jitter"], params["blur"], params["factors"]
        op = params["order"].masked_fill(~jitter[:, None], -1)  # (B, 4) op per step, -1 = none
        # Per image and step: the blend factor (1 = unchanged) and its reference: brightness
        # blends with 0, contrast with the mean grey, saturation with the grey pixel.
        f = torch.where((op >= 0) & (op != HUE), factors.gather(1, op.clamp(min=0)), 1.0)
        table = torch.cat(
            [f, (op == CONTRAST).float(), (op == SATURATION).float(), (op == HUE).float(),
             factors[:, HUE:], blur[:, None].float(), params["sigma"][:, None]],
            dim=1,
        )  # fmt: skip
        table = host_to_device(table, device)  # (B, 19): one copy of all the parameters
        f, is_contrast, is_saturation, is_hue = table[:, :16].view(b, 4, 4, 1, 1, 1).unbind(1)
        hue_shift, blur_on, sigma = table[:, 16], table[:, 17].view(b, 1, 1, 1) > 0, table[:, 18]
        # The branches read CPU random numbers only (tolist): no device sync.
        hue_at_step = (op == HUE).any(dim=0).tolist()

        out = images
        # Photometric maths in full precision, also under bf16 autocast (the blur's conv).
        no_autocast = (
            torch.autocast(device.type, enabled=False)
            if device.type in ("cpu", "cuda")
            else nullcontext()
        )
        with no_autocast:
            if any(jitter.tolist()):
                for t in range(4):  # torchvision's ColorJitter: one op per step, clamped
                    grey = _grayscale(out)
                    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
                    ref = is_contrast[:, t] * mean + is_saturation[:, t] * grey
                    out = (f[:, t] * out + (1.0 - f[:, t]) * ref).clamp(0.0, 1.0)
                    if hue_at_step[t]:
                        out = torch.where(is_hue[:, t] > 0, shift_hue(out, hue_shift), out)
            if any(blur.tolist()):
                side = max(images.shape[-2:])
                kernel = int(round(0.1 * side)) // 2 * 2 + 1  # odd, about 10% of the side
                blurred = gaussian_blur(out, kernel, sigma)
                out = torch.where(blur_on, blurred, out)
        return out.clamp(0.0, 1.0)
