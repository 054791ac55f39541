"""FLOPs of one training iteration per experiment, at full size, and the implied GPU use.

    # the nine GTA -> Cityscapes experiments at their size (MiT-B5, 640 / 1024 crops, batch 2):
    python benchmarks/flops.py
    # the forward FLOPs of each student pass (source, mixed, MIC's masked image):
    python benchmarks/flops.py --passes --experiments mic_gaussian
    # the fraction of the H100's dense bf16 peak they would use at a measured s/iter:
    python benchmarks/flops.py --experiments mic_gaussian --s-per-iter 0.42
    # Hydra overrides go before --experiments (which takes every word after it):
    python benchmarks/flops.py model.proto_head.fusion=mlp --experiments daformer_gaussian
    # on a CPU, scaled down, on real tensors (what the slow test compares with meta):
    python benchmarks/flops.py --experiments daformer_gaussian --crop 64 --tiny --device cpu

An iteration is the forward + backward of ``UDAModule.training_step`` (teacher EMA and
pseudo-labels, ClassMix + strong augmentation, the student on the source / mixed / masked
images, the frozen ImageNet encoder of Feature Distance, the prototype losses), the optimizer
step aside. FLOPs are ``torch.utils.flop_counter.FlopCounterMode``'s: matmuls, convolutions
and attention (2 per multiply-add; elementwise ops, norms and softmax are not counted),
attention counted as its plain matmuls (no recomputation), which is the "model FLOPs" of MFU.

By default the model runs on the meta device: shapes only, no memory and no arithmetic, so a
full-size step is counted on any CPU in about a minute (mostly building MiT-B5 three times). The prototype learner cannot run on meta
tensors (it selects pixels by their label), so it runs on real CPU tensors of the features'
shapes, every pixel labelled with weight 1 (an upper bound: ignored and zero-weight pixels
skip the prototype losses) and every class initialised (steady state).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from mpcl.prototypes import PrototypeLearning

# benchmarks/ is not a package: load the step-time benchmark's model building from its file.
_spec = importlib.util.spec_from_file_location(
    "step_time", Path(__file__).with_name("step_time.py")
)
step_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_time)

EXPERIMENTS = step_time.FRAMEWORK_EXPERIMENTS
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense (no sparsity) bf16 tensor-core peak
PARTS = ("teacher", "imagenet_encoder", "augment", "prototype")  # metered calls


def conv_backward_flop(
    grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
    output_padding, groups, output_mask, out_shape=None,
) -> int:  # fmt: skip
    """FLOPs of a convolution's backward: the forward's for each of grad_input, grad_weight.

    Replaces torch's formula, whose grad_weight term ignores ``groups``: torch 2.14 counts the
    weight gradient of a grouped conv ``groups`` times too high (a 256-channel depthwise conv's
    backward as 257x its forward instead of 2x; pytorch/pytorch PR 183405 divides it by
    ``groups``). MiT's Mix-FFN has such a depthwise conv in every block.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


class Meter:
    """Splits a FlopCounterMode's global count by the calls it was made in.

    (FlopCounterMode's own per-module rows are best effort: the teacher and HRDA are called
    through methods other than ``forward``, and backward rows overlap.)
    """

    def __init__(self, counter: FlopCounterMode) -> None:
        self.counter = counter
        self.parts: dict[str, int] = {}

    def wrap(self, part: str, fn):
        def metered(*args, **kwargs):
            before = self.counter.get_total_flops()
            out = fn(*args, **kwargs)
            self.parts[part] = self.parts.get(part, 0) + self.counter.get_total_flops() - before
            return out

        return metered


class RealPrototypes(nn.Module):
    """Runs a prototype learner on real CPU tensors shaped like the (meta) features.

    Its forward and backward both run (and are counted) inside this forward; it returns the
    learner's outputs as meta zeros, the loss joined to the features' graph so that the
    student's backward through the prototype head is counted as usual.
    """

    def __init__(self, learner: nn.Module) -> None:
        super().__init__()
        self.learner = learner
        self.dim = learner.dim
        self.resolutions = learner.resolutions
        self.lambda_d = learner.lambda_d

    # The learner's Eq. 18 mixing, calling this module's forward per resolution.
    forward_views = PrototypeLearning.forward_views

    def forward(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        resolution: str | None = None,
        **masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        b, d, h, w = features.shape
        x = torch.randn(b, d, h, w, requires_grad=True)
        y = torch.randint(0, self.learner.num_classes, (b, h, w))  # every pixel labelled
        out = self.learner(x, y, torch.ones(b, h, w), resolution=resolution)
        out["loss"].backward()
        zero = features.sum() * 0.0
        return {k: zero if k == "loss" else zero.detach() for k in out}


def count_flops(
    experiment: str,
    overrides: list[str] | None = None,
    crop: int | None = None,
    tiny: bool = False,
    device: str = "meta",
) -> dict:
    """FLOPs of one forward + backward of the experiment's training step (batch 2).

    Returns:
        dict with experiment, crop and FLOPs: total; teacher (pseudo-labels),
        imagenet_encoder (Feature Distance), augment (the blur), prototype (the learner's
        forward + backward), student_fwd (the rest of the forward: the student on the
        source, mixed and masked images, heads included) and student_bwd (the backward).
    """
    overrides = step_time._model_overrides(experiment, tiny, crop) + list(overrides or [])
    torch.manual_seed(0)
    cfg, module, _ = step_time.build(experiment, overrides, torch.device("cpu"))
    crop = crop or int(cfg.benchmark.crop_size)
    learner = module.prototype  # step_time.build initialised every class: steady state
    module.prototype = None
    module.to(device)
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
    )
    meter = Meter(counter)
    if learner is not None:
        module.prototype = RealPrototypes(learner)
        module.prototype.forward = meter.wrap("prototype", module.prototype.forward)
    if module.teacher is not None:
        module.teacher.model.predict = meter.wrap("teacher", module.teacher.model.predict)
    if module.feature_distance is not None:
        encoder = module.feature_distance.encoder
        encoder.forward = meter.wrap("imagenet_encoder", encoder.forward)
    if module.strong_augment is not None:
        augment = module.strong_augment
        augment.apply = meter.wrap("augment", augment.apply)
    batch = step_time.random_batch(crop, torch.device(device))
    # The math attention path everywhere: meta tensors take it anyway, and the CPU's fused
    # kernel has no FLOP formula.
    with sdpa_kernel(SDPBackend.MATH), counter:
        loss = module.training_step(batch, 0)["loss"]
        forward = counter.get_total_flops()
        loss.backward()
        total = counter.get_total_flops()
    row = {"experiment": experiment, "crop": crop, "total": total}
    row |= {part: meter.parts.get(part, 0) for part in PARTS}
    row["student_fwd"] = forward - sum(row[part] for part in PARTS)
    row["student_bwd"] = total - forward
    return row


def count_pass_flops(
    experiment: str,
    overrides: list[str] | None = None,
    crop: int | None = None,
    tiny: bool = False,
) -> dict:
    """Forward FLOPs of each student pass of one training step, on meta tensors (no GPU).

    Returns dict with ``passes``: per ``student.forward_train`` call of the step, in order
    (source, mixed, then MIC's masked image), (FLOPs, whether it ran the prototype head);
    ``with_features`` and ``logits_only``: the FLOPs of one forward with and without the
    prototype head on the same batch (equal without a head).
    """
    overrides = step_time._model_overrides(experiment, tiny, crop) + list(overrides or [])
    torch.manual_seed(0)
    cfg, module, _ = step_time.build(experiment, overrides, torch.device("cpu"))
    crop = crop or int(cfg.benchmark.crop_size)
    learner = module.prototype
    module.prototype = None
    module.to("meta")
    if learner is not None:
        module.prototype = RealPrototypes(learner)
    counter = FlopCounterMode(display=False)
    student, passes = module.student, []
    forward_train = student.forward_train

    def metered(images, *args, **kwargs):
        before = counter.get_total_flops()
        out = forward_train(images, *args, **kwargs)
        has_features = any(
            v is not None
            for k, v in out.items()
            if k.endswith("features") and k != "encoder_features"
        )
        passes.append((counter.get_total_flops() - before, has_features))
        return out

    student.forward_train = metered
    batch = step_time.random_batch(crop, torch.device("meta"))
    with sdpa_kernel(SDPBackend.MATH), counter:
        module.training_step(batch, 0)
    del student.forward_train  # the class's method again
    reference = {}
    for name, flag in (("with_features", True), ("logits_only", False)):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as single:
            student.forward_train(batch["source_image"], with_features=flag)
        reference[name] = single.get_total_flops()
    return {"experiment": experiment, "crop": crop, "passes": passes} | reference


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    parser.add_argument(
        "--s-per-iter",
        type=float,
        default=0.30,
        help="seconds per iteration the GPU use is computed at (default: the 0.30 target)",
    )
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    parser.add_argument("--crop", type=int, default=None, help="override the crop")
    parser.add_argument("--tiny", action="store_true", help="1-block MiT stages (CPU test)")
    parser.add_argument(
        "--device", default="meta", help="meta (shapes only, default) or cpu (real tensors)"
    )
    parser.add_argument(
        "--passes", action="store_true", help="forward GFLOP of each student pass instead"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (before --experiments)")
    args = parser.parse_args(argv)
    if args.passes:
        rows = [count_pass_flops(e, args.overrides, args.crop, args.tiny) for e in args.experiments]
        print(
            "| experiment | crop | student passes: forward GFLOP (prototype head) | "
            "one forward with / without the head |"
        )
        print("| --- | ---: | --- | --- |")
        for r in rows:
            passes = ", ".join(f"{f * 1e-9:,.0f} ({'yes' if h else 'no'})" for f, h in r["passes"])
            print(
                f"| {r['experiment']} | {r['crop']} | {passes} | "
                f"{r['with_features'] * 1e-9:,.0f} / {r['logits_only'] * 1e-9:,.0f} |"
            )
        return rows
    rows = [
        count_flops(e, args.overrides, args.crop, args.tiny, args.device) for e in args.experiments
    ]
    g = 1e-9
    print(
        f"torch {torch.__version__}, FlopCounterMode on {args.device} tensors, batch 2; "
        f"GPU use at {args.s_per_iter:.2f} s/iter of a {args.peak_tflops:.0f} TFLOP/s peak"
    )
    print(
        "| experiment | crop | GFLOP / iter | student fwd | student bwd | teacher | "
        "FD encoder | augment | prototypes | MPCL extra | TFLOP/s | % of peak |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r, extra in zip(rows, step_time.overheads(rows, "total"), strict=True):
        tflops = r["total"] / args.s_per_iter / 1e12
        r["tflops"], r["peak_fraction"] = tflops, tflops / args.peak_tflops
        print(
            f"| {r['experiment']} | {r['crop']} | {r['total'] * g:,.0f} | "
            f"{r['student_fwd'] * g:,.0f} | {r['student_bwd'] * g:,.0f} | "
            f"{r['teacher'] * g:,.0f} | {r['imagenet_encoder'] * g:,.0f} | "
            f"{r['augment'] * g:,.1f} | {r['prototype'] * g:,.1f} | {extra} | "
            f"{tflops:.1f} | {100 * r['peak_fraction']:.1f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
