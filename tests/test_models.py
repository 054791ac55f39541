"""Encoders, heads, the MiT checkpoint loader and the Segmentor."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mpcl.models import (
    DAFormerHead,
    DLV2Head,
    MiT,
    ProjectionHead,
    ResNetV1c,
    SegFormerHead,
    Segmentor,
)
from mpcl.models.encoders import MIT_ARCHS, load_state_dict_strict, resnet_checkpoint_filter

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


def test_resnet_mmcv_layout_loads() -> None:
    enc = ResNetV1c(50)
    timm_sd = enc.model.state_dict()
    # mmcv ResNetV1c: deep stem in `stem` (conv-bn-relu x3), classifier `fc`.
    to_mmcv = {f"conv1.{i}.": f"stem.{i}." for i in (0, 1, 3, 4, 6)} | {"bn1.": "stem.7."}
    mmcv_sd = {}
    for key, value in timm_sd.items():
        prefix = next((p for p in to_mmcv if key.startswith(p)), None)
        mmcv_sd[to_mmcv[prefix] + key[len(prefix) :] if prefix else key] = value.clone()
    mmcv_sd["fc.weight"] = torch.zeros(1000, 2048)
    assert "stem.7.running_var" in mmcv_sd and "bn1.weight" not in mmcv_sd
    other = ResNetV1c(50)
    load_state_dict_strict(other.model, resnet_checkpoint_filter(mmcv_sd), "mmcv")
    for key, value in other.model.state_dict().items():
        assert torch.equal(value, timm_sd[key]), key


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
    _expect_load_error(
        sd, tmp_path, RuntimeError, r"1 missing keys: stages\.1\.blocks\.1\.attn\.kv\.weight"
    )


def test_mit_checkpoint_unexpected_key(source_mit: MiT, tmp_path: Path) -> None:
    sd = _official_checkpoint(source_mit)
    sd["block5.0.attn.q.weight"] = torch.zeros(1)
    _expect_load_error(
        sd,
        tmp_path,
        RuntimeError,
        r"timm pvt_v2 layout\) .*1 unexpected keys: stages\.4\.blocks\.0\.attn\.q\.weight",
    )


def test_mit_checkpoint_wrong_variant(source_mit: MiT, tmp_path: Path) -> None:
    # A b0 file into a b1 model: every width differs, all are named.
    path = tmp_path / "mit_b0.pth"
    torch.save(_official_checkpoint(source_mit), path)
    with pytest.raises(
        RuntimeError,
        match=r"shape mismatches: .*patch_embed\.proj\.weight: checkpoint \(32, 3, 7, 7\)",
    ):
        MiT("b1", pretrained=str(path), depths=(1, 2, 1, 1))


def test_mit_checkpoint_wrong_shape(source_mit: MiT, tmp_path: Path) -> None:
    sd = _official_checkpoint(source_mit)
    sd["norm4.weight"] = torch.ones(7)
    _expect_load_error(
        sd,
        tmp_path,
        RuntimeError,
        r"1 shape mismatches: stages\.3\.norm\.weight: checkpoint \(7,\)",
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
        RuntimeError, match=rf"cannot read MiT ImageNet checkpoint {re.escape(str(path))}: corrupt"
    ):
        MiT("b0", pretrained=str(path), depths=TINY)


def test_mit_checkpoint_without_tensors(tmp_path: Path) -> None:
    _expect_load_error({"epoch": 3}, tmp_path, ValueError, "holds no state dict")


def test_mit_checkpoint_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "pretrained" / "mit_b5.pth"
    with pytest.raises(
        FileNotFoundError, match=rf"not found: {re.escape(str(path))} \(point `pretrained`"
    ):
        MiT("b0", pretrained=str(path), depths=TINY)


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
