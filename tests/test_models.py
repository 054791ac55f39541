"""Encoders (MiT, ResNet-V1c, any timm model, DINOv2 ViTs with a simple feature pyramid), heads,
strict checkpoint loading through timm, and the Segmentor."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpcl.models import (
    DAFormerHead,
    DLV2Head,
    MiT,
    ProjectionHead,
    ResNetV1c,
    SegFormerHead,
    Segmentor,
    SimpleFeaturePyramid,
    TimmEncoder,
    ViTEncoder,
)
from mpcl.models.encoders import MIT_ARCHS, CheckpointError

# Published MiT widths and depths (SegFormer, Table 6), written out independently of the code.
MIT_WIDTHS = {
    "b0": (32, 64, 160, 256),
    **{v: (64, 128, 320, 512) for v in ("b1", "b2", "b3", "b4", "b5")},
}
MIT_DEPTHS = {
    "b0": (2, 2, 2, 2),
    "b1": (2, 2, 2, 2),
    "b2": (3, 4, 6, 3),
    "b3": (3, 4, 18, 3),
    "b4": (3, 8, 27, 3),
    "b5": (3, 6, 40, 3),
}
TINY = (1, 1, 1, 1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("variant", sorted(MIT_DEPTHS))
def test_mit_real_architecture(variant: str) -> None:
    # Full-depth models are built on the meta device: structure only, no memory, no init cost.
    with torch.device("meta"):
        enc = MiT(variant)
    assert enc.out_channels == MIT_WIDTHS[variant]
    assert tuple(len(stage.blocks) for stage in enc.model.stages) == MIT_DEPTHS[variant]
    assert MIT_ARCHS[variant] == {"embed_dims": MIT_WIDTHS[variant], "depths": MIT_DEPTHS[variant]}
    for stage, width in zip(enc.model.stages, MIT_WIDTHS[variant]):
        assert stage.blocks[0].mlp.fc1.out_features == 4 * width  # MiT: mlp_ratio 4 in every stage
    last = enc.model.stages[-1].blocks[-1].drop_path1
    assert last.drop_prob == pytest.approx(0.1)  # linear stochastic depth up to 0.1


@pytest.mark.parametrize("variant", sorted(MIT_DEPTHS))
def test_mit_features_shapes_and_strides(variant: str) -> None:
    enc = MiT(variant, depths=TINY)
    feats = enc(torch.rand(2, 3, 64, 96))
    assert enc.out_channels == MIT_WIDTHS[variant]
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(MIT_WIDTHS[variant], (4, 8, 16, 32))
    ]
    assert enc.strides == (4, 8, 16, 32)


def test_mit_unknown_variant() -> None:
    with pytest.raises(ValueError, match="b6"):
        MiT("b6")


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_v1c_architecture(depth: int) -> None:
    with torch.device("meta"):
        enc = ResNetV1c(depth)
    assert enc.out_channels == (256, 512, 1024, 2048)
    assert len(enc.model.layer3) == {50: 6, 101: 23}[depth]
    assert len(enc.model.conv1) == 7  # deep stem (V1c): three 3x3 convs


def test_resnet_v1c_output_stride_8() -> None:
    enc = ResNetV1c(50).eval()
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (1, 256, 16, 16),
        (1, 512, 8, 8),
        (1, 1024, 8, 8),
        (1, 2048, 8, 8),
    ]


def test_resnet_mmcv_layout_loads(tmp_path: Path) -> None:
    enc = ResNetV1c(50)
    timm_sd = enc.model.state_dict()
    # mmcv ResNetV1c: deep stem in `stem` (conv-bn-relu x3), classifier `fc`, and old files
    # lack BatchNorm's num_batches_tracked.
    to_mmcv = {f"conv1.{i}.": f"stem.{i}." for i in (0, 1, 3, 4, 6)} | {"bn1.": "stem.7."}
    mmcv_sd = {}
    for key, value in timm_sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix = next((p for p in to_mmcv if key.startswith(p)), None)
        mmcv_sd[to_mmcv[prefix] + key[len(prefix) :] if prefix else key] = value.clone()
    mmcv_sd["fc.weight"] = torch.zeros(1000, 2048)
    assert "stem.7.running_var" in mmcv_sd and "bn1.weight" not in mmcv_sd
    path = tmp_path / "resnet50_v1c.pth"
    torch.save({"state_dict": mmcv_sd}, path)
    other = ResNetV1c(50, pretrained=str(path))
    for key, value in other.model.state_dict().items():
        assert torch.equal(value, timm_sd[key]), key
    del mmcv_sd["layer4.2.conv3.weight"]
    torch.save(mmcv_sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: layer4\.2\.conv3\.weight"):
        ResNetV1c(50, pretrained=str(path))


def test_timm_encoder_any_model() -> None:
    enc = TimmEncoder("convnext_atto")  # any timm model with forward_intermediates
    feats = enc(torch.rand(1, 3, 64, 96))
    assert enc.out_channels == (40, 80, 160, 320) and enc.strides == (4, 8, 16, 32)
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(enc.out_channels, enc.strides)
    ]
    with pytest.raises(ValueError, match=r"indices \[7\] out of range"):
        TimmEncoder("convnext_atto", indices=[0, 7])


# --------------------------------------------------------------------------- DINOv2 ViTs

# Tiny DINOv2-layout ViTs (LayerScale, patch 14; with 4 registers or without).
TINY_VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2}
DINOV2 = ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"]


def test_dinov2_vit_large_architecture() -> None:
    with torch.device("meta"):
        enc = ViTEncoder("vit_large_patch14_dinov2")
    vit = enc.model
    # DINOv2 ViT-L/14 (Oquab et al., Table 17): 24 blocks, width 1024, 16 heads, patch 14,
    # LayerScale; 518 px pre-training crops (37 x 37 position embeddings).
    assert (len(vit.blocks), vit.embed_dim, vit.blocks[0].attn.num_heads) == (24, 1024, 16)
    assert enc.patch_size == 14 and tuple(vit.pos_embed.shape) == (1, 1 + 37 * 37, 1024)
    assert vit.blocks[0].ls1.gamma.shape == (1024,)
    assert enc.indices == [5, 11, 17, 23]  # the last block of each quarter
    assert enc.out_channels == (256, 512, 1024, 1024) and enc.strides == (4, 8, 16, 32)
    with torch.device("meta"):
        reg = ViTEncoder("vit_large_patch14_reg4_dinov2")
    assert reg.model.num_prefix_tokens == 5  # class token + 4 registers


@pytest.mark.parametrize("name", DINOV2)
@pytest.mark.parametrize("size", [(64, 96), (70, 100), (112, 56)])
def test_vit_encoder_pyramid_shapes(name: str, size: tuple[int, int]) -> None:
    enc = ViTEncoder(name, **TINY_VIT)
    feats = enc(torch.rand(2, 3, *size))
    h, w = size
    assert [tuple(f.shape) for f in feats] == [
        (2, c, -(-h // s), -(-w // s)) for c, s in zip((16, 32, 64, 64), (4, 8, 16, 32))
    ]


def test_simple_feature_pyramid_levels() -> None:
    # Patch 16 on a 64 x 64 image: ViTDet's exact ops, no resizing.
    fpn = SimpleFeaturePyramid(dim=32, patch_size=16)
    feat = torch.randn(2, 32, 4, 4)
    up4, up2, same, down = fpn([feat] * 4, (64, 64))
    assert [type(m).__name__ for m in fpn.levels[0]] == [
        "ConvTranspose2d",
        "LayerNorm2d",
        "GELU",
        "ConvTranspose2d",
    ]
    assert up4.shape == (2, 8, 16, 16) and up2.shape == (2, 16, 8, 8)
    assert torch.equal(same, feat)
    assert torch.equal(down, F.max_pool2d(feat, 2))
    # Patch 14 on a 64 x 96 image (grid 5 x 7 after resizing to 70 x 98): the identity level
    # is bilinearly resized to the stride-16 grid.
    fpn = SimpleFeaturePyramid(dim=32, patch_size=14)
    feat = torch.randn(1, 32, 5, 7)
    out = fpn([feat] * 4, (64, 96))
    expected = F.interpolate(feat, size=(4, 6), mode="bilinear", align_corners=False)
    assert torch.equal(out[2], expected)
    assert [tuple(o.shape[-2:]) for o in out] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_vit_encoder_rejects_bad_blocks() -> None:
    with pytest.raises(
        ValueError, match=r"blocks=\[0, 1, 9, 3\]: give 4 block indices in \[0, 4\)"
    ):
        ViTEncoder(DINOV2[0], blocks=[0, 1, 9, 3], **TINY_VIT)


def test_vit_encoder_plugs_into_hrda() -> None:
    from mpcl.models import HRDASegmentor

    enc = ViTEncoder(DINOV2[1], **TINY_VIT)
    hrda = HRDASegmentor(
        enc,
        SegFormerHead(enc.out_channels, embed_dim=16, num_classes=5),
        SegFormerHead(enc.out_channels, embed_dim=16, num_classes=5),
        ProjectionHead(enc.out_channels, embed_dim=16, proto_dim=8),
        hr_crop_size=(32, 32),
        hr_slide_window=(32, 32),
        hr_slide_stride=(16, 16),
        test_window=(64, 128),
        test_stride=(32, 64),
    )
    out = hrda.forward_train(torch.rand(2, 3, 64, 128))
    assert out["fused"].shape == (2, 5, 16, 32)  # stride 4, as with MiT
    assert out["lr_features"].shape == (2, 8, 8, 16) and out["hr_features"].shape == (2, 8, 8, 8)
    with torch.no_grad():
        assert hrda.eval().predict(torch.rand(1, 3, 64, 128)).shape == (1, 5, 64, 128)


@pytest.fixture(scope="module")
def reference_vits() -> dict:
    """Random reference DINOv2 ViTs, built by timm directly (not through our code)."""
    torch.manual_seed(3)
    return {
        name: timm.create_model(name, dynamic_img_size=True, **TINY_VIT).eval() for name in DINOV2
    }


@pytest.mark.parametrize("name", DINOV2)
@pytest.mark.parametrize("layout", ["timm", "official"])
def test_dinov2_checkpoint_loads_strictly(
    reference_vits: dict, name: str, layout: str, tmp_path: Path
) -> None:
    ref = reference_vits[name]
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    assert "blocks.3.ls2.gamma" in sd and ("reg_token" in sd) == ("reg4" in name)
    if layout == "official":  # facebookresearch/dinov2 *_pretrain.pth: mask token, registers
        sd["mask_token"] = torch.zeros(1, 64)
        if "reg_token" in sd:  # there, the class token's position embedding is stored apart
            cls_pos = torch.randn(1, 1, 64)
            sd["register_tokens"] = sd.pop("reg_token")
            sd["cls_token"] = sd["cls_token"] - cls_pos
            sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    path = tmp_path / "dinov2.pth"
    torch.save(sd, path)
    enc = ViTEncoder(name, pretrained=str(path), **TINY_VIT).eval()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[key], value, rtol=0, atol=1e-6)
    x = torch.rand(1, 3, 56, 84)
    with torch.no_grad():
        mine = enc.model.forward_intermediates(x, indices=enc.indices, intermediates_only=True)
        theirs = ref.forward_intermediates(x, indices=enc.indices, intermediates_only=True)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_dinov2_checkpoint_mismatch_is_named(reference_vits: dict, tmp_path: Path) -> None:
    sd = dict(reference_vits[DINOV2[0]].state_dict())
    del sd["blocks.2.attn.qkv.weight"]
    sd["blocks.4.norm1.weight"] = torch.ones(64)  # a block the model does not have
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(sd, path)
    with pytest.raises(
        CheckpointError,
        match=rf"^checkpoint {re.escape(str(path))} does not match timm's "
        rf"{DINOV2[0]} .*: 1 missing keys: blocks\.2\.attn\.qkv\.weight; "
        r"1 unexpected keys: blocks\.4\.norm1\.weight$",
    ):
        ViTEncoder(DINOV2[0], pretrained=str(path), **TINY_VIT)
    with pytest.raises(
        CheckpointError,
        match=r": 62 shape mismatches: cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 32\), ",
    ):
        torch.save(reference_vits[DINOV2[0]].state_dict(), path)
        ViTEncoder(DINOV2[0], pretrained=str(path), **(TINY_VIT | {"embed_dim": 32}))


def test_vit_layer_ids_follow_depth() -> None:
    enc = ViTEncoder(DINOV2[1], **TINY_VIT)
    ids = enc.layer_ids()
    assert set(ids) == {n for n, _ in enc.named_parameters()}
    for name, depth in ids.items():
        block = re.match(r"model\.blocks\.(\d+)\.", name)
        if block:
            assert depth == int(block[1]) + 1, name
        elif re.match(r"model\.(cls_token|reg_token|pos_embed|patch_embed)", name):
            assert depth == 0, name
        else:  # final norm and the pyramid: the top, with the last block
            assert depth == 4, name


# --------------------------------------------------------------------------- heads

IN_CHANNELS = (8, 16, 24, 32)


def _features(batch: int = 2, size: int = 64) -> list[Tensor]:
    return [
        torch.randn(batch, c, size // s, size // s) for c, s in zip(IN_CHANNELS, (4, 8, 16, 32))
    ]


@pytest.mark.parametrize(
    ("head", "channels", "stride"),
    [
        (SegFormerHead(IN_CHANNELS, embed_dim=16, num_classes=5), 5, 4),
        (DAFormerHead(IN_CHANNELS, embed_dim=16, num_classes=5), 5, 4),
        (DLV2Head(IN_CHANNELS, num_classes=5), 5, 32),
        (DLV2Head(32, num_classes=5, dilations=(6, 12, 18, 24)), 5, 32),
        (ProjectionHead(IN_CHANNELS, embed_dim=16, proto_dim=12, fusion="mlp"), 12, 4),
        (ProjectionHead(IN_CHANNELS, embed_dim=16, proto_dim=12, fusion="aspp"), 12, 4),
    ],
    ids=["segformer", "daformer", "dlv2", "dlv2-4dil", "proto-mlp", "proto-aspp"],
)
def test_head_shapes(head: nn.Module, channels: int, stride: int) -> None:
    out = head(_features())
    assert out.shape == (2, channels, 64 // stride, 64 // stride)
    out.sum().backward()  # every head is trainable end to end
    assert all(p.grad is not None for p in head.parameters())


def test_daformer_fusion_structure() -> None:
    head = DAFormerHead(IN_CHANNELS, embed_dim=16, num_classes=5)
    aspp = head.fusion.fuse
    convs = [m for m in aspp.branches.modules() if isinstance(m, nn.Conv2d)]
    # Dilation 1: a plain 1x1; dilations 6/12/18: depthwise 3x3 + pointwise 1x1 each.
    assert [(c.kernel_size, c.dilation, c.groups > 1) for c in convs] == [
        ((1, 1), (1, 1), False),
        *[x for d in (6, 12, 18) for x in (((3, 3), (d, d), True), ((1, 1), (1, 1), False))],
    ]
    assert convs[1].in_channels == 4 * 16  # the ASPP sees all four concatenated embeddings
    assert aspp.bottleneck[0].kernel_size == (3, 3) and aspp.bottleneck[0].in_channels == 4 * 16


def test_projection_head_rejects_unknown_fusion() -> None:
    with pytest.raises(ValueError, match="fusion"):
        ProjectionHead(IN_CHANNELS, fusion="conv")


def test_dlv2_sums_branches() -> None:
    head = DLV2Head(32, num_classes=3, dilations=(6, 12))
    x = torch.randn(1, 32, 8, 8)
    expected = head.branches[0](x) + head.branches[1](x)
    assert torch.allclose(head([x]), expected)


# --------------------------------------------------------------------------- MiT checkpoint loader


def _timm_to_official(key: str) -> str:
    """timm pvt_v2 name -> NVlabs/mmseg MiT name, written independently of timm's filter."""
    if key.startswith("patch_embed."):
        return "patch_embed1." + key[len("patch_embed.") :]
    m = re.fullmatch(r"stages\.(\d)\.downsample\.(.+)", key)
    if m:
        return f"patch_embed{int(m[1]) + 1}.{m[2]}"
    m = re.fullmatch(r"stages\.(\d)\.blocks\.(\d+)\.(.+)", key)
    if m:
        rest = m[3].replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        return f"block{int(m[1]) + 1}.{m[2]}.{rest}"
    m = re.fullmatch(r"stages\.(\d)\.norm\.(.+)", key)
    if m:
        return f"norm{int(m[1]) + 1}.{m[2]}"
    raise AssertionError(f"unmapped timm key {key}")


def _official_checkpoint(enc: MiT) -> dict[str, Tensor]:
    sd = {_timm_to_official(k): v.clone() for k, v in enc.model.state_dict().items()}
    width = enc.out_channels[-1]
    sd["head.weight"] = torch.randn(1000, width)  # the ImageNet classifier ships in the file
    sd["head.bias"] = torch.randn(1000)
    return sd


@pytest.fixture(scope="module")
def source_mit() -> MiT:
    torch.manual_seed(1)
    return MiT("b0", depths=(1, 2, 1, 1)).eval()


def test_official_layout_is_what_we_think(source_mit: MiT) -> None:
    keys = set(_official_checkpoint(source_mit))
    for key in [
        "patch_embed1.proj.weight",
        "patch_embed4.norm.bias",
        "block1.0.attn.q.weight",
        "block1.0.attn.sr.weight",
        "block2.1.mlp.dwconv.dwconv.weight",
        "norm1.weight",
        "norm4.bias",
    ]:
        assert key in keys


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "state_dict"])
def test_mit_loads_official_checkpoint_exactly(
    source_mit: MiT, tmp_path: Path, nested: bool
) -> None:
    sd = _official_checkpoint(source_mit)
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 1}} if nested else sd, path)

    loaded = MiT("b0", pretrained=str(path), depths=(1, 2, 1, 1)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(source_mit(x), loaded(x)):
            assert torch.equal(a, b)


def _expect_load_error(sd: object, tmp_path: Path, exc: type[Exception], pattern: str) -> None:
    path = tmp_path / "mit.pth"
    torch.save(sd, path)
    with pytest.raises(exc, match=pattern):
        MiT("b0", pretrained=str(path), depths=(1, 2, 1, 1))


def test_mit_checkpoint_missing_key(source_mit: MiT, tmp_path: Path) -> None:
    sd = _official_checkpoint(source_mit)
    del sd["block2.1.attn.kv.weight"]
    # One line naming the file, the model and the key (timm alone would load this silently
    # with num_classes=0: it drops strictness when the classifier differs).
    _expect_load_error(
        sd,
        tmp_path,
        CheckpointError,
        rf"^MiT ImageNet checkpoint {re.escape(str(tmp_path / 'mit.pth'))} does not match "
        r"timm's pvt_v2_b0 .*: 1 missing keys: stages\.1\.blocks\.1\.attn\.kv\.weight$",
    )


def test_mit_checkpoint_unexpected_key(source_mit: MiT, tmp_path: Path) -> None:
    sd = _official_checkpoint(source_mit)
    sd["block5.0.attn.q.weight"] = torch.zeros(1)
    _expect_load_error(
        sd,
        tmp_path,
        CheckpointError,
        r"conversion\): 1 unexpected keys: stages\.4\.blocks\.0\.attn\.q\.weight$",
    )


def test_mit_checkpoint_wrong_variant(source_mit: MiT, tmp_path: Path) -> None:
    # A b0 file into a b1 model: every width differs, all are named.
    path = tmp_path / "mit_b0.pth"
    torch.save(_official_checkpoint(source_mit), path)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches: .*patch_embed\.proj\.weight: checkpoint \(32, 3, 7, 7\)",
    ):
        MiT("b1", pretrained=str(path), depths=(1, 2, 1, 1))


def test_mit_checkpoint_wrong_shape(source_mit: MiT, tmp_path: Path) -> None:
    sd = _official_checkpoint(source_mit)
    sd["norm4.weight"] = torch.ones(7)
    _expect_load_error(
        sd,
        tmp_path,
        CheckpointError,
        r"1 shape mismatches: stages\.3\.norm\.weight: checkpoint \(7,\) vs model \(256,\)$",
    )


@pytest.mark.parametrize("content", ["html", "truncated"])
def test_mit_checkpoint_unreadable(source_mit: MiT, tmp_path: Path, content: str) -> None:
    path = tmp_path / "mit_b5.pth"
    if content == "html":  # what a failed download leaves behind
        path.write_bytes(b"<html>404 Not Found</html>")
    else:
        torch.save(_official_checkpoint(source_mit), path)
        path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(
        CheckpointError,
        match=rf"^cannot read MiT ImageNet checkpoint {re.escape(str(path))}: corrupt[^\n]*$",
    ):
        MiT("b0", pretrained=str(path), depths=TINY)


def test_mit_checkpoint_without_tensors(tmp_path: Path) -> None:
    _expect_load_error(
        {"epoch": 3}, tmp_path, CheckpointError, r"\d+ missing keys: .*; 1 unexpected keys: epoch$"
    )


def test_mit_checkpoint_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "pretrained" / "mit_b5.pth"
    with pytest.raises(
        FileNotFoundError, match=rf"not found: {re.escape(str(path))} \(point `pretrained`"
    ):
        MiT("b0", pretrained=str(path), depths=TINY)


# ------------------------------------------------- MiT weights in the transformers layout (hub)


def _official_to_transformers(sd: dict[str, Tensor], prefix: str = "segformer.encoder.") -> dict:
    """NVlabs MiT names -> transformers names, as transformers' own conversion script does it
    (``convert_segformer_original_to_pytorch.rename_keys(encoder_only=True)`` + ``read_in_k_v``,
    transformers/models/segformer): the independent reference for our inverse."""
    out = {}
    for key, value in sd.items():
        if not key.startswith("head"):
            key = "segformer.encoder." + key
        if "patch_embed" in key:
            idx = key[key.find("patch_embed") + len("patch_embed")]
            key = key.replace(f"patch_embed{idx}", f"patch_embeddings.{int(idx) - 1}")
        if "norm" in key:
            key = key.replace("norm", "layer_norm")
        if "segformer.encoder.layer_norm" in key:
            idx = key[
                key.find("segformer.encoder.layer_norm") + len("segformer.encoder.layer_norm")
            ]
            key = key.replace(f"layer_norm{idx}", f"layer_norm.{int(idx) - 1}")
        if "layer_norm1" in key:
            key = key.replace("layer_norm1", "layer_norm_1")
        if "layer_norm2" in key:
            key = key.replace("layer_norm2", "layer_norm_2")
        if "block" in key:
            idx = key[key.find("block") + len("block")]
            key = key.replace(f"block{idx}", f"block.{int(idx) - 1}")
        if "attn.q" in key:
            key = key.replace("attn.q", "attention.self.query")
        if "attn.proj" in key:
            key = key.replace("attn.proj", "attention.output.dense")
        if "attn" in key:
            key = key.replace("attn", "attention.self")
        if "fc1" in key:
            key = key.replace("fc1", "dense1")
        if "fc2" in key:
            key = key.replace("fc2", "dense2")
        if key.startswith("head"):
            key = key.replace("head", "classifier")
        out[key] = value
    for key in [
        k for k in out if k.endswith(("attention.self.kv.weight", "attention.self.kv.bias"))
    ]:
        kv = out.pop(key)
        width = kv.shape[0] // 2
        out[key.replace(".kv.", ".key.")] = kv[:width].clone()
        out[key.replace(".kv.", ".value.")] = kv[width:].clone()
    if prefix != "segformer.encoder.":  # SegformerModel: no "segformer." and no classifier
        out = {
            prefix + k.removeprefix("segformer.encoder."): v
            for k, v in out.items()
            if not k.startswith("classifier")
        }
    return out


def test_transformers_layout_is_what_transformers_writes(source_mit: MiT) -> None:
    keys = set(_official_to_transformers(_official_checkpoint(source_mit)))
    for key in [
        "segformer.encoder.patch_embeddings.0.proj.weight",
        "segformer.encoder.patch_embeddings.3.layer_norm.bias",
        "segformer.encoder.block.0.0.layer_norm_1.weight",
        "segformer.encoder.block.0.0.attention.self.query.weight",
        "segformer.encoder.block.0.0.attention.self.key.weight",
        "segformer.encoder.block.0.0.attention.self.value.bias",
        "segformer.encoder.block.0.0.attention.self.sr.weight",
        "segformer.encoder.block.0.0.attention.self.layer_norm.weight",
        "segformer.encoder.block.0.0.attention.output.dense.weight",
        "segformer.encoder.block.1.1.mlp.dwconv.dwconv.weight",
        "segformer.encoder.block.3.0.mlp.dense2.bias",
        "segformer.encoder.block.3.0.layer_norm_2.weight",
        "segformer.encoder.layer_norm.3.bias",
        "classifier.weight",
    ]:
        assert key in keys, key
    assert not any(".kv." in k for k in keys)  # key and value are separate there
    assert "segformer.encoder.block.3.0.attention.self.sr.weight" not in keys  # sr ratio 1


def _save(sd: dict[str, Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("prefix", ["segformer.encoder.", "encoder."], ids=["classifier", "model"])
def test_mit_loads_transformers_checkpoint_exactly(
    source_mit: MiT, tmp_path: Path, filename: str, prefix: str
) -> None:
    path = tmp_path / filename
    _save(_official_to_transformers(_official_checkpoint(source_mit), prefix), path)
    loaded = MiT("b0", pretrained=str(path), depths=(1, 2, 1, 1)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(source_mit(x), loaded(x), strict=True):
            assert torch.equal(a, b)


def test_mit_transformers_checkpoint_missing_half_of_kv_is_named(
    source_mit: MiT, tmp_path: Path
) -> None:
    sd = _official_to_transformers(_official_checkpoint(source_mit))
    del sd["segformer.encoder.block.1.1.attention.self.value.weight"]
    path = tmp_path / "model.safetensors"
    _save(sd, path)
    with pytest.raises(
        CheckpointError,
        match=rf"^MiT ImageNet checkpoint {re.escape(str(path))} does not match timm's pvt_v2_b0 "
        r"\(transformers layout; keys after conversion to timm's\): 1 missing keys: "
        r"stages\.1\.blocks\.1\.attn\.kv\.weight; 1 unexpected keys: "
        r"segformer\.encoder\.block\.1\.1\.attention\.self\.key\.weight$",
    ):
        MiT("b0", pretrained=str(path), depths=(1, 2, 1, 1))


def test_mit_segmentation_checkpoint_names_the_decode_head(source_mit: MiT, tmp_path: Path) -> None:
    sd = _official_to_transformers(_official_checkpoint(source_mit))
    sd["decode_head.classifier.weight"] = torch.zeros(19, 256, 1, 1)  # a segformer-b0 file
    path = tmp_path / "pytorch_model.bin"
    _save(sd, path)
    with pytest.raises(
        CheckpointError, match=r"1 unexpected keys: decode_head\.classifier\.weight$"
    ):
        MiT("b0", pretrained=str(path), depths=(1, 2, 1, 1))


def test_mit_hub_downloads_nvidia_mit_through_huggingface_hub(
    source_mit: MiT, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    bin_path = tmp_path / "pytorch_model.bin"
    _save(_official_to_transformers(_official_checkpoint(source_mit)), bin_path)
    asked = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        asked.append((repo_id, filename))
        if filename == "model.safetensors":  # an older repo: only the .bin
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(bin_path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = MiT("b0", pretrained="hub", depths=(1, 2, 1, 1)).eval()
    assert asked == [("nvidia/mit-b0", "model.safetensors"), ("nvidia/mit-b0", "pytorch_model.bin")]
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source_mit(x), loaded(x), strict=True))


def test_mit_hub_offline_says_what_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, filename: str, **kwargs) -> str:
        raise LocalEntryNotFoundError("cannot reach the hub\nand the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(
        OSError,
        match=r"^cannot download nvidia/mit-b2 from the Hugging Face hub \(LocalEntryNotFoundError"
        r"[^\n]*download https://huggingface\.co/nvidia/mit-b2/resolve/main/model\.safetensors "
        r"\(or pytorch_model\.bin\)[^\n]*set model\.encoder\.pretrained=<that file>$",
    ):
        MiT("b2", pretrained="hub", depths=TINY)


# --------------------------------------------------------------------------- segmentor


def _tiny_segmentor(proto: bool = True, num_classes: int = 5) -> Segmentor:
    enc = MiT("b0", depths=TINY, drop_path_rate=0.0)
    return Segmentor(
        enc,
        SegFormerHead(enc.out_channels, embed_dim=16, num_classes=num_classes),
        ProjectionHead(enc.out_channels, embed_dim=16, proto_dim=8, fusion="mlp")
        if proto
        else None,
    )


def test_segmentor_forward_dict() -> None:
    model = _tiny_segmentor()
    out = model(torch.rand(2, 3, 64, 96))
    assert out["logits"].shape == (2, 5, 16, 24)
    assert out["features"].shape == (2, 8, 16, 24)
    assert [f.shape[1] for f in out["encoder_features"]] == [32, 64, 160, 256]
    assert model(torch.rand(1, 3, 32, 32), with_features=False)["features"] is None
    assert _tiny_segmentor(proto=False)(torch.rand(1, 3, 32, 32))["features"] is None


def test_segmentor_normalises_with_imagenet_stats() -> None:
    model = _tiny_segmentor()
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), (x - mean) / std)
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_predict_returns_input_size_without_proto_head() -> None:
    model = _tiny_segmentor().eval()
    calls = []
    model.proto_head.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        logits = model.predict(torch.rand(2, 3, 72, 40))
    assert logits.shape == (2, 5, 72, 40)
    assert calls == []


def test_training_state_dict_loads_without_proto_head() -> None:
    trained = _tiny_segmentor(proto=True).eval()
    assert any(k.startswith("proto_head.") for k in trained.state_dict())
    inference = copy.deepcopy(_tiny_segmentor(proto=False)).eval()  # as an EMA teacher is made
    inference.load_state_dict(trained.state_dict(), strict=True)
    # Also when the segmentor sits inside a bigger module (a Lightning checkpoint).
    wrapper = nn.ModuleDict({"student": _tiny_segmentor(proto=False)})
    wrapper.load_state_dict(nn.ModuleDict({"student": trained}).state_dict(), strict=True)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained.predict(x), inference.predict(x))


def test_bad_checkpoint_is_one_line_on_the_cli(tmp_path: Path, capsys) -> None:
    from hydra.utils import instantiate

    from mpcl.run.cli import report_error

    path = tmp_path / "dinov2_vits14_pretrain.pth"
    path.write_bytes(b"<html>404 Not Found</html>")  # what a failed download leaves behind
    cfg = {"_target_": "mpcl.models.ViTEncoder", "name": DINOV2[0], "pretrained": str(path)}
    with pytest.raises(SystemExit) as exit_info, report_error():
        instantiate(cfg | TINY_VIT)  # wrapped by Hydra, as in `python -m mpcl.train`
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read checkpoint {path}: corrupt") and err.count("\n") == 1
