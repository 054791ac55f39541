"""The divergence guard reads the step's outputs, without a host sync between its checks; the
interrupt guard puts the signal handlers back."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
import torch

from mpcl.errors import TrainingDiverged
from mpcl.run.guards import DivergenceGuard, InterruptGuard


def test_divergence_guard_does_not_sync_between_checks():
    """On a GPU, reading a flag is a host sync: the guard only records between checks."""
    from types import SimpleNamespace

    from torch.overrides import TorchFunctionMode

    syncing = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    class Spy(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Module:  # what the guard uses of a LightningModule
        def named_parameters(self):
            return []

    guard = DivergenceGuard(check_every_n_steps=4)
    trainer = SimpleNamespace(log_every_n_steps=50, global_step=0, checkpoint_callback=None)
    module = Module()
    guard.on_train_start(trainer, module)
    for step, value in enumerate([1.0, float("nan"), 2.0], start=1):
        trainer.global_step = step
        outputs = {"loss": torch.tensor(value), "logs": {"loss_mixed": torch.tensor(value)}}
        with Spy() as spy:
            guard.on_train_batch_end(trainer, module, outputs, None, 0)
        assert not syncing & set(spy.seen), spy.seen
    trainer.global_step = 4
    assert guard.diagnose(trainer, module, weights=False).startswith(
        "training diverged at step 2: train/loss_mixed became nan"
    )


def _trainer(step: int = 0):
    return SimpleNamespace(log_every_n_steps=1, global_step=step, checkpoint_callback=None)


class _Module:
    def __init__(self, weight: float = 1.0):
        self.weight = torch.nn.Parameter(torch.tensor([weight]))

    def named_parameters(self):
        return [("weight", self.weight)]


def test_divergence_guard_names_the_first_non_finite_term_from_the_outputs():
    guard, trainer, module = DivergenceGuard(check_every_n_steps=10), _trainer(), _Module()
    guard.on_train_start(trainer, module)
    steps = [
        {"loss_source": 1.0, "loss_contrast": 0.5, "quality_weight": 0.2},
        {"loss_source": 1.0, "loss_contrast": float("inf"), "quality_weight": float("nan")},
        {"loss_source": float("nan"), "loss_contrast": 0.5, "quality_weight": 0.2},
    ]
    for step, logs in enumerate(steps, start=1):
        trainer.global_step = step
        outputs = {
            "loss": torch.tensor(sum(logs.values())),
            "logs": {k: torch.tensor(v) for k, v in logs.items()},
        }
        guard.on_train_batch_end(trainer, module, outputs, None, 0)
    reason = guard.diagnose(trainer, module, weights=False)
    # Step 2's contrastive loss; the quality weight is not a loss term.
    assert reason.startswith("training diverged at step 2: train/loss_contrast became inf")
    with pytest.raises(TrainingDiverged, match="step 2"):
        guard.check(trainer, module)


def test_divergence_guard_checks_the_weights_when_asked():
    guard, trainer = DivergenceGuard(), _trainer(7)
    guard.on_train_start(trainer, _Module())
    assert guard.diagnose(trainer, _Module(1.0), weights=True) == ""
    reason = guard.diagnose(trainer, _Module(float("nan")), weights=True)
    assert reason.startswith("training diverged by step 7: the weights are non-finite (weight")


def test_interrupt_guard_restores_the_handlers_it_found():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    guard = InterruptGuard()
    guard.on_fit_start(None, None)
    assert signal.getsignal(signal.SIGINT) == guard._handle
    guard.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
