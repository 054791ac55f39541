"""Decode heads and the MPCL prototype (projection) head.

Every head maps the encoder's multi-level features ``feats`` (a list of
(B, C_i, H/s_i, W/s_i), finest first) to one map:

- ``SegFormerHead``  -> logits (B, num_classes, H/s_0, W/s_0): SegFormer's all-MLP decoder.
- ``DAFormerHead``   -> logits (B, num_classes, H/s_0, W/s_0): DAFormer's context-aware fusion.
- ``DLV2Head``       -> logits (B, num_classes, H/s_-1, W/s_-1): DeepLabV2 ASPP classifier.
- ``ProjectionHead`` -> pixel embeddings (B, proto_dim, H/s_0, W/s_0) for the prototypes.

The two multi-level fusions (``MLPFusion``, ``ASPPFusion``) are modules of their
own so the prototype head can use the same design as the decode head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ASPPFusion",
    "ConvBNReLU",
    "DAFormerHead",
    "DLV2Head",
    "DepthwiseSeparableConvBNReLU",
    "MLPFusion",
    "MultiLevelEmbed",
    "ProjectionHead",
    "SegFormerHead",
    "SeparableASPP",
]


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BN follows) + BatchNorm + ReLU. (B, in, H, W) -> (B, out, H, W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        dilation: int = 1,
        groups: int = 1,
    ):
        padding = dilation * (kernel_size // 2)
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DepthwiseSeparableConvBNReLU(nn.Sequential):
    """Depthwise k x k (dilated) conv-BN-ReLU, then pointwise 1x1 conv-BN-ReLU (mmcv's
    DepthwiseSeparableConvModule with norm and activation on both parts)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
    ):
        super().__init__(
            ConvBNReLU(
                in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels
            ),
            ConvBNReLU(in_channels, out_channels, 1),
        )


class SeparableASPP(nn.Module):
    """DAFormer's ASPP with depthwise-separable branches (``aspp`` fusion, ``sep=True``, no pooling).

    A 1x1 conv for dilation 1, a depthwise-separable dilated 3x3 for every other
    dilation; branch outputs are concatenated and reduced by a 3x3 bottleneck.
    (B, in, H, W) -> (B, out, H, W).
    """

    def __init__(
        self, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 6, 12, 18)
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            ConvBNReLU(in_channels, out_channels, 1)
            if d == 1
            else DepthwiseSeparableConvBNReLU(in_channels, out_channels, 3, dilation=d)
            for d in dilations
        )
        self.bottleneck = ConvBNReLU(len(dilations) * out_channels, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))


class MultiLevelEmbed(nn.Module):
    """Per-level linear embedding (a 1x1 conv == SegFormer's token-wise MLP) to ``embed_dim``,
    upsampled bilinearly to the finest level and concatenated.

    feats [(B, C_i, h_i, w_i)] -> (B, len(feats) * embed_dim, h_0, w_0).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.embeds):
            raise ValueError(f"expected {len(self.embeds)} feature levels, got {len(feats)}")
        size = feats[0].shape[-2:]
        out = []
        for embed, f in zip(self.embeds, feats):
            e = embed(f)
            if e.shape[-2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            out.append(e)
        return torch.cat(out, dim=1)


class MLPFusion(nn.Module):
    """SegFormer's light fusion: multi-level embedding, then a 1x1 conv-BN-ReLU.

    feats [(B, C_i, h_i, w_i)] -> (B, embed_dim, h_0, w_0).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 256):
        super().__init__()
        self.embed = MultiLevelEmbed(in_channels, embed_dim)
        self.fuse = ConvBNReLU(len(in_channels) * embed_dim, embed_dim, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.fuse(self.embed(feats))


class ASPPFusion(nn.Module):
    """DAFormer's context-aware feature fusion: multi-level embedding, then a
    depthwise-separable ASPP over the concatenated embeddings.

    feats [(B, C_i, h_i, w_i)] -> (B, embed_dim, h_0, w_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
    ):
        super().__init__()
        self.embed = MultiLevelEmbed(in_channels, embed_dim)
        self.fuse = SeparableASPP(len(in_channels) * embed_dim, embed_dim, dilations)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.fuse(self.embed(feats))


class _Classifier(nn.Sequential):
    """Dropout2d + 1x1 conv to class logits (mmseg's ``cls_seg``, weights N(0, 0.01))."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float):
        conv = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        super().__init__(nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), conv)


class SegFormerHead(nn.Module):
    """SegFormer all-MLP decoder. Also HRDA's scale-attention head (its DAFormer attention
    head swaps the ASPP for exactly this 1x1 fusion).

    feats [(B, C_i, h_i, w_i)] -> logits (B, num_classes, h_0, w_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        *,
        num_classes: int,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.fusion = MLPFusion(in_channels, embed_dim)
        self.classifier = _Classifier(embed_dim, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.fusion(feats))


class DAFormerHead(nn.Module):
    """DAFormer decoder with context-aware feature fusion (``sepaspp``).

    feats [(B, C_i, h_i, w_i)] -> logits (B, num_classes, h_0, w_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        *,
        num_classes: int,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.fusion = ASPPFusion(in_channels, embed_dim, dilations)
        self.classifier = _Classifier(embed_dim, num_classes, dropout)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.fusion(feats))


class DLV2Head(nn.Module):
    """DeepLabV2 ASPP classifier on the last feature level: the SUM of dilated 3x3 convs
    straight to class logits (no BN, no ReLU). DAFormer's "dlv2red" uses dilations (6, 12).

    feats [..., (B, C, h, w)] -> logits (B, num_classes, h, w).
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        num_classes: int,
        dilations: Sequence[int] = (6, 12),
    ):
        super().__init__()
        channels = in_channels if isinstance(in_channels, int) else in_channels[-1]
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, num_classes, 3, padding=d, dilation=d) for d in dilations
        )
        for conv in self.branches:  # DeepLabV2 initialisation
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = feats[-1]
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)


class ProjectionHead(nn.Module):
    """MPCL prototype head h_proto: its own multi-level fusion, then a 1x1 conv to the
    prototype space (paper IV-B: D_proto = 256, DAFormer's context-aware fusion).

    ``fusion="aspp"`` is the paper's design; ``"mlp"`` the light one for small models.
    The output is not normalised: the prototype module L2-normalises it.

    feats [(B, C_i, h_i, w_i)] -> embeddings (B, proto_dim, h_0, w_0).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int = 256,
        proto_dim: int = 256,
        fusion: str = "aspp",
        dilations: Sequence[int] = (1, 6, 12, 18),
    ):
        super().__init__()
        if fusion == "aspp":
            self.fusion: nn.Module = ASPPFusion(in_channels, embed_dim, dilations)
        elif fusion == "mlp":
            self.fusion = MLPFusion(in_channels, embed_dim)
        else:
            raise ValueError(f"ProjectionHead fusion must be 'aspp' or 'mlp', got {fusion!r}")
        self.proj = nn.Conv2d(embed_dim, proto_dim, 1)
        self.proto_dim = proto_dim

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.proj(self.fusion(feats))
