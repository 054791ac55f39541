"""Backbones built from timm: any model with ``forward_intermediates``, MiT-B0..B5, ResNet-V1c.

Every encoder maps an ImageNet-normalised batch (B, 3, H, W) to a list of feature maps,
finest first, and exposes ``out_channels``, ``strides`` and ``layer_ids`` (the depth of
each parameter, for layer-wise learning-rate decay).

Weights are loaded by timm's builder: ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))`` reads the file, converts its keys with the model's
``checkpoint_filter_fn`` (official MiT / DINOv2 layouts -> timm names) and loads it strictly.
Two traps kept us from the shortest call: timm loads NON-strictly whenever the model's
``num_classes`` differs from the checkpoint's (it drops the classifier and sets
``strict=False``), so the model is built with the checkpoint's own classifier and that is
removed afterwards; and ``features_only`` models are loaded the same non-strict way, so the
features come from ``forward_intermediates`` on the plain model instead. A file that does not
match gets a one-line error that counts and names the offending keys; it is raised ``from
None`` because ``mpcl.train.report_error`` prints the innermost cause of a chain.

MiT reads its ImageNet weights itself (``load_mit_weights``), in either layout that is still
served: the NVlabs SegFormer file (``mit_b5.pth``) and the transformers one of the Hugging Face
``nvidia/mit-b*`` checkpoints (``model.safetensors`` or ``pytorch_model.bin``: the
``SegformerForImageClassification`` / ``SegformerModel`` key names), converted to the NVlabs
names and then by timm's own filter, and loaded strictly (the ImageNet classifier dropped).
``pretrained="hub"`` downloads ``nvidia/mit-b<N>`` through ``huggingface_hub``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors
import timm
import torch
from timm.models import group_parameters, load_checkpoint
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_v2_checkpoint_filter
from torch import Tensor, nn

from mpcl.errors import CheckpointError

__all__ = [
    "HUB",
    "MIT_ARCHS",
    "MiT",
    "ResNetV1c",
    "TimmEncoder",
    "create_timm_model",
    "download_mit",
    "load_mit_weights",
    "mit_from_transformers",
    "resnet_checkpoint_filter",
]

# ``pretrained=HUB``: timm's own download (Hugging Face hub) instead of a file.
HUB = "hub"

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
# Loading weights through timm, with one-line errors
# ---------------------------------------------------------------------------


def _checkpoint_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path; FileNotFoundError naming the file and the fix if it is not one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} checkpoint not found: {path} (point `pretrained` at the {what} checkpoint "
            "file, or set pretrained=null to start from random weights)"
        )
    return path


def _shape(text: str) -> str:
    """'32, 3, 7, 7' (inside torch.Size([...])) -> '(32, 3, 7, 7)'; '7' -> '(7,)'."""
    return str(tuple(int(d) for d in text.split(",") if d.strip()))


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
    return f"{len(items)} {title}: {shown}"


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)


def _key_problems(message: str) -> str:
    """torch's strict-loading error (one line per kind of problem, every key quoted) -> one
    line that counts and names the missing, unexpected and mis-shaped keys."""

    def keys(kind: str) -> list[str]:
        found = re.search(rf"{kind} key\(s\) in state_dict: (.*)", message)
        return re.findall(r'"([^"]+)"', found[1]) if found else []

    shapes = [
        f"{key}: checkpoint {_shape(ckpt)} vs model {_shape(model)}"
        for key, ckpt, model in _SIZE_MISMATCH.findall(message)
    ]
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing keys", keys("Missing")),
            ("unexpected keys", keys("Unexpected")),
            ("shape mismatches", shapes),
        )
        if items
    ]
    return "; ".join(problems) or " ".join(message.split())  # unknown wording: torch's own


def _checkpoint_error(
    err: Exception, path: object, what: str, name: str, keys: str = "keys after timm's conversion"
) -> CheckpointError:
    """The one-line error for an exception raised while timm read ``path`` into model ``name``
    (``keys``: which names the message lists)."""
    text = str(err)
    checkpoint = "checkpoint" if what == name else f"{what} checkpoint"
    if isinstance(err, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        return CheckpointError(
            f"{checkpoint} {path} does not match timm's {name} ({keys}): " + _key_problems(text)
        )
    first = text.strip().splitlines()[0] if text.strip() else ""
    return CheckpointError(
        f"cannot read {checkpoint} {path}: corrupt, truncated or not a PyTorch state dict "
        f"({type(err).__name__}{': ' + first if first else ''}); download it again, or re-save "
        "only its state dict of tensors if it pickles Python objects"
    )


def create_timm_model(
    name: str, pretrained: str | Path | None = None, what: str | None = None, **kwargs
) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` without classifier, weights loaded strictly.

    Args:
        name: a timm model name, e.g. ``"vit_large_patch14_dinov2"`` or ``"pvt_v2_b5"``.
        pretrained: None (random init), a checkpoint file (any layout the model's
            ``checkpoint_filter_fn`` converts: timm's, the official MiT / DINOv2 ones), or
            ``"hub"`` for timm's default weights (downloaded; needs network access).
        what: how errors name the weights (default: ``name``).
        kwargs: model arguments (``drop_path_rate``, ``depth``, ...).

    Raises FileNotFoundError (no such file), CheckpointError (unreadable file, or one whose
    keys or shapes differ from the model: every offending key is named), OSError (hub
    unreachable), all one line.
    """
    what = what or name
    if pretrained is None:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if str(pretrained) == HUB:
        overlay, source = None, f"timm's hub weights for {name}"
    else:
        source = _checkpoint_file(pretrained, what)
        overlay = dict(file=str(source))
    try:
        # Built with the checkpoint's own classifier (num_classes from its pretrained config):
        # timm loads strictly only then. The classifier is dropped below.
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except OSError as err:
        if overlay is not None:
            raise
        reason = " ".join(str(err).split())  # one line
        raise OSError(
            f"cannot download {source} ({type(err).__name__}: {reason}); put the checkpoint "
            "file under paths.pretrained_dir and point `pretrained` at it"
        ) from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch.load, strict load
        raise _checkpoint_error(err, source, what, name) from None
    model.reset_classifier(0)
    return model


# ---------------------------------------------------------------------------
# Any timm model with forward_intermediates
# ---------------------------------------------------------------------------


class TimmEncoder(nn.Module):
    """A timm model as a multi-level encoder: its ``forward_intermediates`` at ``indices``.

    Args:
        name: timm model name (ConvNeXt, Swin, PVTv2, ResNet, EfficientNet, ViT, ...).
        pretrained: see ``create_timm_model`` (None, a file, or ``"hub"``).
        indices: which intermediates (``feature_info`` entries: stages, or blocks for a ViT);
            None = all of them.
        norm: apply the model's final norm to every intermediate (ViTs).
        what: how loading errors name the weights (default: ``name``).
        kwargs: model arguments for ``timm.create_model``.

    ``forward(x)``: x (B, 3, H, W) -> [(B, out_channels[i], H/strides[i], W/strides[i])].
    The timm model is ``self.model``, so state-dict keys read ``model.<timm key>``.
    """

    def __init__(
        self,
        name: str,
        pretrained: str | Path | None = None,
        indices: Sequence[int] | None = None,
        norm: bool = False,
        what: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        self.model = create_timm_model(name, pretrained, what, **kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(
                f"timm model {name!r} has no forward_intermediates: choose another encoder"
            )
        info = self.model.feature_info
        self.indices = list(range(len(info))) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not -len(info) <= i < len(info)]
        if bad:
            raise ValueError(f"indices {bad} out of range: {name} has {len(info)} feature levels")
        self.norm = norm
        self.out_channels: tuple[int, ...] = tuple(info[i]["num_chs"] for i in self.indices)
        self.strides: tuple[int, ...] = tuple(info[i]["reduction"] for i in self.indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) -> [(B, C_i, H/s_i, W/s_i)] for the chosen ``indices``."""
        return self.model.forward_intermediates(
            x, indices=self.indices, norm=self.norm, intermediates_only=True
        )

    def layer_ids(self) -> dict[str, int]:
        """Depth of every parameter (name as in ``named_parameters()``) for layer-wise lr decay,
        from timm's ``group_matcher`` (as timm's ``param_groups_layer_decay``): the stem is 0,
        block i is i + 1, the last block and final norm are the top; parameters outside the
        timm model (an adapter) are at the top too."""
        ids = group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)
        top = max(ids.values())
        return {
            name: ids.get(name.removeprefix("model."), top) if name.startswith("model.") else top
            for name, _ in self.named_parameters()
        }


# ---------------------------------------------------------------------------
# MiT
# ---------------------------------------------------------------------------


# The transformers names of a MiT block's parts (``SegformerLayer``) -> the NVlabs names
# (``mix_transformer.Block``); key and value are one ``attn.kv`` there, stacked key first.
_TRANSFORMERS_BLOCK_PARTS = {
    "layer_norm_1.": "norm1.",
    "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
    "mlp.dense2.": "mlp.fc2.",
}


def is_transformers_mit(state_dict: Mapping[str, object]) -> bool:
    """Whether a state dict has the transformers MiT names (``...patch_embeddings.0...``)."""
    return any(".patch_embeddings." in f".{k}" for k in state_dict)


def mit_from_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers MiT names -> NVlabs names (the inverse of transformers'
    ``convert_segformer_original_to_pytorch.rename_keys`` + ``read_in_k_v``).

    ``segformer.encoder.`` (``SegformerForImageClassification``) or ``encoder.``
    (``SegformerModel``) prefixes are dropped; ``patch_embeddings.i.{proj,layer_norm}`` ->
    ``patch_embed{i+1}.{proj,norm}``; ``block.i.j.`` -> ``block{i+1}.j.`` with the parts of
    ``_TRANSFORMERS_BLOCK_PARTS`` and ``attention.self.{key,value}`` stacked into ``attn.kv``
    (key rows first); ``layer_norm.i`` -> ``norm{i+1}``; ``classifier`` -> ``head``. Any
    other key (a half of key/value, a decode head) is kept under its own name, so the strict
    load names it.
    """
    out: dict[str, Tensor] = {}
    kv: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in state_dict.items():
        k = key.removeprefix("segformer.").removeprefix("encoder.")
        if k.startswith("classifier."):
            out["head." + k.removeprefix("classifier.")] = value
            continue
        m = re.fullmatch(r"patch_embeddings\.(\d+)\.(proj|layer_norm)\.(\w+)", k)
        if m:
            part = "proj" if m[2] == "proj" else "norm"
            out[f"patch_embed{int(m[1]) + 1}.{part}.{m[3]}"] = value
            continue
        m = re.fullmatch(r"layer_norm\.(\d+)\.(\w+)", k)
        if m:
            out[f"norm{int(m[1]) + 1}.{m[2]}"] = value
            continue
        m = re.fullmatch(r"block\.(\d+)\.(\d+)\.(.+)", k)
        if m is None:
            out[key] = value
            continue
        prefix, rest = f"block{int(m[1]) + 1}.{m[2]}.", m[3]
        half = re.fullmatch(r"attention\.self\.(key|value)\.(\w+)", rest)
        if half:
            kv.setdefault(f"{prefix}attn.kv.{half[2]}", {})[half[1]] = (key, value)
            continue
        new = next((n for o, n in _TRANSFORMERS_BLOCK_PARTS.items() if rest.startswith(o)), None)
        if new is None:
            out[key] = value
        else:
            old = next(o for o in _TRANSFORMERS_BLOCK_PARTS if rest.startswith(o))
            out[prefix + new + rest[len(old) :]] = value
    for name, halves in kv.items():
        if set(halves) == {"key", "value"}:
            out[name] = torch.cat([halves["key"][1], halves["value"][1]], dim=0)
        else:
            out.update(dict(halves.values()))
    return out


def load_mit_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load MiT ImageNet weights from ``path`` into timm's ``name`` model, strictly.

    Args:
        model: timm ``pvt_v2_b*`` built with MiT's mlp ratios and no classifier.
        path: an NVlabs ``mit_b*.pth``, a timm-layout file, or a transformers
            ``model.safetensors`` / ``pytorch_model.bin`` of ``nvidia/mit-b*``.
        name: the timm model name (for messages).

    Raises FileNotFoundError (no file) and CheckpointError (unreadable, or keys / shapes that
    differ: all named, after conversion), each one line.
    """
    what = "MiT ImageNet"
    path = _checkpoint_file(path, what)
    try:
        state_dict = timm_load_state_dict(str(path))  # .safetensors by extension, else torch
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise _checkpoint_error(err, path, what, name) from None
    except safetensors.SafetensorError as err:
        raise _checkpoint_error(err, path, what, name) from None
    keys = "keys after timm's conversion"
    if is_transformers_mit(state_dict):
        state_dict = mit_from_transformers(state_dict)
        keys = "transformers layout; keys after conversion to timm's"
    state_dict = pvt_v2_checkpoint_filter(state_dict, model)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise _checkpoint_error(err, path, what, name, keys) from None


def download_mit(variant: str) -> Path:
    """``nvidia/mit-<variant>`` from the Hugging Face hub (``model.safetensors``, else
    ``pytorch_model.bin``) through ``huggingface_hub``'s cache; where the hub cannot be
    reached, an OSError saying in one line what to download and where to point."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo = f"nvidia/mit-{variant}"
    url = f"https://huggingface.co/{repo}/resolve/main"
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as err:  # noqa: BLE001 - network, HTTP, cache: all end the same way
            if isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
                continue  # the repo has no such file: try the next one
            reason = " ".join(str(err).split())[:200]
            raise OSError(
                f"cannot download {repo} from the Hugging Face hub ({type(err).__name__}: "
                f"{reason}); download {url}/model.safetensors (or pytorch_model.bin) where the "
                "network allows and set model.encoder.pretrained=<that file>"
            ) from None
    raise OSError(
        f"{repo} on the Hugging Face hub has neither model.safetensors nor pytorch_model.bin; "
        f"download the NVlabs mit_{variant}.pth and set model.encoder.pretrained=<that file>"
    )


class MiT(TimmEncoder):
    """Mix Transformer encoder (SegFormer) MiT-B0..B5: timm's ``pvt_v2_b*`` with
    ``mlp_ratios=(4, 4, 4, 4)`` (pvt_v2_b0..b4 default to (8, 8, 4, 4)).

    Args:
        variant: ``"b0"`` .. ``"b5"``.
        pretrained: the ImageNet-1k weights: the NVlabs file (``mit_b5.pth``, the one DAFormer,
            HRDA and MIC start from), the transformers file of ``nvidia/mit-b5`` on the
            Hugging Face hub (``model.safetensors`` or ``pytorch_model.bin``), ``"hub"`` to
            download the latter, or None (random init).
        drop_path_rate: stochastic depth, linearly increasing over all blocks (MiT: 0.1).
        depths: blocks per stage, overriding the variant's (for tiny test models only).
        grad_checkpointing: activation checkpointing of the blocks (timm's
            ``set_grad_checkpointing``): a block's activations are recomputed in the backward
            instead of kept, for about one more encoder forward of compute
            (``benchmarks/cuda_readiness.py --memory`` predicts the saving; docs/benchmarks.md).

    ``forward(x)``: x (B, 3, H, W) normalised -> 4 maps (B, out_channels[i], H/s_i, W/s_i)
    with strides s = (4, 8, 16, 32) (ceil for sizes not divisible by the stride).
    """

    def __init__(
        self,
        variant: str = "b5",
        pretrained: str | None = None,
        drop_path_rate: float = 0.1,
        depths: Sequence[int] | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        if variant not in MIT_ARCHS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_ARCHS)}")
        if pretrained is not None and str(pretrained) == HUB:
            pretrained = download_mit(variant)
        elif pretrained is not None:
            _checkpoint_file(pretrained, "MiT ImageNet")  # before building a large model
        overrides = {} if depths is None else {"depths": tuple(depths)}
        super().__init__(
            f"pvt_v2_{variant}",
            None,
            what="MiT ImageNet",
            mlp_ratios=(4, 4, 4, 4),
            drop_path_rate=drop_path_rate,
            **overrides,
        )
        self.variant = variant
        self.model.set_grad_checkpointing(grad_checkpointing)
        if pretrained is not None:
            load_mit_weights(self.model, pretrained, f"pvt_v2_{variant}")


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


def resnet_checkpoint_filter(
    state_dict: Mapping[str, Tensor], model: nn.Module | None = None
) -> dict[str, Tensor]:
    """Map an mmcv ``resnet*_v1c`` checkpoint onto timm ``resnet*c`` names (timm-layout files
    pass through) and drop the ImageNet classifier ``fc.*``. BatchNorm counters that old
    files lack are taken from ``model`` (BatchNorm fills them itself)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        for old, new in _MMCV_STEM_TO_TIMM.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    if model is not None:
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                out.setdefault(key, value)
    return out


class ResNetV1c(TimmEncoder):
    """ResNet-V1c (deep stem) with dilated last stages, output stride 8 (DeepLabV2).

    Args:
        depth: 50 or 101 (timm ``resnet50c`` / ``resnet101c``).
        pretrained: path to an ImageNet checkpoint (timm or mmcv ``resnet*_v1c`` layout), or None.

    ``forward(x)``: x (B, 3, H, W) -> 4 maps of layer1..layer4 with channels
    (256, 512, 1024, 2048) and strides (4, 8, 8, 8). DLV2Head uses the last.
    """

    def __init__(self, depth: int = 101, pretrained: str | None = None) -> None:
        if depth not in (50, 101):
            raise ValueError(f"ResNetV1c depth must be 50 or 101, got {depth}")
        # timm's resnet has no filter for mmcv files: build, then load with timm's
        # load_checkpoint and our filter (strict).
        super().__init__(f"resnet{depth}c", None, indices=(1, 2, 3, 4), output_stride=8)
        if pretrained is not None:
            what = "ResNet-V1c ImageNet"
            path = _checkpoint_file(pretrained, what)
            try:
                load_checkpoint(
                    self.model, str(path), strict=True, filter_fn=resnet_checkpoint_filter
                )
            except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
                raise _checkpoint_error(err, path, what, f"resnet{depth}c") from None
