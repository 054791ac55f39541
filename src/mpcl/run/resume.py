"""Where a run continues from, worked out once.

A run resumes from ``ckpt_path=<file>`` or, for a requeued SLURM job, from its own newest
checkpoint (``mpcl.run.launch.requeue_checkpoint``). The file is read once, into a
:class:`CheckpointFile`: the command line takes the stored overrides from it (``mpcl.run.cli``), the
training run checks its step and its weights' shapes against the model, clears the temp files
a killed save left beside it, and hands its contents to Lightning
(``AtomicCheckpointIO(loaded=...)``), which would otherwise read the file again.

    resume = CheckpointFile.read("logs/train/runs/<run>/checkpoints/last.ckpt")
    resume.step, resume.record["overrides"]
    resume.load_into(module)                    # eval, predict: the weights, strictly
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from mpcl.errors import ConfigError
from mpcl.run.checkpoint import check_state_dict, checkpoint_step, read_checkpoint, stored_run
from mpcl.run.launch import requeue_checkpoint


@dataclass(frozen=True)
class CheckpointFile:
    """A training checkpoint, read once.

    Attributes:
        path: the file.
        contents: what it holds (CPU tensors, memory-mapped).
    """

    path: Path
    contents: dict[str, Any]

    @classmethod
    def read(cls, path: str | os.PathLike) -> CheckpointFile:
        """Read ``path``; a missing, empty, truncated or foreign file is a one-line
        ConfigError naming it."""
        return cls(Path(path), read_checkpoint(path))

    @property
    def step(self) -> int:
        """The global step the checkpoint was saved at."""
        return checkpoint_step(self.contents)

    @property
    def record(self) -> dict | None:
        """The run's description (config, overrides, version), None for older checkpoints."""
        return stored_run(self.contents)

    def check_model(self, module: nn.Module) -> None:
        """One line (not torch's size-mismatch wall) unless the weights fit ``module``."""
        check_state_dict(module, self.contents["state_dict"], self.path)

    def load_into(self, module: nn.Module) -> None:
        """Load the weights into ``module`` strictly (eval, predict, notebooks)."""
        self.check_model(module)
        module.load_state_dict(self.contents["state_dict"], strict=True)

    def is_of(self, path: str | os.PathLike | None) -> bool:
        """Whether this is the checkpoint at ``path``."""
        return bool(path) and Path(path).resolve() == self.path.resolve()

    def check_steps_left(self, max_steps: int) -> None:
        """One line unless training from here has steps left (a resume that trains nothing
        is refused, whatever the run is called)."""
        if self.step >= max_steps:
            raise ConfigError(
                f"ckpt_path={self.path} is at step {self.step} and trainer.max_steps={max_steps}: "
                f"nothing left to train; set trainer.max_steps above {self.step} (or evaluate it "
                f"with python -m mpcl.eval ckpt_path={self.path})"
            )


def resume_for_training(
    cfg: DictConfig, given: CheckpointFile | None = None
) -> CheckpointFile | None:
    """The checkpoint a training run continues from: ``cfg.ckpt_path`` (``given`` when the
    command line read that file already), else a requeued SLURM job's own newest checkpoint,
    else None (a fresh run). An explicit ``ckpt_path`` must leave steps to train."""
    path = cfg.get("ckpt_path")
    if path:
        resume = given if given is not None and given.is_of(path) else CheckpointFile.read(path)
        resume.check_steps_left(int(cfg.trainer.max_steps))
        return resume
    requeued = requeue_checkpoint(cfg.paths.output_dir)
    return CheckpointFile.read(requeued) if requeued else None
