"""Forward + backward of segmentation backbones beside ours, as speed anchors (issue #13).

    # on a GPU (issue #13's anchors: batch 2, 1024 x 1024, bf16 autocast)
    python benchmarks/anchors.py --size 1024 --iters 20 --warmup 5
    # on a CPU, scaled down (what the test runs)
    python benchmarks/anchors.py --size 64 --iters 1 --warmup 1 --tiny

Rows: mpcl's MiT-B5 + DAFormer head (``model=daformer``, the student of every paper
experiment, no prototype head); timm's ``pvt_v2_b5`` (PVTv2-B5, the same family as MiT-B5),
its feature pyramid summed into a scalar loss; transformers' ``SegformerForSemanticSegmentation``
with the SegFormer-B5 configuration (skipped, with the reason, where transformers is not
installed). Random weights and images; each step is forward, a cross-entropy (or sum) loss,
backward, and parameter gradients cleared. Prints one Markdown table: median s/iter and peak
memory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate


def mpcl_daformer(tiny: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    overrides = ["model=daformer", "model.encoder.pretrained=null", "model.proto_head=null"]
    if tiny:
        overrides.append("model.encoder.depths=[1,1,1,1]")
    GlobalHydra.instance().clear()
    with initialize_config_module("mpcl.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    model = instantiate(cfg.model)
    return _segmentation_step(model, lambda m, x: m.forward_train(x)["logits"])


def timm_pvt_v2_b5(tiny: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    import timm

    kwargs = {"depths": (1, 1, 1, 1)} if tiny else {}
    model = timm.create_model("pvt_v2_b5", pretrained=False, features_only=True, **kwargs)
    return _segmentation_step(model, lambda m, x: sum(f.float().mean() for f in m(x)))


def transformers_segformer_b5(tiny: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    # SegFormer-B5 (nvidia/mit-b5): hidden sizes 64/128/320/512, depths 3/6/40/3, head 768.
    config = SegformerConfig(
        depths=[1, 1, 1, 1] if tiny else [3, 6, 40, 3],
        hidden_sizes=[64, 128, 320, 512],
        decoder_hidden_size=768,
        num_labels=19,
    )
    model = SegformerForSemanticSegmentation(config)
    return _segmentation_step(model, lambda m, x: m(pixel_values=x).logits)


def _segmentation_step(model: torch.nn.Module, forward: Callable) -> Callable:
    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = forward(model, images)
        if out.dim() == 0:  # a backbone: its features' sum
            loss = out
        else:
            logits = F.interpolate(
                out.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False
            )
            loss = F.cross_entropy(logits, labels, ignore_index=255)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    step.model = model  # type: ignore[attr-defined]
    return step


ANCHORS: dict[str, Callable[[bool], Callable]] = {
    "mpcl MiT-B5 + DAFormer head": mpcl_daformer,
    "timm pvt_v2_b5 (backbone)": timm_pvt_v2_b5,
    "transformers SegFormer-B5": transformers_segformer_b5,
}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="1-block stages (CPU test)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    torch.set_float32_matmul_precision("high")
    rows = []
    for name, make in ANCHORS.items():
        try:
            step = make(args.tiny)
        except ImportError as e:
            rows.append({"name": name, "skipped": f"not installed ({e.name})"})
            continue
        step.model.to(device).train()
        images = torch.rand(args.batch, 3, args.size, args.size, device=device)
        labels = torch.randint(0, 19, (args.batch, args.size, args.size), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        for i in range(args.warmup + args.iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                step(images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        params = sum(p.numel() for p in step.model.parameters()) / 1e6
        rows.append({"name": name, "s_iter": statistics.median(times), "peak_gb": peak,
                     "params_m": params})  # fmt: skip
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    precision = "bf16 autocast" if bf16 else "fp32"
    print(f"device: {device_name}, torch {torch.__version__}, batch {args.batch}, "
          f"{args.size}x{args.size}, {precision}, median of {args.iters} after {args.warmup}")  # fmt: skip
    print("| model | parameters (M) | s/iter fwd+bwd (median) | peak GB |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | - | {r['skipped']} | - |")
        else:
            print(f"| {r['name']} | {r['params_m']:.1f} | {r['s_iter']:.3f} | {r['peak_gb']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
