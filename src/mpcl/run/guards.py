"""Guards that stop a run without losing its work: divergence and interrupts.

* ``DivergenceGuard``: the first non-finite loss stops training with one line naming the step
  and the loss term; no checkpoint is written after it, so the newest checkpoint is the last
  finite one. The flags live on the device and are read every ``trainer.log_every_n_steps``
  steps, before every checkpoint save and before validation: no host sync per step.
* ``InterruptGuard``: SIGINT (Ctrl-C) or SIGTERM (SLURM preemption) lets the current step
  finish, saves a resumable checkpoint at that step boundary and stops with the resume
  command. A second signal stops at once.

Both raise exceptions that ``mpcl.run.cli.report_error`` turns into the message and exit status:
``TrainingDiverged`` (3) and ``RunInterrupted`` (128 + the signal: 130, 143).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mpcl.errors import RunInterrupted, TrainingDiverged


def _newest_checkpoint(trainer: L.Trainer) -> str:
    cb = trainer.checkpoint_callback
    if cb is None:
        return ""
    return getattr(cb, "newest_path", "") or cb.last_model_path or cb.best_model_path


class DivergenceGuard(L.Callback):
    """Stop at the first non-finite training loss (see the module docstring).

    Args:
        check_every_n_steps: how often the device flags are read (default: the trainer's
            ``log_every_n_steps``). Checkpoint saves and validation always check first.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        self.check_every_n_steps = check_every_n_steps
        self._every = 1
        # names of the logged loss terms -> (first non-finite step, its value), on the device;
        # step -1 = finite so far.
        self._first: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.checked_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._every = max(1, self.check_every_n_steps or trainer.log_every_n_steps or 1)
        self._first.clear()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # The step's outputs: the total ``loss`` and its terms under ``logs`` (mpcl.uda).
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        logs = outputs.get("logs", {}) if isinstance(outputs, dict) else {}
        terms = {
            f"train/{name}": value
            for name, value in logs.items()
            if name.startswith("loss") and isinstance(value, torch.Tensor)
        }
        if isinstance(loss, torch.Tensor):
            terms["train/loss"] = loss.detach()
        if terms:
            names = tuple(sorted(terms))
            device = terms[names[0]].device
            values = torch.stack([terms[n].float().mean().to(device) for n in names])
            step = trainer.global_step  # the step just taken, counted from 1
            if names not in self._first:
                self._first[names] = (
                    torch.full_like(values, -1, dtype=torch.long),
                    torch.zeros_like(values),
                )
            first_step, first_value = self._first[names]
            new = ~torch.isfinite(values) & (first_step < 0)
            first_step.copy_(torch.where(new, step, first_step))
            first_value.copy_(torch.where(new, values, first_value))
        if trainer.global_step % self._every == 0:
            self.check(trainer, pl_module)

    # -- checking (one host sync) ---------------------------------------------------------
    def diagnose(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: bool) -> str:
        """The one-line reason if training has diverged, else an empty string."""
        self.checked_step = trainer.global_step
        found: list[tuple[int, str, float]] = []
        for names, (first_step, first_value) in self._first.items():
            steps, values = first_step.tolist(), first_value.tolist()
            found += [(s, n, v) for n, s, v in zip(names, steps, values, strict=True) if s >= 0]
        saved = _newest_checkpoint(trainer)
        keep = f"the last finite checkpoint is {saved}" if saved else "no checkpoint was saved"
        hint = "lower uda.optimizer.lr (or check the data)"
        if found:
            step = min(s for s, _, _ in found)
            terms = sorted({(n, v) for s, n, v in found if s == step}, key=lambda t: t[0])
            parts = [n for n, _ in terms if n != "train/loss"] or ["train/loss"]
            value = {n: v for n, v in terms}.get(parts[0], float("nan"))
            return (
                f"training diverged at step {step}: {', '.join(parts)} became {value} "
                f"(stopped at step {trainer.global_step}); {keep}; {hint}"
            )
        if weights:
            params = [(n, p) for n, p in pl_module.named_parameters() if p.is_floating_point()]
            if params:
                finite = torch.stack([torch.isfinite(p).all() for _, p in params]).tolist()
                bad = [n for (n, _), ok in zip(params, finite, strict=True) if not ok]
                if bad:
                    return (
                        f"training diverged by step {trainer.global_step}: the weights are "
                        f"non-finite ({bad[0]}, {len(bad)} tensors in all); {keep}; {hint}"
                    )
        return ""

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: bool = False):
        reason = self.diagnose(trainer, pl_module, weights)
        if reason:
            raise TrainingDiverged(reason)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Never write a non-finite model: the newest checkpoint stays the last finite one.
        if trainer.state.fn == "fit":
            self.check(trainer, pl_module, weights=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)


class InterruptGuard(L.Callback):
    """Save a resumable checkpoint on SIGINT/SIGTERM and stop (see the module docstring).

    The checkpoint is written by the run's ``mpcl.run.checkpoint.Checkpoint`` (its periodic file
    and ``last.ckpt``), else to ``<run dir>/checkpoints/last.ckpt``, at the end of the step
    during which the signal came: the same point as a periodic checkpoint, so resuming from it
    is exact. Single-process training only (under DDP every rank must get the signal).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def _install(self) -> None:
        if sys.platform == "win32":
            return
        try:
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                if previous != self._handle:
                    self._previous.setdefault(sig, previous)
        except ValueError:  # not the main thread: leave signals alone
            self.restore()

    def restore(self) -> None:
        """Put back the handlers found at the first install (where ours is still set:
        Lightning's teardown re-installs what it found at fit start, i.e. ours)."""
        for sig, handler in self._previous.items():
            try:
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass

    def _last_checkpoint(self) -> str:
        """The newest complete checkpoint of this run ('' if none): saves are atomic, so the
        file a save is writing stays the previous, intact one until it is renamed."""
        trainer = self._trainer
        if trainer is None:
            return ""
        cb = trainer.checkpoint_callback
        last = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if not last:
            default = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            last = str(default) if default.is_file() else ""
        return str(Path(last).resolve()) if last else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop now, naming what is on disk
            self.restore()
            step = self._trainer.global_step if self._trainer is not None else 0
            raise RunInterrupted(signum, step, self._last_checkpoint(), saved=False)
        self.signum = signum
        name = signal.Signals(signum).name
        # os.write: print() is not safe inside a signal handler.
        os.write(2, f"\n{name}: saving a checkpoint after this step (again to stop now)\n".encode())

    # Installed before the data loader workers fork (they inherit it and so ignore the signal:
    # the main process stops them), and again after Lightning sets its own SIGTERM handler.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signum = None
        self._trainer = trainer
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.signum is None:
            return
        self.restore()
        cb = trainer.checkpoint_callback
        if cb is not None and hasattr(cb, "save_now"):
            path = cb.save_now(trainer)
        else:
            path = str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path)
        raise RunInterrupted(self.signum, trainer.global_step, str(Path(path).resolve()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException):
        self.restore()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()  # after Lightning's teardown

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()
