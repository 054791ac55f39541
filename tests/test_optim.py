"""The warm-up + poly schedule and the parameter groups."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

from mpcl.uda.optim import build_optimizer, build_scheduler, param_groups, warmup_poly_lambda


def test_warmup_poly_matches_mmseg_formula():
    fn = warmup_poly_lambda(max_steps=100, warmup_steps=10, warmup_ratio=1e-6, power=1.0)
    for t in (0, 5, 10, 50, 99, 100):
        poly = (1 - t / 100) ** 1.0
        k = (1 - t / 10) * (1 - 1e-6) if t < 10 else 0.0
        assert fn(t) == pytest.approx(poly * (1 - k))
    assert fn(0) == pytest.approx(1e-6)


def test_param_groups_head_lr_and_no_decay_on_norms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4))
            self.decode_head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    m = M()
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    opt = build_optimizer(adamw, param_groups(m, head_lr_mult=10))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoder"]["lr"] == 1e-3 and groups["encoder"]["weight_decay"] == 0.01
    assert groups["head"]["lr"] == pytest.approx(1e-2)
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0
    assert groups["head_no_decay"]["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["encoder_no_decay"]["params"]) == ids(m.encoder[1].parameters())
    assert ids(groups["head_no_decay"]["params"]) == ids(m.decode_head[1].parameters())
    with pytest.raises(ValueError, match="uda.optimizer.weight_decay=-1"):
        build_optimizer(functools.partial(torch.optim.AdamW, weight_decay=-1), param_groups(m))
    opt = build_optimizer(adamw, param_groups(m))
    sched = build_scheduler(opt, max_steps=20, warmup_steps=5)
    for _ in range(7):
        opt.step()
        sched.step()
    enc = next(g for g in opt.param_groups if g["name"] == "encoder")
    assert enc["lr"] == pytest.approx(1e-3 * (1 - 7 / 20))


def test_param_groups_layer_decay_on_a_vit() -> None:
    from mpcl.models import ProjectionHead, SegFormerHead, Segmentor, ViTEncoder

    enc = ViTEncoder("vit_small_patch14_dinov2", depth=3, embed_dim=32, num_heads=2)
    model = Segmentor(
        enc, SegFormerHead(enc.out_channels, 8, num_classes=3), ProjectionHead(enc.out_channels, 8)
    )
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    off = param_groups(model, head_lr_mult=10)
    assert [g["name"] for g in off] == ["encoder", "encoder_no_decay", "head", "head_no_decay"]
    groups = build_optimizer(adamw, param_groups(model, 10, layer_decay=0.5)).param_groups
    assert groups[0]["name"] == "encoder" and groups[0]["lr"] == 1e-3  # full lr first
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        # BEiT / timm layer-wise decay written out: depth 0 = embeddings, block i = i + 1,
        # the last block (3), final norm and the pyramid adapter = the top (3).
        block = re.match(r"encoder\.model\.blocks\.(\d+)\.", name)
        if not name.startswith("encoder."):
            expected = 1e-2
        elif block:
            expected = 1e-3 * 0.5 ** (3 - (int(block[1]) + 1))
        elif re.match(r"encoder\.model\.(cls_token|pos_embed|patch_embed)", name):
            expected = 1e-3 * 0.5**3
        else:
            expected = 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), name
    with pytest.raises(ValueError, match=r"uda.layer_decay=1.5 must be in \(0, 1\]"):
        param_groups(model, layer_decay=1.5)
