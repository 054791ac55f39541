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


def test_backward_and_adamw_run_on_fake_cpu_tensors():
    module, crop = _small("mic_gaussian")
    row = cr.trace_cpu(module, crop, memory=True)
    start, end, peak = row["cpu_start"], row["cpu_end"], row["cpu_peak"]
    assert start["GRAD"] == 0 and start["OPT"] > 2 * start["PARAM"] / 3  # steady state
    assert end["ACT"] > 0 and peak["GRAD"] > 0  # the forward kept activations; grads came
    assert peak["Total"] >= max(start["Total"], end["Total"])


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


def test_memory_method_agrees_with_a_real_cpu_step():
    """MemTracker on fake CPU tensors against torch.profiler's allocator totals of the same
    step run for real: the step's peak above the memory it starts with."""
    result = cr.measured_cpu_step("daformer_baseline", cr.small_overrides("daformer_baseline"))
    assert result["measured"] > 0
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.05)
