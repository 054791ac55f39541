"""Seconds per training iteration and peak memory of experiments, on random data.

    # on a GPU, full size (MiT-B5, batch 2, paper crops):
    python benchmarks/step_time.py --experiments daformer_baseline daformer_gaussian \
        hrda_baseline hrda_gaussian mic_baseline mic_gaussian --iters 30 --warmup 5
    # on a CPU, scaled down (what the test runs):
    python benchmarks/step_time.py --experiments daformer_baseline daformer_gaussian --iters 2 \
        --warmup 1 --crop 64 --tiny

An iteration is the whole training step of ``UDAModule`` (teacher EMA, pseudo-labels,
ClassMix, student forwards, prototype clustering/update/losses, MIC) + backward + AdamW step,
under the experiment's precision (bf16 autocast on GPU). The prototypes are initialised
before timing so the MPCL losses run as in steady state. Prints one Markdown table with the
median s/iter, peak memory, the MPCL overhead against the same framework's baseline, and the
projected hours for 60k iterations.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mpcl.run.build import build_module

# The paper's nine experiments (framework x prototype kind), the benchmarks' default set.
FRAMEWORK_EXPERIMENTS = [
    f"{framework}_{variant}"
    for framework in ("daformer", "hrda", "mic")
    for variant in ("baseline", "centroid", "gaussian")
]


def compose_experiment(experiment: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module("mpcl.conf", version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/mpcl-step-time"
    HydraConfig().set_config(cfg)
    return cfg


def _model_overrides(experiment: str, tiny: bool, crop: int | None) -> list[str]:
    multi = experiment.startswith(("hrda", "mic", "synthetic_hrda", "synthetic_mic"))
    prefix = "model"
    out = [f"{prefix}.encoder.pretrained=null"]
    if tiny and "vfm" in experiment:  # a 4-block, width-32 ViT: pyramid 8, 16, 32, 32
        out += [f"++{prefix}.encoder.{k}={v}" for k, v in (("depth", 4), ("embed_dim", 32))]
        out += [f"++{prefix}.encoder.num_heads=2", f"{prefix}.encoder.blocks=null"]
        out.append(f"{prefix}.decode_head.in_channels=[8,16,32,32]")
    elif tiny:
        out.append(f"{prefix}.encoder.depths=[1,1,1,1]")
    if crop and multi:
        half = crop // 2
        out += [
            f"model.hr_crop_size=[{half},{half}]",
            f"model.hr_slide_window=[{half},{half}]",
            f"model.hr_slide_stride=[{half // 2},{half // 2}]",
        ]
    if crop and experiment.startswith(("mic", "synthetic_mic")):
        out.append(f"uda.mic.block_size={max(8, crop // 16)}")
    return out


def build(experiment: str, overrides: list[str], device: torch.device):
    # The steady-state step: without the gradient-ratio diagnostic (every 50th step only).
    cfg = compose_experiment(experiment, ["uda.diagnostics_every=0", *overrides])
    module = build_module(cfg).to(device)
    prototype = module.prototype
    optimizer = module.configure_optimizers()["optimizer"]
    module.log = lambda *a, **k: None  # no Trainer: logging is a no-op
    module.optimizers = lambda: optimizer
    if prototype is not None:  # steady state: every class initialised
        bank = prototype.prototypes
        for c in range(bank.num_classes):
            means = torch.nn.functional.normalize(torch.randn(bank.K, bank.dim), dim=1)
            variances = torch.full_like(means, 1.0 / bank.dim) if hasattr(bank, "var") else None
            bank.initialize(
                c, means.to(device), None if variances is None else variances.to(device)
            )
    return cfg, module, optimizer


def random_batch(crop: int, device: torch.device, batch_size: int = 2) -> dict:
    """Source/target images (B, 3, crop, crop) in [0, 1] and blocky source labels (B, crop, crop)."""
    cells = torch.randint(0, 19, (batch_size, 1, crop // 32, crop // 32)).float()
    labels = torch.nn.functional.interpolate(cells, size=(crop, crop), mode="nearest")[:, 0].long()
    return {
        "source_image": torch.rand(batch_size, 3, crop, crop, device=device),
        "source_label": labels.to(device),
        "target_image": torch.rand(batch_size, 3, crop, crop, device=device),
    }


def time_iterations(
    module, optimizer, batch: dict, iters: int, warmup: int, bf16: bool
) -> list[float]:
    device = batch["source_image"].device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = module.training_step(batch, i)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def overheads(rows: list[dict], key: str) -> list[str]:
    """Per row, ``key`` against the same framework's ``*_baseline`` row ("+12.3%"), or "-"
    (a baseline itself, or no baseline measured)."""
    baselines = {
        r["experiment"].rsplit("_", 1)[0]: r[key]
        for r in rows
        if r["experiment"].endswith("baseline")
    }
    out = []
    for r in rows:
        base = baselines.get(r["experiment"].rsplit("_", 1)[0])
        is_baseline = r["experiment"].endswith("baseline")
        out.append(f"{100 * (r[key] / base - 1):+.1f}%" if base and not is_baseline else "-")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--crop", type=int, default=None, help="override the crop (default: the experiment's)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="1-block MiT stages or a 4-block ViT (CPU test)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("high")
    rows = []
    for experiment in args.experiments:
        overrides = _model_overrides(experiment, args.tiny, args.crop) + list(args.overrides)
        cfg, module, optimizer = build(experiment, overrides, device)
        crop = args.crop or int(cfg.benchmark.crop_size)
        bf16 = device.type == "cuda" and "bf16" in str(cfg.trainer.precision)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_iterations(
            module, optimizer, random_batch(crop, device), args.iters, args.warmup, bf16
        )
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append(
            {
                "experiment": experiment,
                "s_iter": statistics.median(times),
                "peak_gb": peak,
                "crop": crop,
            }
        )
        del module, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"device: {name}, torch {torch.__version__}, {args.iters} timed iterations after {args.warmup}"
    )
    print("| experiment | crop | s/iter (median) | peak GB | MPCL overhead | hours / 60k iters |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r, overhead in zip(rows, overheads(rows, "s_iter"), strict=True):
        r["overhead"] = overhead
        print(
            f"| {r['experiment']} | {r['crop']} | {r['s_iter']:.3f} | {r['peak_gb']:.1f} | {overhead} | "
            f"{r['s_iter'] * 60000 / 3600:.1f} |"
        )
    return rows


if __name__ == "__main__":
    main()
