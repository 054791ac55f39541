"""Every error type a user can meet, and the exit status each one ends a command with.

The entry points (``mpcl.run.cli.report_error``) turn these into one line and an exit status;
docs/reliability.md lists the same table:

| status | error | meaning |
| --- | --- | --- |
| 2 | ``ConfigError`` (and any ``ValueError`` / ``OSError``) | bad input: a config value, a path, a file |
| 3 | ``TrainingDiverged`` | a non-finite loss or weights; the newest checkpoint is the last finite one |
| 4 | ``SweepFailed`` | a multirun ran every job, and some failed (each job's status is in the summary) |
| 128 + signal | ``RunInterrupted`` | SIGINT (130) / SIGTERM (143): a checkpoint was saved |

Any other exception is a bug and keeps its traceback. This module imports nothing of ours, so
every layer (data, models, prototypes, run) may raise these.
"""

from __future__ import annotations

import shlex
import signal

# Exit statuses of the console commands.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_SWEEP_FAILED = 4
EXIT_BUG = 1  # an unexpected exception (a bug; it keeps its traceback)


class ConfigError(ValueError):
    """An invalid config value or input file; the message names the key or path and the fix."""

    exit_code = EXIT_BAD_INPUT


class UnknownKeyError(ConfigError):
    """An override of a key the config does not have (``key``: the dotted key)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class CheckpointError(ConfigError):
    """A weights file that cannot be read or does not match the model (one line)."""


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or weights (the message is one line)."""

    exit_code = EXIT_DIVERGED


class SweepFailed(RuntimeError):
    """Some jobs of a multirun failed; the others ran to their end (the message is one line)."""

    exit_code = EXIT_SWEEP_FAILED


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint at ``step`` was saved to ``path``
    (``saved``), or, at a second signal, at once: ``path`` is then the last intact
    checkpoint (empty if none was written yet)."""

    def __init__(self, signum: int, step: int, path: str, saved: bool = True) -> None:
        self.signum, self.step, self.path = signum, step, path
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        resume = f"\nresume with: python -m mpcl.train ckpt_path={shlex.quote(str(path))}"
        if not saved:
            last = f"the last intact checkpoint is {path}{resume}" if path else "no checkpoint yet"
            super().__init__(f"interrupted by {name} again at step {step}: stopped at once; {last}")
        elif path:
            super().__init__(
                f"interrupted by {name} at step {step}: saved a resumable checkpoint {path}{resume}"
            )
        else:
            super().__init__(f"interrupted by {name} at step {step}: checkpoints are off")
