"""Backbones: MiT-B0..B5 (SegFormer encoder) and ResNet-V1c, both built from timm.

Every encoder maps an ImageNet-normalised batch (B, 3, H, W) to a list of
feature maps, finest first, and exposes ``out_channels`` and ``strides``.

MiT is timm's ``pvt_v2_b*`` built with ``mlp_ratios=(4, 4, 4, 4)``; the official
ImageNet checkpoints (NVlabs/SegFormer ``mit_b*.pth``, the files DAFormer, HRDA
and MIC start from) are converted with timm's pvt_v2 checkpoint filter and
loaded strictly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_v2_checkpoint_filter
from torch import Tensor, nn

__all__ = [
    "MIT_ARCHS",
    "MiT",
    "ResNetV1c",
    "load_mit_checkpoint",
    "load_resnet_checkpoint",
    "load_state_dict_strict",
    "mit_checkpoint_filter",
    "read_checkpoint",
    "resnet_checkpoint_filter",
]

# Widths and depths of the MiT variants (SegFormer paper, Table 6). timm's
# pvt_v2_b* registry entries carry the same numbers; the test checks they agree.
MIT_ARCHS: dict[str, dict[str, tuple[int, ...]]] = {
    "b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3)},
    "b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3)},
    "b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3)},
}


# ---------------------------------------------------------------------------
# Checkpoint reading and strict loading (shared by both encoders)
# ---------------------------------------------------------------------------


def read_checkpoint(path: str | Path, what: str) -> dict[str, Tensor]:
    """Read a state dict of tensors from ``path``, unwrapping ``state_dict``/``model`` nesting.

    Raises one-line errors that name the file and the fix: ``FileNotFoundError``
    for a missing path, ``RuntimeError`` for a file torch cannot read, ``ValueError``
    for a file that holds no state dict.
    """
    path = Path(path).expanduser()
    fix = f"point `pretrained` at the {what} checkpoint file, or set pretrained=null to start from random weights"
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path} ({fix})")
    try:
        # weights_only: a checkpoint is data, never code to execute.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / foreign files
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise RuntimeError(
                f"{what} checkpoint {path} pickles Python objects ({refused[1]}) that "
                "torch.load(weights_only=True) refuses; if you trust the file, re-save only its "
                "state dict of tensors and point `pretrained` at that"
            ) from err
        raise RuntimeError(
            f"cannot read {what} checkpoint {path}: corrupt, truncated or not a PyTorch "
            f"checkpoint ({type(err).__name__}); download it again, {fix}"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(v, Tensor) for v in obj.values())
    ):
        raise ValueError(f"{what} checkpoint {path} holds no state dict of tensors ({fix})")
    return dict(obj)


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str
) -> None:
    """Load ``state_dict`` into ``module``; any missing, unexpected or mis-shaped key is an error.

    The error lists every offending key (not only the first, as torch does for shapes),
    so a checkpoint for the wrong variant is recognisable at a glance.
    """
    own = module.state_dict()
    # BatchNorm fills a missing counter itself; old torchvision/mmcv files lack it.
    missing = sorted(
        k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    for title, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:20]) + (
                f", ... ({len(keys) - 20} more)" if len(keys) > 20 else ""
            )
            problems.append(f"{len(keys)} {title}: {shown}")
    if problems:
        raise RuntimeError(f"checkpoint {source} does not match the model: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------
# MiT
# ---------------------------------------------------------------------------


def mit_checkpoint_filter(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an official MiT checkpoint (``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``,
    ``norm1.weight``, ...) onto timm pvt_v2 names and drop the ImageNet classifier ``head.*``.

    A checkpoint already in timm layout passes through (minus ``head.*``).
    """
    converted = pvt_v2_checkpoint_filter(dict(state_dict), model)
    return {k: v for k, v in converted.items() if not k.startswith("head.")}


def load_mit_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an official MiT ImageNet checkpoint into a timm pvt_v2 ``model`` (built with
    ``num_classes=0``), strictly."""
    state_dict = read_checkpoint(path, "MiT ImageNet")
    source = f"{path} (key names after conversion to timm pvt_v2 layout)"
    load_state_dict_strict(model, mit_checkpoint_filter(state_dict, model), source)


class MiT(nn.Module):
    """Mix Transformer encoder (SegFormer) MiT-B0..B5.

    Args:
        variant: ``"b0"`` .. ``"b5"``.
        pretrained: path to the official ImageNet-1k checkpoint (``mit_b5.pth``), or None.
        drop_path_rate: stochastic depth, linearly increasing over all blocks (MiT: 0.1).
        depths: blocks per stage, overriding the variant's (for tiny test models only).

    ``forward(x)``: x (B, 3, H, W) normalised -> 4 maps (B, out_channels[i], H/s_i, W/s_i)
    with strides s = (4, 8, 16, 32) (ceil for sizes not divisible by the stride).
    """

    strides: tuple[int, ...] = (4, 8, 16, 32)

    def __init__(
        self,
        variant: str = "b5",
        pretrained: str | None = None,
        drop_path_rate: float = 0.1,
        depths: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if variant not in MIT_ARCHS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_ARCHS)}")
        overrides = {} if depths is None else {"depths": tuple(depths)}
        # pvt_v2_b0..b4 default to mlp_ratios (8, 8, 4, 4); MiT uses 4 everywhere.
        self.model = timm.create_model(
            f"pvt_v2_{variant}",
            pretrained=False,
            num_classes=0,
            mlp_ratios=(4, 4, 4, 4),
            drop_path_rate=drop_path_rate,
            **overrides,
        )
        self.variant = variant
        self.out_channels: tuple[int, ...] = tuple(
            s.norm.normalized_shape[0] for s in self.model.stages
        )
        if pretrained is not None:
            load_mit_checkpoint(self.model, pretrained)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i) for s_i in 4, 8, 16, 32]."""
        x = self.model.patch_embed(x)  # (B, H/4, W/4, C0), channels last
        features = []
        for stage in self.model.stages:
            x = stage(x)  # (B, C_i, H/s_i, W/s_i)
            features.append(x)
        return features


# ---------------------------------------------------------------------------
# ResNet-V1c (DeepLabV2 baseline)
# ---------------------------------------------------------------------------

# mmcv/mmseg ResNetV1c keeps its deep stem in ``stem`` (conv-bn-relu x3); timm splits
# it into ``conv1`` (conv-bn-relu-conv-bn-relu-conv) and ``bn1``.
_MMCV_STEM_TO_TIMM = {
    "stem.0.": "conv1.0.",
    "stem.1.": "conv1.1.",
    "stem.3.": "conv1.3.",
    "stem.4.": "conv1.4.",
    "stem.6.": "conv1.6.",
    "stem.7.": "bn1.",
}


def resnet_checkpoint_filter(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an mmcv ``resnet*_v1c`` checkpoint onto timm ``resnet*c`` names (timm-layout
    files pass through) and drop the ImageNet classifier ``fc.*``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        for old, new in _MMCV_STEM_TO_TIMM.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def load_resnet_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load an ImageNet ResNet-V1c checkpoint (timm or mmcv layout) into ``model``, strictly."""
    state_dict = read_checkpoint(path, "ResNet-V1c ImageNet")
    load_state_dict_strict(model, resnet_checkpoint_filter(state_dict), str(path))


class ResNetV1c(nn.Module):
    """ResNet-V1c (deep stem) with dilated last stages, output stride 8 (DeepLabV2).

    Args:
        depth: 50 or 101 (timm ``resnet50c`` / ``resnet101c``).
        pretrained: path to an ImageNet checkpoint (timm or mmcv ``resnet*_v1c`` layout), or None.

    ``forward(x)``: x (B, 3, H, W) -> 4 maps of layer1..layer4 with channels
    (256, 512, 1024, 2048) and strides (4, 8, 8, 8). DLV2Head uses the last.
    """

    strides: tuple[int, ...] = (4, 8, 8, 8)

    def __init__(self, depth: int = 101, pretrained: str | None = None) -> None:
        super().__init__()
        if depth not in (50, 101):
            raise ValueError(f"ResNetV1c depth must be 50 or 101, got {depth}")
        # A plain (not features_only) model keeps timm's key names, so strict loading works.
        self.model = timm.create_model(
            f"resnet{depth}c", pretrained=False, num_classes=0, output_stride=8
        )
        self.out_channels: tuple[int, ...] = tuple(
            layer[-1].conv3.out_channels for layer in self._layers()
        )
        if pretrained is not None:
            load_resnet_checkpoint(self.model, pretrained)

    def _layers(self) -> list[nn.Module]:
        return [self.model.layer1, self.model.layer2, self.model.layer3, self.model.layer4]

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i) for s_i in 4, 8, 8, 8]."""
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))  # (B, 64, H/4, W/4)
        features = []
        for layer in self._layers():
            x = layer(x)
            features.append(x)
        return features
