"""Host syncs in one steady-state self-training step, counted on the CPU (no GPU needed).

On a GPU, an op whose result the host must read (a value: ``.item()``, ``bool(t)``; or a
data-dependent shape: ``torch.nonzero``, ``torch.unique``, boolean-mask indexing) blocks the
Python thread until every queued kernel has run, so the GPU idles while Python catches up.
The forward + backward of ``UDAModule.training_step`` (the optimizer step aside) runs here
under a ``TorchDispatchMode`` that records every such op with the source line it came from;
the test fails on any sync that is not on an allow-list below, and on allow-list entries that
no longer occur (so the lists stay exact).

What counts as a sync (what each op does on CUDA):
  - aten._local_scalar_dense: ``.item()``, ``bool()``, ``int()``, ``float()``, ``if t:``.
  - aten.nonzero, aten._unique / _unique2 / unique_dim / unique_consecutive /
    unique_dim_consecutive, aten.masked_select: the output size is read back.
  - aten.index / index_put with a bool (or uint8) index, e.g. ``x[mask]``: CUDA runs nonzero.
  - aten.bincount: CUDA reads the input's min and max to size the output.
  - aten.repeat_interleave.Tensor without output_size: CUDA reads the sum of the repeats.
  - aten.equal: returns a Python bool. aten.histc: reads min/max when min == max.
Not seen here (all tensors live on the CPU): host<->device copies. A blocking ``.to("cuda")``
of CPU random numbers synchronises the stream too, which is why ``mpcl.uda.mixing`` copies
them through ``host_to_device``; on a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` over one
step lists those as well.
"""

from __future__ import annotations

import importlib.util
import linecache
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import compose_train, tiny_synthetic
from torch.utils._python_dispatch import TorchDispatchMode

import mpcl
from mpcl.run.build import build_module

# Syncs that only read CPU-side random numbers: free on a GPU, nothing waits for the device.
# (op, "file:function" under src/mpcl, the source line) -> why it is harmless.
CPU_RANDOM_SYNCS: dict[tuple[str, str, str], str] = {
    (
        "aten._local_scalar_dense",
        "models/hrda.py:get_crop_box",
        "y1 = int(torch.randint(ny, (), generator=generator)) * divisible",
    ): "HRDA's random detail crop: int() of a CPU torch.randint",
    (
        "aten._local_scalar_dense",
        "models/hrda.py:get_crop_box",
        "x1 = int(torch.randint(nx, (), generator=generator)) * divisible",
    ): "HRDA's random detail crop: int() of a CPU torch.randint",
}

ALLOWED = CPU_RANDOM_SYNCS

# The ops that read a device value or a data-dependent shape on the host: one list, shared
# with the fake-CUDA check of benchmarks/cuda_readiness.py.
_path = Path(__file__).parents[1] / "benchmarks" / "cuda_readiness.py"
_spec = importlib.util.spec_from_file_location("cuda_readiness", _path)
_readiness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_readiness)
SYNC_OPS, INDEX_OPS = _readiness.SYNC_OPS, _readiness.INDEX_OPS
_aten = torch.ops.aten
PACKAGE = Path(mpcl.__file__).parent
_TRACEBACK_LINE = re.compile(r'File "(.+)", line (\d+), in (\S+)')


def _sync_name(func, args, kwargs) -> str | None:
    """The op's name if it syncs on CUDA (bool-mask indexing tagged ``[bool]``), else None."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return str(packet)
    if packet in INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return f"{packet}[bool]"
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return str(packet)
    return None


def _frames() -> list[tuple[str, int, str]]:
    """(file, line, function) of the code that called the op, innermost first.

    In the backward pass the Python stack only shows ``loss.backward()``; anomaly mode has
    stored the forward stack of the autograd node being run, which is parsed instead.
    """
    node = torch._C._current_autograd_node()
    if node is not None:
        text = "".join(node.metadata.get("traceback_", []))
        found = [(f, int(n), fn) for f, n, fn in _TRACEBACK_LINE.findall(text)]
        return found[::-1]
    frames, frame = [], sys._getframe(2)
    while frame is not None:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    return frames


class HostSyncCounter(TorchDispatchMode):
    """Counts the syncing ops by (op, "file:function" under src/mpcl, the source line)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.stacks: dict[tuple[str, str, str], str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        if name is not None:
            self._record(name, _frames())
        return func(*args, **kwargs)

    def _record(self, name: str, frames: list[tuple[str, int, str]]) -> None:
        ours = [f for f in frames if Path(f[0]).is_relative_to(PACKAGE)]
        if ours:
            file, line, fn = ours[0]
            site = f"{Path(file).relative_to(PACKAGE).as_posix()}:{fn}"
            key = (name, site, linecache.getline(file, line).strip())
        else:
            key = (name, "outside src/mpcl", "")
        if torch._C._current_autograd_node() is not None:
            key = (key[0], f"backward of {key[1]}", key[2])
        self.counts[key] += 1
        if key not in self.stacks:  # a short stack: the package's frames and their callee
            shown = [f for f in frames if "/torch/" not in f[0]][:8]
            self.stacks[key] = "\n".join(
                f"      {Path(f).name}:{n} in {fn}: {linecache.getline(f, n).strip()}"
                for f, n, fn in shown
            )


def _label_map(size: int = 64) -> torch.Tensor:
    """(2, size, size) source labels: every class in 8-px cells (so each class gets
    prototypes), and 75% of image 0 a "thing" (car) so Feature Distance has cells to pull."""
    cells = torch.arange((size // 8) ** 2).remainder(19).view(1, 1, size // 8, size // 8)
    labels = F.interpolate(cells.float(), size=(size, size), mode="nearest")[:, 0].long()
    labels = labels.repeat(2, 1, 1)
    labels[0, : 3 * size // 4] = 13  # car
    return labels


# Two experiments cover every part of the step: the default (DACS + Gaussian MPCL, single
# resolution) and MIC (HRDA multi-resolution, masked consistency, ImageNet Feature Distance);
# the default once more with the feature bank as the update memory (every step adds to it).
# The prototype overrides only let every class collect its K-Means features in one step.
FAST_INIT = ["++prototype.min_init_features=5", "++prototype.bank_max_per_step=20"]
SHALLOW = "model.encoder.depths=[1,1,1,1]"
CONFIGS = {  # name -> (experiment, overrides)
    "synthetic_gaussian": ("synthetic_gaussian", [SHALLOW]),
    "synthetic_gaussian_queue": ("synthetic_gaussian", [SHALLOW, "prototype.bank_mode=queue"]),
    "synthetic_mic_gaussian": (
        "synthetic_mic_gaussian",
        [
            SHALLOW,
            "model.hr_crop_size=[32,32]",
            "model.hr_slide_window=[32,32]",
            "model.hr_slide_stride=[16,16]",
            "uda.mic.block_size=8",
        ],
    ),
}


def count_step_syncs(experiment: str, overrides: list[str], output_dir: Path) -> HostSyncCounter:
    """Build the experiment's module as ``mpcl.train`` does, run warm-up steps until every
    class has prototypes (steady state), then count one forward + backward."""
    cfg = compose_train(
        [*tiny_synthetic(experiment), f"experiment={experiment}", *FAST_INIT, *overrides],
        output_dir,
    )
    torch.manual_seed(0)
    module = build_module(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    module.log = lambda *a, **k: None  # no Trainer: logging is a no-op
    module.optimizers = lambda: optimizer
    batch = {
        "source_image": torch.rand(2, 3, 64, 64),
        "source_label": _label_map(),
        "target_image": torch.rand(2, 3, 64, 64),
    }
    initialized = module.prototype.prototypes.initialized
    step = 0
    while step == 0 or not initialized.all():  # K-Means runs in the step that fills a class
        assert step < 3, f"{experiment}: 3 warm-up steps left classes without prototypes"
        module.training_step(batch, step)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    counter = HostSyncCounter()
    with torch.autograd.set_detect_anomaly(True, check_nan=False):  # forward stacks
        with counter:
            module.training_step(batch, step)["loss"].backward()
    return counter


def test_training_step_has_no_unexpected_host_syncs(tmp_path):
    seen: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)
    stacks: dict[tuple[str, str, str], str] = {}
    for name, (experiment, overrides) in CONFIGS.items():
        counter = count_step_syncs(experiment, overrides, tmp_path / name)
        for key, n in counter.counts.items():
            seen[key][name] = n
        stacks |= counter.stacks
    report = [
        f"  {sum(n.values())} x {op} at {site}: {line}  {dict(n)}"
        for (op, site, line), n in sorted(seen.items())
    ]
    print("host syncs per step:\n" + "\n".join(report))
    unexpected = [key for key in seen if key not in ALLOWED]
    stale = [key for key in ALLOWED if key not in seen]
    message = []
    for key in unexpected:
        op, site, line = key
        message.append(f"new host sync {op} at {site}: {line}  {seen[key]}\n{stacks[key]}")
    for key in stale:
        message.append(f"allow-list entry no longer occurs, remove it: {key}")
    assert not message, "\n".join(message)
