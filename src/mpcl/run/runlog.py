"""The run's log file (``<run dir>/<task>.log``, Hydra's job log) holds what the console shows:
the config summary, Lightning's messages and warnings, progress at intervals, validation
results, the final table, the paths, and errors.

Messages meant for both go through ``echo``; ``copy_stdout`` copies what a block of code prints
(the rich IoU table) into the file; ``ProgressLog`` writes the progress lines that the console
shows as a progress bar. Outside a Hydra run (tests, notebooks) there is no log file and only
the console output remains.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Lightning logs through these (with their own console handler and propagate=False).
_LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")

_file_log = logging.getLogger("mpcl.runlog")
_file_log.propagate = False  # file only: the console gets its own copy from echo/print
_file_log.setLevel(logging.INFO)


def _reaches_root(logger: logging.Logger) -> bool:
    """Whether the records of ``logger`` propagate up to the root logger."""
    node: logging.Logger | None = logger
    while node is not None and node.parent is not None:
        if not node.propagate:
            return False
        node = node.parent
    return True


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def to_file(message: str, level: int = logging.INFO) -> None:
    """Write ``message`` (ANSI codes removed) into the run's log file only."""
    text = _ANSI.sub("", message).rstrip()
    if text and _file_log.handlers:
        _file_log.log(level, text)


def echo(message: str, err: bool = False, level: int = logging.INFO) -> None:
    """Print ``message`` on the console (stdout, or stderr if ``err``) and into the log file."""
    print(message, file=sys.stderr if err else sys.stdout, flush=True)
    to_file(message, level)


class _Tee(io.TextIOBase):
    def __init__(self, stream) -> None:
        self.stream, self.buffer_ = stream, []

    def write(self, text: str) -> int:
        self.buffer_.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def copy_stdout() -> Iterator[None]:
    """Copy what the block prints on stdout into the log file (as one entry)."""
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.stream
        to_file("".join(tee.buffer_))


@contextmanager
def run_log() -> Iterator[None]:
    """For the duration of a run: Lightning's messages and Python warnings also go into the
    log file (the console is unchanged), and so does anything ``echo``/``to_file`` writes."""
    handlers = _file_handlers()
    added: list[tuple[logging.Logger, logging.Handler]] = []
    libraries = [lg for lg in map(logging.getLogger, _LIBRARY_LOGGERS) if not _reaches_root(lg)]
    for handler in handlers:
        for logger in (_file_log, *libraries):
            if handler not in logger.handlers:
                logger.addHandler(handler)
                added.append((logger, handler))
    showwarning = _tee_warnings() if handlers else None
    try:
        yield
    finally:
        for logger, handler in added:
            logger.removeHandler(handler)
        if showwarning is not None:
            import warnings

            warnings.showwarning = showwarning


def _tee_warnings():
    import warnings

    original = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        original(message, category, filename, lineno, file, line)
        to_file(f"{category.__name__}: {message}", logging.WARNING)

    warnings.showwarning = showwarning
    return original


def config_summary(cfg: DictConfig) -> str:
    """A few lines: the run directory, the config groups chosen, the schedule, overrides."""
    from hydra.core.hydra_config import HydraConfig

    lines = []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        lines.append(f"run: {hc.runtime.output_dir}")
        groups = ("experiment", "data", "model", "uda", "prototype", "trainer")
        choices = [f"{g}={hc.runtime.choices.get(g)}" for g in groups if hc.runtime.choices.get(g)]
        lines.append("config: " + " ".join(choices))
        if hc.overrides.task:
            lines.append("overrides: " + " ".join(hc.overrides.task))
    t = cfg.trainer
    ckpt = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    schedule = f"max_steps={t.get('max_steps')} val_check_interval={t.get('val_check_interval')}"
    if ckpt.get("every_n_train_steps"):
        schedule += f" checkpoint_every={ckpt.every_n_train_steps}"
    lines.append(f"schedule: {schedule} precision={t.get('precision')} seed={cfg.get('seed')}")
    proto = cfg.get("prototype") or {}
    if proto.get("prototypes"):
        kind = str(proto.prototypes.get("_target_", "")).rsplit(".", 1)[-1]
        lines.append(f"prototypes: {kind} K={proto.get('K')}")
    if cfg.get("ckpt_path"):
        lines.append(f"resume: {cfg.ckpt_path}")
    return "\n".join(lines)


class ProgressLog(L.Callback):
    """Progress lines in the log file at intervals (the console shows a progress bar):
    ``step 500/60000 | train/loss 0.8123 | lr 6.0e-05 | 1.92 it/s | eta 8:36:02``, and the
    validation results. ``every_n_steps`` defaults to 5 % of ``max_steps`` (at least the
    trainer's ``log_every_n_steps``, at most 500)."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self._every = 1
        self._start: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        max_steps = max(1, trainer.max_steps)
        default = min(500, max(trainer.log_every_n_steps or 1, max_steps // 20))
        self._every = max(1, self.every_n_steps or default)
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        if not _file_log.handlers or trainer.global_rank != 0:
            return
        if step % self._every and step != trainer.max_steps:
            return
        parts = [f"step {step}/{trainer.max_steps}"]
        metrics = trainer.callback_metrics  # one host sync, every _every steps
        for key in ("train/loss", "train/loss_contrast", "train/loss_consistency"):
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if self._start is not None and step > self._start[1]:
            rate = (step - self._start[1]) / max(1e-9, time.monotonic() - self._start[0])
            eta = int((trainer.max_steps - step) / max(rate, 1e-9))
            parts.append(f"{rate:.2f} it/s | eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        to_file(" | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        metrics = trainer.callback_metrics
        shown = [
            f"{k} {float(metrics[k]):.2f}"
            for k in sorted(metrics)
            if k.startswith("val/") and not k.startswith("val/IoU/")
        ]
        if shown:
            to_file(f"validation at step {trainer.global_step}: " + " | ".join(shown))


class IterationProgressBar(RichProgressBar):
    """Rich progress bar labelled by iterations (training is iteration based: one epoch is
    the whole run, so the bar's count and ETA are over ``max_steps``)."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"train (max_steps={self.trainer.max_steps})"
