"""The FLOP benchmark keeps working (scaled down) and counts what a direct formula gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

_path = Path(__file__).parents[1] / "benchmarks" / "flops.py"
_spec = importlib.util.spec_from_file_location("flops", _path)
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)

TINY = ["--crop", "64", "--tiny"]


def _mit_flops(height: int, width: int, depths, batch: int) -> int:
    """MiT-B5's forward FLOPs (2 per multiply-add of its matmuls and convolutions).

    Per block of a stage with C channels, N tokens and N_kv = N / sr^2 keys: q and output
    projections 2 N C^2, the spatial-reduction conv N_kv C^2 sr^2, keys/values 2 N_kv C^2,
    attention 2 N N_kv C, Mix-FFN 8 N C^2 + a 3x3 depthwise conv 36 N C. Patch embeddings:
    a 7x7 stride-4 conv from RGB, then 3x3 stride-2 convs.
    """
    dims, srs = (64, 128, 320, 512), (8, 4, 2, 1)
    macs, c_in = 0, 3
    h, w, kernel, stride = height, width, 7, 4
    for c, depth, sr in zip(dims, depths, srs, strict=True):
        h, w = (
            (h + 2 * (kernel // 2) - kernel) // stride + 1,
            (w + 2 * (kernel // 2) - kernel) // stride + 1,
        )
        n, n_kv = h * w, (h // sr) * (w // sr)
        macs += n * c * c_in * kernel**2
        block = 2 * n * c * c + 2 * n_kv * c * c + 2 * n * n_kv * c + 8 * n * c * c + 36 * n * c
        if sr > 1:
            block += n_kv * c * c * sr**2
        macs += depth * block
        c_in, kernel, stride = c, 3, 2
    return 2 * macs * batch


def test_conv_backward_counts_grouped_convolutions_once():
    """torch 2.14's formula counts a depthwise conv's grad_weight ``groups`` times."""
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    for groups in (1, 4, 64):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups)
        with FlopCounterMode(display=False) as counter:
            conv(x)
        forward = counter.get_total_flops()
        assert forward == 2 * 2 * 64 * 64 * 9 * 64 // groups  # B HW C_out C_in/g k^2
        mapping = {torch.ops.aten.convolution_backward: flops.conv_backward_flop}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            conv(x).sum().backward()
        assert counter.get_total_flops() == 3 * forward  # grad_input + grad_weight


def test_flops_benchmark_table_and_counts(capsys):
    rows = flops.main(
        ["--experiments", "daformer_baseline", "daformer_gaussian", *TINY,
         "--s-per-iter", "0.5", "--peak-tflops", "0.1"]
    )  # fmt: skip
    base, mpcl = rows
    # The frozen ImageNet encoder (Feature Distance) runs MiT-B5 once on the 2 source crops.
    assert base["imagenet_encoder"] == _mit_flops(64, 64, (1, 1, 1, 1), batch=2)
    # The baseline student runs the teacher's network twice (source, mixed): same FLOPs.
    assert base["student_fwd"] == 2 * base["teacher"]
    # MPCL adds the prototype head to both student passes and the prototype losses.
    assert mpcl["teacher"] == base["teacher"] and mpcl["student_fwd"] > base["student_fwd"]
    assert base["prototype"] == 0 < mpcl["prototype"]
    for r in rows:
        parts = ("student_fwd", "student_bwd", "teacher", "imagenet_encoder", "augment")
        assert r["total"] == sum(r[k] for k in parts) + r["prototype"]
        # Backward = 2x forward (grad input + grad weight), less the input's gradient.
        assert 1.9 < r["student_bwd"] / r["student_fwd"] <= 2.0
        assert r["tflops"] == pytest.approx(r["total"] / 0.5 / 1e12)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / 0.1)
    out = capsys.readouterr().out
    assert "| daformer_gaussian | 64 |" in out and "% of peak" in out


@pytest.mark.slow
def test_meta_tensors_count_what_real_tensors_count():
    meta = flops.count_flops("mic_gaussian", crop=64, tiny=True, device="meta")
    real = flops.count_flops("mic_gaussian", crop=64, tiny=True, device="cpu")
    assert meta == real


@pytest.mark.parametrize("experiment", ["mic_gaussian", "mic_baseline"])
def test_no_student_pass_runs_the_prototype_head_for_nothing(experiment):
    """Per pass, on meta tensors: the source and mixed passes feed the prototype losses (head
    on), MIC's masked pass feeds only its segmentation loss (head off: logits-only FLOPs)."""
    r = flops.count_pass_flops(experiment, crop=64, tiny=True)
    (source, src_head), (mixed, mix_head), (masked, masked_head) = r["passes"]
    with_head = experiment.endswith("gaussian")
    assert (src_head, mix_head, masked_head) == (with_head, with_head, False)
    assert source == mixed == r["with_features"]
    assert masked == r["logits_only"]
    if with_head:  # the head is a large part of a forward: skipping it shows in the count
        assert r["logits_only"] < 0.6 * r["with_features"]


def test_skipping_the_prototype_head_changes_no_loss_gradient_or_random_draw():
    """MIC's masked pass without the prototype head: the same segmentation loss, gradients
    and random stream as the full forward (the head draws no random numbers)."""
    _, module, _ = flops.step_time.build(
        "mic_gaussian", flops.step_time._model_overrides("mic_gaussian", True, 64), "cpu"
    )
    student = module.student.train()
    images, labels = torch.rand(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    results = []
    for with_features in (True, False):
        torch.manual_seed(0)
        student.zero_grad(set_to_none=True)
        loss = student.seg_loss(student.forward_train(images, with_features), labels, None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, torch.get_rng_state()))
    (loss_a, grads_a, rng_a), (loss_b, grads_b, rng_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(rng_a, rng_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
