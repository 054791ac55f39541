"""HRDA multi-resolution training and inference around a :class:`Segmentor`.

Training (one full-resolution crop, e.g. 1024x1024):

- context: the crop downscaled by ``lr_scale`` (0.5) -> LR logits, LR prototype
  features, encoder features, and the scale attention (a second head on the LR
  encoder features, sigmoid);
- detail: a random ``hr_crop_size`` window of the full-resolution crop (corners
  divisible by ``crop_divisible``) -> HR logits, HR prototype features;
- fusion (HRDA): the attention is zeroed outside the detail window on the LR grid,
  ``fused = up(a) * HR + up((1 - a) * LR)`` on the HR grid (HR inserted into zeros).

Inference: the HR branch runs as overlapping sliding windows over the image
(``hr_slide_window``/``hr_slide_stride``), fused with the LR context everywhere;
images larger than ``test_window`` are themselves processed window by window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpcl.models.segmentor import PrototypeView, Segmentor, weighted_cross_entropy

__all__ = [
    "Box",
    "HRDASegmentor",
    "crop_labels",
    "fuse_scales",
    "get_crop_box",
    "slide_inference",
    "slide_windows",
]

Box = tuple[
    int, int, int, int
]  # (y1, y2, x1, x2), end-exclusive, in pixels of the tensor it indexes


def get_crop_box(
    height: int,
    width: int,
    crop_size: Sequence[int],
    divisible: int = 1,
    generator: torch.Generator | None = None,
) -> Box:
    """A uniformly random ``crop_size`` window inside (height, width) whose top-left corner is a
    multiple of ``divisible``. Returns (y1, y2, x1, x2)."""
    ch, cw = crop_size
    if ch > height or cw > width:
        raise ValueError(f"crop {tuple(crop_size)} is larger than the image ({height}, {width})")
    # Number of admissible corners per axis, the last one included.
    ny = (height - ch) // divisible + 1
    nx = (width - cw) // divisible + 1
    y1 = int(torch.randint(ny, (), generator=generator)) * divisible
    x1 = int(torch.randint(nx, (), generator=generator)) * divisible
    return y1, y1 + ch, x1, x1 + cw


def crop_labels(labels: Tensor, box: Box) -> Tensor:
    """Crop the last two (spatial) dims of labels (B, H, W), (B, 1, H, W) or pixel weights to
    ``box`` = (y1, y2, x1, x2), e.g. for the HR loss on the detail crop."""
    y1, y2, x1, x2 = box
    return labels[..., y1:y2, x1:x2]


def slide_windows(
    height: int, width: int, window: Sequence[int], stride: Sequence[int]
) -> list[Box]:
    """mmseg's sliding-window grid: windows of size ``window`` every ``stride``, the last one
    shifted back to end at the border; a window larger than the image becomes the image."""
    wh, ww = window
    sh, sw = stride
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, height), min(c * sw + ww, width)
            boxes.append((max(y2 - wh, 0), y2, max(x2 - ww, 0), x2))
    return boxes


def slide_inference(
    images: Tensor, window: Sequence[int], stride: Sequence[int], fn: Callable[[Tensor], Tensor]
) -> Tensor:
    """Apply ``fn`` to overlapping windows of ``images`` and average the overlaps.

    images (B, 3, H, W); ``fn`` maps a batch of crops (N, 3, h, w) to (N, C, h/s, w/s) for an
    integer output stride s (1 for full-resolution logits, 4 for raw decode-head logits).
    All windows go through ``fn`` as one batch. Returns (B, C, H/s, W/s).
    """
    b, _, height, width = images.shape
    boxes = slide_windows(height, width, window, stride)
    crops = torch.cat([crop_labels(images, box) for box in boxes], dim=0)  # (n * B, 3, h, w)
    out = fn(crops)  # (n * B, C, h/s, w/s)
    ch, cw = crops.shape[-2:]
    s = ch // out.shape[-2]
    if (out.shape[-2] * s, out.shape[-1] * s) != (ch, cw) or height % s or width % s:
        raise ValueError(
            f"slide_inference needs an integer output stride: window {ch}x{cw} gave {tuple(out.shape[-2:])}, "
            f"image {height}x{width}"
        )
    if any(v % s for box in boxes for v in box):
        raise ValueError(
            f"window corners {boxes} are not multiples of the output stride {s}; use a stride divisible by it"
        )
    logits = out.new_zeros(b, out.shape[1], height // s, width // s)
    count = out.new_zeros(1, 1, height // s, width // s)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        logits[..., y1 // s : y2 // s, x1 // s : x2 // s] += out[i * b : (i + 1) * b]
        count[..., y1 // s : y2 // s, x1 // s : x2 // s] += 1
    return logits / count


def fuse_scales(
    lr_logits: Tensor,
    attention: Tensor,
    hr_logits: Tensor,
    out_size: Sequence[int],
    hr_box: Box | None = None,
) -> Tensor:
    """HRDA's scale fusion: ``up(a) * HR + up((1 - a) * LR)`` on the HR grid.

    lr_logits (B, C, h, w) and attention (B, C or 1, h, w) on the LR grid; hr_logits
    (B, C, H', W') on the HR grid of size ``out_size`` = (H', W'), or of the detail crop
    when ``hr_box`` (in HR-grid units) places it (zeros outside; the attention must be 0
    there). Returns (B, C, *out_size).
    """
    size = tuple(out_size)
    up_lr = F.interpolate(
        (1 - attention) * lr_logits, size=size, mode="bilinear", align_corners=False
    )
    up_att = F.interpolate(attention, size=size, mode="bilinear", align_corners=False)
    if hr_box is not None:
        y1, y2, x1, x2 = hr_box
        hr_logits = F.pad(hr_logits, (x1, size[1] - x2, y1, size[0] - y2))
    return up_att * hr_logits + up_lr


def _resize(images: Tensor, scale: float) -> Tensor:
    if scale == 1:
        return images
    size = (int(images.shape[-2] * scale), int(images.shape[-1] * scale))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _exact_ratio(big: int, small: int, what: str) -> int:
    ratio = big // small
    if ratio * small != big:
        raise ValueError(f"{what}: {big} is not an integer multiple of {small}")
    return ratio


class HRDASegmentor(nn.Module):
    """HRDA around a single-scale ``Segmentor`` (sizes in pixels of the full-resolution input).

    Args:
        encoder, decode_head, proto_head: the single-scale ``Segmentor`` shared by both
            scales (``self.segmentor``); ``proto_head`` None without prototypes.
        attention_head: head on the LR encoder features with one output channel per class
            (or 1); sigmoid gives the scale attention. HRDA uses DAFormer's head with a 1x1
            fusion, i.e. ``SegFormerHead(in_channels, 256, num_classes)``.
        hr_loss_weight: weight of the detail crop's own CE; the fused logits get 1 - it
            (HRDA: 0.1).
        scales: (HR scale, LR scale); HR must be 1.0, LR in (0, 1) (HRDA: 0.5).
        hr_crop_size: detail crop (HRDA: 512x512 of a 1024x1024 training crop).
        crop_divisible: detail-crop corners are multiples of this (HRDA: 8).
        hr_slide_window, hr_slide_stride: HR sliding windows at inference (512, 256).
        test_window, test_stride: outer windows over large test images (1024, 512).
    """

    resolutions = ("lr", "hr")

    def __init__(
        self,
        encoder: nn.Module,
        decode_head: nn.Module,
        attention_head: nn.Module,
        proto_head: nn.Module | None = None,
        hr_loss_weight: float = 0.1,
        scales: Sequence[float] = (1.0, 0.5),
        hr_crop_size: Sequence[int] = (512, 512),
        crop_divisible: int = 8,
        hr_slide_window: Sequence[int] = (512, 512),
        hr_slide_stride: Sequence[int] = (256, 256),
        test_window: Sequence[int] = (1024, 1024),
        test_stride: Sequence[int] = (512, 512),
    ):
        super().__init__()
        if len(scales) != 2 or max(scales) != 1.0 or not 0 < min(scales) < 1:
            raise ValueError(f"HRDA needs scales (1.0, lr) with 0 < lr < 1, got {tuple(scales)}")
        if not 0.0 <= hr_loss_weight <= 1.0:
            raise ValueError(f"model.hr_loss_weight={hr_loss_weight} must be in [0, 1]")
        self.segmentor = Segmentor(encoder, decode_head, proto_head)
        self.hr_loss_weight = hr_loss_weight
        self.attention_head = attention_head
        self.lr_scale = float(min(scales))
        self.hr_crop_size = tuple(hr_crop_size)
        self.crop_divisible = crop_divisible
        self.hr_slide_window = tuple(hr_slide_window)
        self.hr_slide_stride = tuple(hr_slide_stride)
        self.test_window = tuple(test_window)
        self.test_stride = tuple(test_stride)

    @property
    def encoder(self) -> nn.Module:
        return self.segmentor.encoder

    @property
    def prototype_dim(self) -> int | None:
        return self.segmentor.prototype_dim

    def scale_attention(self, encoder_features: list[Tensor]) -> Tensor:
        """LR encoder features -> attention (B, C, h, w) in (0, 1) on the LR logit grid."""
        return torch.sigmoid(self.attention_head(encoder_features))

    def forward(self, images: Tensor) -> dict[str, Any]:
        return self.forward_train(images)

    def forward_train(
        self,
        images: Tensor,
        with_features: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """images (B, 3, H, W) in [0, 1], a full-resolution training crop -> dict with

        - ``fused``: (B, C, H/4, W/4) fused logits (HR grid; s = decode-head stride, 4 for MiT);
        - ``hr_logits``: (B, C, h_c/4, w_c/4) logits of the detail crop;
        - ``lr_logits``: (B, C, H/8, W/8) logits of the context (before attention weighting);
        - ``attention``: (B, C, H/8, W/8) scale attention, exactly 0 outside the detail crop;
        - ``hr_box``: (y1, y2, x1, x2) detail crop in pixels of ``images`` (``crop_labels``);
        - ``lr_features``: (B, D, H/8, W/8) prototype features of the context, or None
          (no prototype head, or ``with_features`` False: no prototype loss reads the pass);
        - ``hr_features``: (B, D, h_c/4, w_c/4) prototype features of the detail crop, or None;
        - ``encoder_features``: encoder features of the context (for Feature Distance);
        - ``encoder_input``: the normalised context images the encoder saw.

        ``generator``: the CPU generator of the detail crop's corner (the run's ``hrda_crop``
        stream; default: torch's global one).
        """
        height, width = images.shape[-2:]
        lr_images = _resize(images, self.lr_scale)
        lr = self.segmentor(lr_images, with_features)
        attention = self.scale_attention(lr["encoder_features"])

        box = get_crop_box(height, width, self.hr_crop_size, self.crop_divisible, generator)
        hr = self.segmentor(crop_labels(images, box), with_features)

        # Grid units in input pixels: one LR logit cell = lr_stride / lr_scale pixels.
        lr_stride = _exact_ratio(lr_images.shape[-2], lr["logits"].shape[-2], "LR logits stride")
        hr_stride = _exact_ratio(self.hr_crop_size[0], hr["logits"].shape[-2], "HR logits stride")
        lr_unit = round(lr_stride / self.lr_scale)
        if any(v % lr_unit for v in (*box, height, width)):
            raise ValueError(
                f"detail crop {box} in a {height}x{width} image is not aligned to the LR logit grid "
                f"({lr_unit} px); make crop_divisible and hr_crop_size multiples of {lr_unit}"
            )
        y1, y2, x1, x2 = box
        mask = torch.zeros_like(attention[:, :1])
        mask[..., y1 // lr_unit : y2 // lr_unit, x1 // lr_unit : x2 // lr_unit] = 1
        attention = attention * mask

        hr_box = (y1 // hr_stride, y2 // hr_stride, x1 // hr_stride, x2 // hr_stride)
        fused = fuse_scales(
            lr["logits"], attention, hr["logits"], (height // hr_stride, width // hr_stride), hr_box
        )
        return {
            "fused": fused,
            "hr_logits": hr["logits"],
            "lr_logits": lr["logits"],
            "attention": attention,
            "hr_box": box,
            "lr_features": lr["features"],
            "hr_features": hr["features"],
            "encoder_features": lr["encoder_features"],
            "encoder_input": lr["encoder_input"],
        }

    def seg_loss(self, out: dict[str, Any], labels: Tensor, weights: Tensor | None) -> Tensor:
        """HRDA's loss: (1 - w_hr) CE(fused) + w_hr CE(detail crop), labels (B, H, W)."""
        box = out["hr_box"]
        hr_weights = None if weights is None else crop_labels(weights, box)
        w_hr = self.hr_loss_weight
        return (1 - w_hr) * weighted_cross_entropy(out["fused"], labels, weights) + (
            w_hr * weighted_cross_entropy(out["hr_logits"], crop_labels(labels, box), hr_weights)
        )

    def prototype_views(
        self, out: dict[str, Any], labels: Tensor, weights: Tensor
    ) -> list[PrototypeView]:
        """Eq. 18's two views: the context's features and the detail crop's, each labelled by
        its own pixels of labels/weights (B, H, W)."""
        box = out["hr_box"]
        return [
            PrototypeView("lr", out["lr_features"], labels, weights),
            PrototypeView(
                "hr", out["hr_features"], crop_labels(labels, box), crop_labels(weights, box)
            ),
        ]

    def predict_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> prototype features (B, D, H/4, W/4) of the shared segmentor
        at full resolution."""
        return self.segmentor(images)["features"]

    def _hr_logits(self, crops: Tensor) -> Tensor:
        return self.segmentor(crops, with_features=False)["logits"]

    def encode_decode(self, images: Tensor) -> Tensor:
        """One window: images (B, 3, H, W) -> fused logits (B, C, H, W), HR branch by sliding
        windows over the whole image, attention unmasked (HRDA's ``encode_decode``)."""
        lr = self.segmentor(_resize(images, self.lr_scale), with_features=False)
        attention = self.scale_attention(lr["encoder_features"])
        hr_logits = slide_inference(
            images, self.hr_slide_window, self.hr_slide_stride, self._hr_logits
        )
        fused = fuse_scales(lr["logits"], attention, hr_logits, hr_logits.shape[-2:])
        return F.interpolate(fused, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def predict(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> logits (B, C, H, W): ``encode_decode`` over
        ``test_window`` windows (one window when the image fits). No prototype head."""
        return slide_inference(images, self.test_window, self.test_stride, self.encode_decode)
