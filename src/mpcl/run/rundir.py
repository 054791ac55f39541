"""A run directory belongs to one run: ``<run dir>/.mpcl.lock`` names the process that writes
there (``pid@host``, and the SLURM job), from before Hydra writes ``.hydra/`` to the run's end.

    lock = RunDirLock(run_dir)
    lock.acquire()      # one line (ConfigError) if another live run holds it
    ...
    lock.release()

A lock whose holder is gone is taken over: a dead process on this machine, a requeue of the
same SLURM job (on whichever node), or, for a holder on another machine (a shared file
system), a lock untouched for ``mpcl.io.FOREIGN_TEMP_AGE_S``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mpcl.errors import ConfigError
from mpcl.io import host_tag, writer_is_gone

LOCK_NAME = ".mpcl.lock"


def _holder_text() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    return f"{os.getpid()}@{host_tag()} {job}".strip() + "\n"


class RunDirLock:
    """The lock of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._text = _holder_text()
        self.held = False

    def _stale(self, holder: str) -> bool:
        parts = holder.split()
        if not parts or "@" not in parts[0]:
            return True  # empty or unreadable: a writer killed mid-write
        pid, _, host = parts[0].partition("@")
        job = parts[1] if len(parts) > 1 else ""
        if job and job == os.environ.get("SLURM_JOB_ID"):
            return True  # this SLURM job, requeued: its earlier run is over
        return not pid.isdigit() or writer_is_gone(int(pid), host, self.path)

    def acquire(self) -> None:
        """Create the run directory and take its lock; a ConfigError (one line) if another
        live run holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = self.path.read_text()
                    since = time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(self.path.stat().st_mtime)
                    )
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if not self._stale(holder):
                    raise ConfigError(
                        f"the run directory {self.run_dir} is in use by another run "
                        f"({' '.join(holder.split()[:1])}, since {since}): give this run its "
                        f"own hydra.run.dir (or delete {self.path} if that run is gone)"
                    ) from None
                self.path.unlink(missing_ok=True)  # a stale lock: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._text)
            self.held = True
            return
        raise ConfigError(f"cannot take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
        """Remove the lock if this process still holds it (the run directory may be gone)."""
        if not self.held:
            return
        self.held = False
        try:
            if self.path.read_text() == self._text:
                self.path.unlink()
        except FileNotFoundError:
            pass
