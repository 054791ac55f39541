"""Every experiment's training step on fake CUDA tensors (no GPU), scaled down but complete.

``benchmarks/cuda_readiness.py`` runs the same at paper size (one line per experiment) and
predicts the step's peak GPU memory. Here: the ten experiments at 1-block encoders and 64 px
crops (every part of the step runs: teacher, ClassMix, augmentation, MIC masking, Feature
Distance, prototypes, HRDA crops, AdamW), the backward on fake CPU tensors (torch's autograd
engine needs a CUDA device for CUDA tensors), bugs planted to show the check fails on them,
and the memory method against a real CPU step measured by torch.profiler.

One shim, documented in the benchmark: ``Tensor.pin_memory()`` needs a CUDA driver, so under
the check it returns a recorded CPU copy, and only a non-blocking copy of such a copy counts
as an asynchronous host-to-device copy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

_path = Path(__file__).parents[1] / "benchmarks" / "cuda_readiness.py"
_spec = importlib.util.spec_from_file_location("cuda_readiness", _path)
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)


def _small(experiment: str):
    _, module, crop = cr.build(experiment, cr.small_overrides(experiment))
    return module, crop


@pytest.mark.parametrize("experiment", cr.EXPERIMENTS)
def test_every_experiment_steps_on_fake_cuda(experiment):
    module, crop = _small(experiment)
    row = cr.trace_cuda(module, crop)
    params = list(module.parameters())
    assert params and all(isinstance(p, FakeTensor) and p.device.type == "cuda" for p in params)
    assert all(b.device.type == "cuda" for b in module.buffers())
    # The only host reads are of CPU random numbers: HRDA's detail-crop corner (y1, x1) once
    # per student pass (source, mixed and MIC's masked image).
    passes = 3 if experiment.startswith("mic") else 2
    expected = passes if experiment.startswith(("hrda", "mic")) else 0
    assert sum(row["host_reads"].values()) == 2 * expected
    assert all("get_crop_box" in site for site in row["host_reads"])


def _plant_cpu_buffer(module):
    # A buffer left on the CPU, e.g. a tensor kept as a plain attribute that .to() skips.
    module.student.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)


def _wrap_forward(module, extra):
    student = module.student
    forward_train = student.forward_train

    def planted(images, *args, **kwargs):
        return forward_train(extra(images), *args, **kwargs)

    student.forward_train = planted


def _plant_cpu_tensor(module):
    _wrap_forward(module, lambda x: x * torch.ones(x.shape[-2:]))  # made on the CPU


def _plant_cpu_generator(module):
    generator = torch.Generator().manual_seed(0)  # a CPU generator for a CUDA tensor
    _wrap_forward(
        module, lambda x: x + 0 * torch.rand(x.shape, generator=generator, device=x.device)
    )


def _plant_host_sync(module):
    _wrap_forward(module, lambda x: x / x.max().item())


def _plant_blocking_copy(module):
    _wrap_forward(module, lambda x: x * torch.ones(x.shape[-1]).to(x.device))


HERE = "test_cuda_readiness.py"


@pytest.mark.parametrize(
    "plant, message, site",
    [
        (_plant_cpu_buffer, "a CPU tensor .* meets a CUDA tensor", "segmentor.py:"),
        (_plant_cpu_tensor, "a CPU tensor .* meets a CUDA tensor", HERE),
        (_plant_cpu_generator, "a cpu generator draws a .'cuda'. tensor", HERE),
        (_plant_host_sync, "host sync: aten._local_scalar_dense reads a CUDA tensor", HERE),
        (_plant_blocking_copy, "host sync: .* copies pageable CPU memory to CUDA blocking", HERE),
    ],
)
def test_the_check_fails_on_planted_bugs(plant, message, site):
    module, crop = _small("daformer_baseline")
    with pytest.raises(cr.CudaReadinessError, match=message) as err:
        cr.trace_cuda(module, crop, plant=plant)
    assert f" at {site}" in str(err.value) or f" at models/{site}" in str(err.value)


def test_backward_on_fake_cpu_and_the_memory_method_against_a_real_cpu_step():
    """mic_gaussian (every part of the step): forward, backward and AdamW on fake CPU tensors
    under MemTracker, against the same step run for real under torch.profiler (allocator
    totals). MemTracker sees tensors at the dispatcher, not the buffers kernels allocate
    inside themselves: it predicts a little less than the allocator reports."""
    result = cr.measured_cpu_step("mic_gaussian", cr.small_overrides("mic_gaussian"))
    tracked = result["tracked"]
    start, end, after = tracked["cpu_start"], tracked["cpu_end"], tracked["cpu_backward"]
    # Steady state: AdamW states, no gradients; the forward keeps activations; the backward
    # leaves one fp32 gradient per trainable parameter and no activations.
    assert start["GRAD"] == 0 and start["OPT"] > 0 and end["ACT"] > 0 and after["ACT"] == 0
    # AdamW keeps two states (exp_avg, exp_avg_sq) per gradient (and 0-dim step counters).
    assert after["GRAD"] > 0 and start["OPT"] == pytest.approx(2 * after["GRAD"], rel=1e-3)
    measured, predicted, held = result["measured"], result["predicted"], result["baseline"]
    assert 0.8 * measured <= predicted <= 1.02 * measured  # the step's peak above its start
    assert predicted + held == pytest.approx(measured + held, rel=0.07)  # the whole peak


def test_encoder_activation_checkpointing_is_the_same_computation():
    """The memory switch (model.encoder.grad_checkpointing=true): every MiT stage recomputes
    its blocks in the backward; outputs and gradients are those of the plain encoder."""
    from mpcl.models.encoders import MiT

    torch.manual_seed(0)
    plain = MiT("b0", depths=[1, 1, 1, 1], drop_path_rate=0.1)
    checkpointed = MiT("b0", depths=[1, 1, 1, 1], drop_path_rate=0.1, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(s.grad_checkpointing for s in checkpointed.model.stages)
    assert not any(s.grad_checkpointing for s in plain.model.stages)
    x = torch.rand(2, 3, 64, 64)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same drop-path draws (checkpointing replays them)
        loss = sum(f.square().mean() for f in model(x))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)
