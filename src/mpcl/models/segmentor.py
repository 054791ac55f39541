"""Encoder-decoder segmentor with an optional, training-only prototype head.

Every segmentor the UDA module trains (this one, ``HRDASegmentor``, or one of your own)
exposes the same interface, so the training step never asks which model it trains
(``SegmentationModel`` below; MIC's ``HRDAHead.losses`` is the model for it).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpcl.data.labels import IGNORE_INDEX

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PrototypeView",
    "SegmentationModel",
    "Segmentor",
    "weighted_cross_entropy",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PrototypeView(NamedTuple):
    """One resolution's input to the prototypes (Eq. 18): features and what labels them.

    ``labels`` and ``weights`` are at image resolution; the prototype learner samples them at
    the features' resolution.
    """

    resolution: str  # a name from the model's ``resolutions``
    features: Tensor  # (B, D, h, w) prototype-head embeddings
    labels: Tensor  # (B, H, W) int64, 255 = ignore
    weights: Tensor  # (B, H, W) float per-pixel weights (quality weight w^M)


class SegmentationModel(Protocol):
    """What the UDA step needs of a student (images (B, 3, H, W) in [0, 1]).

    - ``resolutions``: names of the feature views ``prototype_views`` returns, context
      first (``("lr",)``; HRDA: ``("lr", "hr")``); the prototype learner keeps one feature
      bank per name and Eq. 18 weights the second by lambda_d.
    - ``prototype_dim``: channels D of the prototype head, or None without one.
    - ``forward_train(images, with_features=True)``: a dict for the two methods below; its
      ``encoder_features`` (list of (B, C_i, h_i, w_i)) and ``encoder_input`` (the normalised
      images the encoder saw) feed ImageNet Feature Distance. ``with_features=False``: no
      prototype loss reads this pass (MIC's masked image), so the prototype head is skipped
      (its features are None) and ``prototype_views`` must not be called on the output.
      ``generator``: the CPU generator of the pass's own random choices (HRDA's detail crop;
      the run's ``hrda_crop`` stream, ``mpcl.streams``), if it makes any.
    - ``seg_loss(out, labels, weights)``: the model's (weighted) segmentation loss.
    - ``prototype_views(out, labels, weights)``: [PrototypeView] in ``resolutions`` order.
    - ``predict(images)``: logits (B, C, H, W); ``predict_features(images)``: prototype-head
      features (B, D, h, w) of the whole image, for the prototype-based output.
    - ``encoder``: the image encoder (Feature Distance keeps a frozen copy of it).
    """

    resolutions: tuple[str, ...]
    encoder: nn.Module

    @property
    def prototype_dim(self) -> int | None: ...

    def forward_train(
        self,
        images: Tensor,
        with_features: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]: ...

    def seg_loss(self, out: dict[str, Any], labels: Tensor, weights: Tensor | None) -> Tensor: ...

    def prototype_views(
        self, out: dict[str, Any], labels: Tensor, weights: Tensor
    ) -> list[PrototypeView]: ...

    def predict(self, images: Tensor) -> Tensor: ...

    def predict_features(self, images: Tensor) -> Tensor: ...


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Pixel-weighted CE, mean over all pixels (mmseg's reduction; ignored pixels count 0).

    Args:
        logits: (B, C, h, w), bilinearly resized to the label size.
        labels: (B, H, W) int64, 255 = ignore.
        weights: (B, H, W) float per-pixel weights, or None for 1.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    if weights is not None:
        loss = loss * weights
    return loss.mean()


class Segmentor(nn.Module):
    """``encoder`` -> ``decode_head`` (logits) and, in training, ``proto_head`` (pixel embeddings).

    Images enter as float (B, 3, H, W) in [0, 1]; the segmentor normalises them with
    the ImageNet mean/std (non-persistent buffers: they are constants, not weights).

    The prototype head is training-only (paper IV-B): ``predict`` never runs it, and a
    state dict holding ``proto_head.*`` loads into a segmentor built without one (the
    keys are dropped), so an evaluation model need not build the head.
    """

    resolutions = ("lr",)

    def __init__(
        self, encoder: nn.Module, decode_head: nn.Module, proto_head: nn.Module | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.decode_head = decode_head
        self.proto_head = proto_head
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_load_state_dict_pre_hook(_drop_unused_proto_head_keys)

    def normalize(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> ImageNet-normalised (B, 3, H, W)."""
        return (images - self.mean) / self.std

    def forward(self, images: Tensor, with_features: bool = True) -> dict[str, Any]:
        """images (B, 3, H, W) in [0, 1] -> dict with

        - ``logits``: (B, num_classes, H/s, W/s), s the decode head's stride (4 for MiT);
        - ``features``: (B, proto_dim, H/4, W/4) prototype-head embeddings, or None when
          there is no prototype head or ``with_features`` is False;
        - ``encoder_features``: list of the encoder's (B, C_i, H/s_i, W/s_i) (the last one
          feeds ImageNet Feature Distance);
        - ``encoder_input``: (B, 3, H, W) the normalised images the encoder saw.
        """
        encoder_input = self.normalize(images)
        encoder_features = self.encoder(encoder_input)
        logits = self.decode_head(encoder_features)
        features = None
        if with_features and self.proto_head is not None:
            features = self.proto_head(encoder_features)
        return {
            "logits": logits,
            "features": features,
            "encoder_features": encoder_features,
            "encoder_input": encoder_input,
        }

    @property
    def prototype_dim(self) -> int | None:
        return None if self.proto_head is None else self.proto_head.proto_dim

    def forward_train(
        self,
        images: Tensor,
        with_features: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """The training forward: ``forward``, with prototype features unless ``with_features``
        is False (a pass no prototype loss reads). It draws no random numbers of its own
        (``generator`` is unused)."""
        return self.forward(images, with_features)

    def seg_loss(self, out: dict[str, Any], labels: Tensor, weights: Tensor | None) -> Tensor:
        """Weighted CE of ``out["logits"]`` (upsampled) against labels (B, H, W)."""
        return weighted_cross_entropy(out["logits"], labels, weights)

    def prototype_views(
        self, out: dict[str, Any], labels: Tensor, weights: Tensor
    ) -> list[PrototypeView]:
        """One view: the prototype features of the whole crop, labelled by labels (B, H, W)."""
        return [PrototypeView(self.resolutions[0], out["features"], labels, weights)]

    def predict_features(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> prototype-head features (B, D, H/4, W/4)."""
        return self.forward(images)["features"]

    def predict(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) in [0, 1] -> logits (B, num_classes, H, W), bilinearly upsampled."""
        logits = self.forward(images, with_features=False)["logits"]
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _drop_unused_proto_head_keys(
    module: Segmentor, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any
) -> None:
    # A training checkpoint carries the prototype head; an inference model may not have one.
    if module.proto_head is None:
        for key in [k for k in state_dict if k.startswith(prefix + "proto_head.")]:
            del state_dict[key]
