"""Encoder-decoder segmentor with an optional, training-only prototype head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Segmentor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmentor(nn.Module):
    """``encoder`` -> ``decode_head`` (logits) and, in training, ``proto_head`` (pixel embeddings).

    Images enter as float (B, 3, H, W) in [0, 1]; the segmentor normalises them with
    the ImageNet mean/std (non-persistent buffers: they are constants, not weights).

    The prototype head is training-only (paper IV-B): ``predict`` never runs it, and a
    state dict holding ``proto_head.*`` loads into a segmentor built without one (the
    keys are dropped), so an evaluation model need not build the head.
    """

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

    def extract(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, H, W) in [0, 1] -> encoder features [(B, C_i, H/s_i, W/s_i)]."""
        return self.encoder(self.normalize(images))

    def forward(self, images: Tensor, with_features: bool = True) -> dict[str, Any]:
        """images (B, 3, H, W) in [0, 1] -> dict with

        - ``logits``: (B, num_classes, H/s, W/s), s the decode head's stride (4 for MiT);
        - ``features``: (B, proto_dim, H/4, W/4) prototype-head embeddings, or None when
          there is no prototype head or ``with_features`` is False;
        - ``encoder_features``: list of the encoder's (B, C_i, H/s_i, W/s_i) (the last one
          feeds ImageNet Feature Distance).
        """
        encoder_features = self.extract(images)
        logits = self.decode_head(encoder_features)
        features = None
        if with_features and self.proto_head is not None:
            features = self.proto_head(encoder_features)
        return {"logits": logits, "features": features, "encoder_features": encoder_features}

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
