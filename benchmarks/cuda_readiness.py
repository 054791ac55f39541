"""CUDA without a GPU: every full-size training step traced on fake CUDA tensors, its memory
predicted.

    # the ten paper-size experiments (MiT-B5 / DINOv2 ViT-L, 640 / 1024 crops, batch 2):
    python benchmarks/cuda_readiness.py
    python benchmarks/cuda_readiness.py mic_gaussian hrda_baseline
    # + the predicted peak GPU memory of one step, broken down (MemTracker, see below):
    python benchmarks/cuda_readiness.py --memory
    # the memory-saving switch (activation checkpointing of the encoder blocks):
    python benchmarks/cuda_readiness.py --memory mic_gaussian model.encoder.grad_checkpointing=true
    # scaled down (1-block encoder stages, 64 px crops), as the test runs it:
    python benchmarks/cuda_readiness.py --small
    # the memory method against a real CPU step measured by torch.profiler:
    python benchmarks/cuda_readiness.py --check-memory

Words that contain "=" are Hydra overrides for every experiment; the others name experiments.
Each experiment prints one line.

**The fake-CUDA check** (``trace_cuda``). The module is built as ``mpcl.train`` builds it (on
the CPU, steady state: every class has prototypes), then inside torch's ``FakeTensorMode``
(tensors with a device, shape and dtype but no data, so nothing is computed and no GPU is
needed) every parameter and buffer is moved to ``cuda`` (``to_empty``, what ``.to("cuda")``
moves), the batch is copied to ``cuda`` as Lightning copies a pinned batch, and
``UDAModule.training_step`` runs under CUDA's bf16
autocast policy (Lightning's ``bf16-mixed``; forced on, since ``torch.autocast("cuda")`` turns
itself off without a GPU), then an AdamW and lr-scheduler step on CUDA gradients. The step
fails (``CudaReadinessError``) on:

- a CPU tensor meeting a CUDA one (a module buffer left on the CPU, a CPU tensor made in the
  step): fake tensors check devices as CUDA kernels do (CPU 0-dim scalars allowed);
- a CPU generator used for a CUDA tensor (``torch.rand(..., device="cuda", generator=g)``);
- a host sync: a value or a data-dependent shape of a CUDA tensor read on the host
  (``.item()``, ``bool()``, ``nonzero``, boolean-mask indexing, ...: ``SYNC_OPS``), a copy
  from CUDA to the CPU, or a blocking / pageable copy from the CPU to CUDA; none is
  allowed (``ALLOWED_SYNCS``, empty; see there);
- a dtype that bf16 autocast breaks (an op given bf16 and fp32 operands it does not promote:
  the fake kernels check dtypes as the CUDA ones do), and a loss that is not fp32.

The step's random numbers are drawn on the CPU (``mpcl.distributed.rank_rand``) and only
copied to the device: ops whose tensors are all real CPU tensors run for real here, as they
run on the host beside a GPU, so the CPU-side reads (HRDA's crop corner, the augmentation's
branches) see real values. One shim: ``Tensor.pin_memory()`` needs a CUDA driver, so here it
returns a (recorded) CPU copy; a non-blocking copy of a tensor it returned counts as
asynchronous, any other CPU -> CUDA copy as a host sync.

Backward on fake CUDA tensors needs a CUDA device (torch's autograd engine asks the driver
for its streams: "hasPrimaryContext expects a valid device index"), so the whole step with
its backward and AdamW step runs a second time on fake CPU tensors under the CPU's bf16
autocast (``trace_cpu``; parameters, buffers and batch fake, the random numbers real). For
the same reason the gradient diagnostic that ``uda.diagnostics_every`` runs inside every
N-th step (``autograd.grad``) is switched off on fake CUDA (and under MemTracker); the
steady-state step that the check traces is the other N - 1. The steps that start a class's
prototypes (K-Means) are not traced either: they read flags to the host by design.

**The memory prediction** (``--memory``, ``predicted_peak``), bytes of live tensors (what
``torch.cuda.max_memory_allocated`` reports, without the caching allocator's slack),
by ``torch.distributed._tools.mem_tracker.MemTracker`` on fake tensors, which follows every
tensor's storage and files it as a parameter, buffer, gradient, optimizer state, activation
(made in a forward) or temporary (made in a backward):

1. the steady state: the AdamW states exist (one step on zero gradients first), no
   gradient is held when the step starts (``zero_grad(set_to_none=True)``, Lightning's);
2. one whole step on fake CPU tensors under the CPU's bf16 autocast: ``training_step``
   (teacher, ImageNet feature-distance encoder, student passes, prototypes, banks) +
   backward + AdamW: the peak and its breakdown;
3. CUDA's autocast keeps more in fp32 than the CPU's (LayerNorm and softmax outputs, for
   one), so the forward also runs on fake CUDA tensors under CUDA's policy (the check
   above, under MemTracker, which rounds CUDA blocks to 512 bytes as the caching allocator
   does): the activations (and backward temporaries) at the peak are scaled by the ratio of
   the activation memory at the end of the forward on CUDA to that on the CPU. At paper
   size the peak is the end of the forward (all activations kept, no gradient yet), so the
   prediction is in effect the fake-CUDA forward's own end state.

What it does not see: buffers that kernels allocate inside themselves (cuDNN / cuBLAS
workspaces on a GPU; oneDNN scratch on the CPU), the caching allocator's fragmentation, and
the CUDA context (~0.3-0.5 GiB outside the allocator). ``fits`` adds 10 % and 0.5 GiB.

``--check-memory`` tests the method on what it did not compute: a real scaled-down step on
the CPU (bf16 autocast), whose allocations torch.profiler records (``profile_memory``: every
allocation with the allocator's running total); the peak of the live bytes it reports is
compared with MemTracker's prediction for the same step on fake CPU tensors
(docs/benchmarks.md has the agreement).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import linecache
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools import mem_tracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mpcl
from mpcl.distributed import host_to_device

# benchmarks/ is not a package: the model building of the step-time benchmark, from its file.
_spec = importlib.util.spec_from_file_location(
    "step_time", Path(__file__).with_name("step_time.py")
)
step_time = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(step_time)

EXPERIMENTS = [*step_time.FRAMEWORK_EXPERIMENTS, "vfm_gaussian"]
GIB = 2**30
# MemTracker's categories: parameters, gradients, optimizer states, activations (made in a
# forward), temporaries (made in a backward: activation gradients), buffers.
CATEGORIES = ("PARAM", "GRAD", "OPT", "ACT", "TEMP", "BUFFER")

_aten = torch.ops.aten
# Ops that read a CUDA tensor's value or data-dependent shape on the host (tests/test_host_sync
# lists what each does on CUDA); boolean-mask indexing is checked apart.
SYNC_OPS = {
    _aten._local_scalar_dense,
    _aten.nonzero,
    _aten._unique,
    _aten._unique2,
    _aten.unique_dim,
    _aten.unique_consecutive,
    _aten.unique_dim_consecutive,
    _aten.masked_select,
    _aten.bincount,
    _aten.equal,
    _aten.histc,
}
INDEX_OPS = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
COPY_OPS = {_aten._to_copy, _aten.copy_, _aten.copy}
# Factories that take a tensor only as a template (``to_empty`` makes CUDA tensors with them).
LIKE_OPS = {_aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like}
PACKAGE = Path(mpcl.__file__).parent

# Host syncs of the steady-state step that are allowed: ("op", "file:function" under
# src/mpcl) -> why. Empty, and it has to stay so: on fake tensors a CUDA value has no value
# to read, so a step that reads one cannot be traced. The host reads the step does make are
# of CPU random numbers (HRDA's detail-crop corner, the strong augmentation's branches), which
# cost nothing beside a GPU and run for real here. Not traced: the steps that start a class's
# prototypes (K-Means, the first steps of a run), which read the ready flags once by design.
ALLOWED_SYNCS: dict[tuple[str, str], str] = {}


class CudaReadinessError(RuntimeError):
    """The step would fail on a GPU, or make the host wait for it."""


def _frame_site(in_package_only: bool = False) -> str | None:
    """Where the current op comes from: the innermost frame in src/mpcl (or in tests/, unless
    ``in_package_only``) as 'file:line in function: source', else None."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE) or (path.parent.name == "tests" and not in_package_only):
            where = path.relative_to(PACKAGE) if path.is_relative_to(PACKAGE) else path.name
            line = linecache.getline(str(path), frame.f_lineno).strip()
            return f"{where}:{frame.f_lineno} in {frame.f_code.co_name}: {line}"
        frame = frame.f_back
    return None


def _site() -> str:
    return _frame_site() or "outside src/mpcl"


def _site_key(site: str) -> str:
    """'file:line in function: source' -> 'file:function' (the allow-list's key)."""
    file, _, rest = site.partition(":")
    return f"{file}:{rest.split(' in ', 1)[-1].split(':', 1)[0]}"


class CudaChecker(TorchDispatchMode):
    """Runs under ``FakeTensorMode``: CPU-only ops for real, checks for the rest.

    ``errors`` collects what would fail or sync on a GPU (the first one raises at once when
    ``strict``); ``host_reads`` counts the CPU-side reads by site; ``pinned`` the pinned-copy
    shim's outputs.
    """

    def __init__(self, strict: bool = True) -> None:
        super().__init__()
        self.strict = strict
        self.errors: list[str] = []
        self.host_reads: dict[str, int] = {}
        self._pinned: dict[int, torch.Tensor] = {}  # id -> the tensor (kept alive: one step)

    def _fail(self, message: str) -> None:
        self.errors.append(message)
        if self.strict:
            raise CudaReadinessError(message)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is _aten._pin_memory:  # the shim: pinning needs a CUDA driver
            out = args[0].clone()
            self._pinned[id(out)] = out
            return out
        if packet is _aten.is_pinned:
            return id(args[0]) in self._pinned
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        devices |= {a.type for a in flat if isinstance(a, torch.device)}
        if devices <= {"cpu"} and not any(isinstance(t, FakeTensor) for t in tensors):
            if packet is _aten._local_scalar_dense:
                site = _frame_site(in_package_only=True)  # not the optimizer's step counters
                if site is not None:
                    self.host_reads[site] = self.host_reads.get(site, 0) + 1
            with unset_fake_temporarily():  # host-side numbers: computed for real
                return func(*args, **kwargs)
        self._check(func, args, kwargs, tensors, devices)
        return func(*args, **kwargs)

    def _check(self, func, args, kwargs, tensors, devices) -> None:
        packet = func.overloadpacket
        generators = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Generator)]
        for g in generators:
            if g.device.type not in devices or len(devices) > 1:
                self._fail(
                    f"{func}: a {g.device.type} generator draws a {sorted(devices)} tensor "
                    f"(CUDA raises) at {_site()}"
                )
        if "cuda" in devices and packet not in COPY_OPS | LIKE_OPS:
            cpu = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if cpu:  # CUDA kernels take CPU 0-dim tensors (as scalars), nothing else
                self._fail(
                    f"{func}: a CPU tensor {tuple(cpu[0].shape)} meets a CUDA tensor at {_site()}"
                )
        if packet in COPY_OPS:
            src = args[1] if packet is not _aten._to_copy else args[0]
            dst = args[0].device if packet is not _aten._to_copy else kwargs.get("device")
            dst = src.device if dst is None else torch.device(dst)
            if src.device.type == "cuda" and dst.type == "cpu":
                self._fail(f"host sync: {func} copies a CUDA tensor to the CPU at {_site()}")
            if src.device.type == "cpu" and dst.type == "cuda":
                non_blocking = kwargs.get("non_blocking", False) or (
                    packet is not _aten._to_copy and len(args) > 2 and args[2]
                )
                if not (non_blocking and id(src) in self._pinned):
                    self._fail(
                        f"host sync: {func} copies {'pageable' if id(src) not in self._pinned else 'pinned'} "
                        f"CPU memory to CUDA {'' if non_blocking else 'blocking '}at {_site()} "
                        "(use mpcl.distributed.host_to_device)"
                    )
        if "cuda" in devices:
            name = None
            if packet in SYNC_OPS:
                name = str(packet)
            elif packet in INDEX_OPS:
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                    name = f"{packet}[bool]"
            elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
                name = str(packet)
            if name is not None:
                site = _site()
                if (name, _site_key(site)) not in ALLOWED_SYNCS:
                    self._fail(f"host sync: {name} reads a CUDA tensor at {site}")


@contextlib.contextmanager
def cuda_bf16_autocast() -> Iterator[None]:
    """``torch.autocast("cuda", dtype=torch.bfloat16)`` without its check for a GPU (it turns
    itself off with a warning when ``torch.cuda.is_available()`` is False): CUDA's autocast
    policy applies to the fake CUDA tensors."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)


@contextlib.contextmanager
def gpu_attention_backend() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` as a GPU runs it, on fake CUDA tensors.

    Without a device to ask, torch's backend choice falls back to the math path, which keeps
    the (B, heads, N, N_kv) attention matrix for the backward. An Ampere or newer GPU runs
    FlashAttention for half-precision q, k, v without a mask and a head dim <= 256 (MiT's and
    DINOv2's attention under bf16 autocast), which keeps the output and one log-sum-exp per
    query: its kernel is called here directly (fake tensors have its shapes)."""
    sdpa = F.scaled_dot_product_attention

    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")  # sdpa is on autocast's bf16 list
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        flash = (
            q.device.type == "cuda"
            and attn_mask is None
            and not kw.get("enable_gqa", False)
            and q.dtype in (torch.bfloat16, torch.float16)
            and q.dtype == k.dtype == v.dtype
            and q.shape[-1] == v.shape[-1] <= 256
            and q.shape[-1] % 8 == 0
        )
        if not flash:
            return sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        return _aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, scale=scale
        )[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _autocast(device: str):
    if device == "cuda":
        return _cuda_step_context()
    return torch.autocast(device, torch.bfloat16)


@contextlib.contextmanager
def _cuda_step_context() -> Iterator[None]:
    """Lightning's bf16-mixed on a GPU: CUDA's autocast policy and its attention kernel."""
    with cuda_bf16_autocast(), gpu_attention_backend():
        yield


def small_overrides(experiment: str) -> list[str]:
    """Scaled down but structurally complete: 1-block MiT stages (a 4-block width-32 ViT),
    64 px crops (HRDA: 32 px detail crops), MIC blocks of 8 px."""
    return [*step_time._model_overrides(experiment, True, 64), "benchmark.crop_size=64"]


def build(experiment: str, overrides: list[str]) -> tuple[object, torch.nn.Module, int]:
    """The experiment's UDAModule on the CPU in steady state (every class has prototypes, the
    host knows it: no K-Means start), no pretrained weights. Returns (cfg, module, crop)."""
    no_weights = step_time._model_overrides(experiment, False, None)[0]  # pretrained=null
    overrides = [*([] if no_weights in overrides else [no_weights]), *overrides]
    cfg, module, _ = step_time.build(experiment, overrides, torch.device("cpu"))
    if module.prototype is not None:
        module.prototype.bank_update.start.refresh(module.prototype)
        assert module.prototype.bank_update.start.done
    return cfg, module, int(cfg.benchmark.crop_size)


class _NoHook:
    def remove(self) -> None:
        pass


class MemTracker(mem_tracker.MemTracker):
    """torch's MemTracker, which also takes frozen parameters (the teacher's, the ImageNet
    encoder's: torch 2.14's registers a gradient hook on every parameter, which raises for
    one that does not require a gradient) and keeps the global peak only (torch's also keeps
    every module's, looping over all modules called so far after every op: most of the time
    of a MiT-B5 step)."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def _optimizer_step(module, optimizer, scheduler, zero_grads: bool = False) -> None:
    """AdamW + lr-scheduler step (on zero gradients when ``zero_grads``), then no gradients."""
    if zero_grads:
        for p in module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _prepare(module: torch.nn.Module, device: str | None, warm: bool = True):
    """Move a real CPU module's parameters and buffers to ``device`` under the active fake mode
    (fake ones, where ``.to(device)`` would put them; None: stay) and give it its AdamW and lr
    scheduler; ``warm``: with the AdamW states (one step on zero gradients: the steady state).

    The AdamW runs its multi-tensor (foreach) path, which torch picks by default for CUDA
    parameters (the CPU's default is a loop over the parameters, with smaller temporaries).
    Returns (optimizer, scheduler)."""
    if device is not None:
        module.to_empty(device=device)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for group in optimizer.param_groups:
        group["foreach"] = True
    module.optimizers = lambda: optimizer
    if warm:
        _optimizer_step(module, optimizer, scheduler, zero_grads=True)
    return optimizer, scheduler


class _Step(torch.nn.Module):
    """``training_step`` as one module call: MemTracker takes the first module called as the
    root of an iteration and refuses a second call of it (the student runs up to 4 times)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict, step: int) -> torch.Tensor:
        return self.module.training_step(batch, step)["loss"]


def _forward(
    step: _Step, crop: int, device: str, fake_mode: FakeTensorMode | None = None
) -> torch.Tensor:
    """``training_step`` on a random batch (2 x 3 x crop x crop) under bf16 autocast; the loss.

    The batch is made on the CPU and copied as the loader pins it and Lightning copies it
    (non-blocking), outside the step; on the CPU under ``fake_mode`` it is made fake (device
    data, not host-side numbers that would be computed for real)."""
    batch = step_time.random_batch(crop, torch.device("cpu"))
    if fake_mode is not None and device == "cpu":
        batch = {k: fake_mode.from_tensor(v) for k, v in batch.items()}
    batch = {k: host_to_device(v, torch.device(device)) for k, v in batch.items()}
    with _autocast(device):
        loss = step(batch, 1)
    if loss.dtype != torch.float32:
        raise CudaReadinessError(f"the loss is {loss.dtype} under bf16 autocast, not float32")
    return loss


def _no_diagnostics(module: torch.nn.Module) -> None:
    """Switch off the gradient diagnostic of every ``diagnostics_every``-th step (two extra
    backward passes through the heads, inside the step): it needs the device like backward
    (traced on fake CPU tensors, ``trace_cpu``, without ``memory``), and MemTracker loses
    track of the forward after a backward inside it. Its memory is not predicted."""
    if getattr(module, "diagnostics_every", 0):
        module.diagnostics_every = 0


def trace_cuda(
    module: torch.nn.Module,
    crop: int,
    memory: bool = False,
    plant: Callable[[torch.nn.Module], None] | None = None,
) -> dict:
    """The fake-CUDA step of a real CPU module (which it consumes): ``training_step`` under
    CUDA's bf16 autocast, then AdamW and the lr scheduler on (zero) CUDA gradients.

    ``plant(module)`` runs once the module is on CUDA (the test plants bugs with it).
    Raises CudaReadinessError. Returns host_reads (CPU-side reads in src/mpcl by site),
    seconds and, with ``memory``, cuda_end: MemTracker's {category: bytes} at the end of
    the forward.
    """
    start, row = time.perf_counter(), {}
    with FakeTensorMode(allow_non_fake_inputs=True), CudaChecker() as checker:
        optimizer, scheduler = _prepare(module, "cuda", warm=memory)
        _no_diagnostics(module)
        if plant is not None:
            plant(module)
        tracker = MemTracker() if memory else contextlib.nullcontext()
        if memory:
            tracker.track_external(module, optimizer)
        with tracker:
            step = _Step(module)
            loss = _forward(step, crop, "cuda")
            if memory:
                row["cuda_end"] = _snapshot(tracker, "current", "cuda")
        del loss, step  # backward needs a GPU (see the module docstring)
        _optimizer_step(module, optimizer, scheduler, zero_grads=True)
    return row | {"host_reads": checker.host_reads, "seconds": time.perf_counter() - start}


def trace_cpu(module: torch.nn.Module, crop: int, memory: bool = False, fake: bool = True) -> dict:
    """The whole step of a real CPU module on fake CPU tensors (``fake``; it consumes the
    module) or real ones: ``training_step`` under the CPU's bf16 autocast, backward, AdamW,
    lr scheduler.

    Returns seconds and, with ``memory``, MemTracker's {category: bytes} at the start of the
    step (cpu_start), the end of the forward (cpu_end), after the backward (cpu_backward) and
    at the peak of the step (cpu_peak).
    """
    start, row = time.perf_counter(), {}
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    with fake_mode or contextlib.nullcontext():
        if fake:  # fake CPU parameters and buffers (under the checker they would be real)
            module.to_empty(device="cpu")
    with fake_mode or contextlib.nullcontext(), CudaChecker() if fake else contextlib.nullcontext():
        optimizer, scheduler = _prepare(module, None)
        if memory:
            _no_diagnostics(module)
        tracker = MemTracker() if memory else contextlib.nullcontext()
        if memory:
            tracker.track_external(module, optimizer)
        with tracker:
            if memory:
                row["cpu_start"] = _snapshot(tracker, "current", "cpu")
            step = _Step(module)
            loss = _forward(step, crop, "cpu", fake_mode)
            if memory:
                row["cpu_end"] = _snapshot(tracker, "current", "cpu")
            loss.backward()
            del loss
            if memory:
                row["cpu_backward"] = _snapshot(tracker, "current", "cpu")
            _optimizer_step(module, optimizer, scheduler)
            if memory:
                row["cpu_peak"] = _snapshot(tracker, "peak", "cpu")
    return row | {"seconds": time.perf_counter() - start}


def check_experiment(experiment: str, overrides: list[str], memory: bool = False) -> dict:
    """Build the experiment twice (a fake module cannot move from CUDA to the CPU) and run
    ``trace_cuda`` and ``trace_cpu``. Raises CudaReadinessError."""
    _, module, crop = build(experiment, overrides)
    row = {"experiment": experiment, "crop": crop}
    row |= trace_cuda(module, crop, memory)
    del module
    _, module, _ = build(experiment, overrides)
    cpu = trace_cpu(module, crop, memory)
    row["seconds"] += cpu.pop("seconds")
    return row | cpu


def _snapshot(tracker: MemTracker, kind: str, device: str) -> dict[str, int]:
    """MemTracker's "current" or "peak" snapshot of one device type: {category: bytes}, the
    categories as in CATEGORIES (and "Total")."""
    snap = tracker.get_tracker_snapshot(kind)
    out = next((v for k, v in snap.items() if torch.device(k).type == device), {})
    return {str(k).rsplit(".", 1)[-1]: int(v) for k, v in out.items()}


def predicted_peak(row: dict) -> dict[str, float]:
    """The CPU step's peak, its activations and backward temporaries scaled to CUDA's autocast
    policy by the ratio of the end-of-forward activations, CUDA / CPU.

    Returns {category: GiB} for CATEGORIES, "Total" (GiB) and "act_ratio"."""
    peak = row["cpu_peak"]
    ratio = row["cuda_end"]["ACT"] / row["cpu_end"]["ACT"]
    out = {c: peak.get(c, 0) * (ratio if c in ("ACT", "TEMP") else 1.0) / GIB for c in CATEGORIES}
    out["Total"] = sum(out.values())
    out["act_ratio"] = ratio
    return out


def measured_cpu_step(experiment: str, overrides: list[str]) -> dict:
    """The independent check: one real CPU step (bf16 autocast, the module as ``build`` makes
    it, AdamW states present) under torch.profiler's memory profiling, and MemTracker's
    prediction for the same step on fake CPU tensors.

    Returns {"measured": bytes, "predicted": bytes} of the step's peak above the memory held
    when it starts (parameters, buffers, AdamW states), "baseline": those bytes as
    MemTracker counts them, and "tracked": ``trace_cpu``'s snapshots. The profiler reports every CPU allocation and free with the
    allocator's running total (``total_allocated``), which counts from the start of profiling.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    _, module, crop = build(experiment, overrides)
    tracked = trace_cpu(module, crop, memory=True)
    predicted = tracked["cpu_peak"]["Total"] - tracked["cpu_start"]["Total"]

    _, module, crop = build(experiment, overrides)
    optimizer, scheduler = _prepare(module, None)
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = _forward(_Step(module), crop, "cpu")
        loss.backward()
        del loss
        _optimizer_step(module, optimizer, scheduler)
    totals = []

    def walk(events) -> None:
        for e in events:
            if e.typed[0] == _EventType.Allocation:
                totals.append(e.typed[1].total_allocated)
            walk(e.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    return {
        "measured": max(totals),
        "predicted": predicted,
        "baseline": tracked["cpu_start"]["Total"],
        "tracked": tracked,
    }


def check_memory(experiments: list[str], overrides: list[str]) -> list[dict]:
    """``measured_cpu_step`` for each experiment, scaled down; prints one line each."""
    print(
        f"torch {torch.__version__}, one real CPU step (bf16 autocast, scaled down) under "
        "torch.profiler vs MemTracker on fake CPU tensors; MB = 2^20 bytes"
    )
    rows = []
    for experiment in experiments:
        r = measured_cpu_step(experiment, [*small_overrides(experiment), *overrides])
        mb, base = 2**20, r["baseline"]
        print(
            f"{experiment}: step peak above its start {r['measured'] / mb:.1f} MB measured, "
            f"{r['predicted'] / mb:.1f} MB predicted ({100 * (r['predicted'] / r['measured'] - 1):+.1f}%); "
            f"with the {base / mb:.1f} MB held at the start {(r['measured'] + base) / mb:.1f} vs "
            f"{(r['predicted'] + base) / mb:.1f} MB "
            f"({100 * ((r['predicted'] + base) / (r['measured'] + base) - 1):+.1f}%)",
            flush=True,
        )
        rows.append(r | {"experiment": experiment})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("words", nargs="*", help="experiments and Hydra overrides (key=value)")
    parser.add_argument("--memory", action="store_true", help="predict the peak memory")
    parser.add_argument("--small", action="store_true", help="1-block encoders, 64 px crops")
    parser.add_argument(
        "--check-memory",
        action="store_true",
        help="the memory method against a real scaled-down CPU step (torch.profiler)",
    )
    args = parser.parse_args(argv)
    overrides = [w for w in args.words if "=" in w]
    experiments = [w for w in args.words if "=" not in w] or EXPERIMENTS
    if args.check_memory:
        return check_memory(experiments, overrides)
    print(
        f"torch {torch.__version__}, fake tensors (no GPU), batch 2, "
        f"{'scaled down' if args.small else 'paper size'}"
        + (f", overrides {overrides}" if overrides else "")
    )
    rows = []
    for experiment in experiments:
        extra = small_overrides(experiment) if args.small else []
        try:
            row = check_experiment(experiment, [*extra, *overrides], memory=args.memory)
        except CudaReadinessError as err:
            print(f"{experiment}: FAIL {err}", flush=True)
            rows.append({"experiment": experiment, "ok": False, "error": str(err)})
            continue
        row["ok"] = True
        crop = row["crop"]
        line = (
            f"{experiment}: ok, crop {crop}, fake-CUDA step + fake-CPU backward in "
            f"{row['seconds']:.0f} s, {sum(row['host_reads'].values())} CPU-side reads"
        )
        if args.memory:
            row["predicted"] = p = predicted_peak(row)
            parts = ", ".join(f"{c.lower()} {p[c]:.2f}" for c in CATEGORIES)
            line += (
                f"; predicted peak {p['Total']:.2f} GiB ({parts}; activations x"
                f"{p['act_ratio']:.2f} for CUDA's autocast; CPU autocast "
                f"{row['cpu_peak']['Total'] / GIB:.2f} GiB; fits {fits(p['Total'])})"
            )
        print(line, flush=True)
        rows.append(row)
    return rows


# Common cards by memory (GiB), the smallest first.
CARDS = {
    11: "2080 Ti",
    16: "V100 16GB / 4080 / A4000",
    24: "3090 / 4090 / A5000 / Titan RTX",
    40: "A100 40GB",
    48: "A6000 / L40S",
    80: "A100 80GB / H100",
}


def fits(peak_gib: float, headroom: float = 0.1, context_gib: float = 0.5) -> str:
    """The smallest card of CARDS with room for ``peak_gib`` of tensors plus ``headroom`` of
    it for the caching allocator's fragmentation and the CUDA context (``context_gib``)."""
    need = peak_gib * (1 + headroom) + context_gib
    return next((f">= {gib} GB ({name})" for gib, name in CARDS.items() if need <= gib), "none")


if __name__ == "__main__":
    main()
