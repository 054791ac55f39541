"""Checkpoints that are atomic, final and self-describing.

* ``AtomicCheckpointIO``: every checkpoint Lightning writes goes to a temp file in the
  checkpoint's own directory, is fsynced and renamed (``mpcl.io.atomic_path``): a SIGKILL or a
  full disk mid-save leaves the previous file whole, and a failed write raises an OSError that
  names the file.
* ``Checkpoint``: Lightning's ``ModelCheckpoint`` that also saves when training ends, so the
  ``last.ckpt`` a run prints is the model behind the mIoU it prints, whatever ``max_steps``
  and the checkpoint cadence.
* ``RunConfig``: stores the resolved config and the command-line overrides in every checkpoint
  (key ``"mpcl"``), so that ``mpcl.eval`` / ``mpcl.predict`` / a resume rebuild the run from
  the checkpoint alone (``mpcl.run.cli`` puts the stored overrides before the user's).
* ``read_checkpoint`` / ``check_state_dict``: unreadable or mismatched
  checkpoints are a one-line ``ConfigError``, not a traceback.

    trainer = L.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[Checkpoint(...), RunConfig(cfg)])

Resuming (which file, read once, handed to Lightning through ``AtomicCheckpointIO``):
``mpcl.run.resume``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from mpcl.errors import ConfigError
from mpcl.io import atomic_path, remove_stale_temps

log = logging.getLogger(__name__)

# Where a checkpoint keeps its run's description: {"config", "overrides", "version"}.
RUN_KEY = "mpcl"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.<pid>@<host>.tmp`` beside the target, fsync, rename.

    Args:
        loaded: a checkpoint already read (``mpcl.run.resume.CheckpointFile``): (path, contents).
            Lightning's resume then gets these contents instead of reading the file again.
    """

    def __init__(self, loaded: tuple[str | os.PathLike, dict] | None = None) -> None:
        super().__init__()
        self._loaded = (Path(loaded[0]).resolve(), loaded[1]) if loaded else None

    def load_checkpoint(self, path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        if self._loaded is not None and Path(path).resolve() == self._loaded[0]:
            checkpoint, self._loaded = self._loaded[1], None  # handed over once
            return checkpoint
        return super().load_checkpoint(path, **kwargs)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"could not create {path.parent}: {e.strerror}") from e
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(checkpoint, f)
            except RuntimeError as e:
                # torch's zip writer turns the OSError of a full disk into a RuntimeError.
                cause = e.__context__
                if isinstance(cause, OSError):
                    raise OSError(cause.errno, f"could not write {path}: {cause.strerror}") from e
                raise OSError(f"could not write {path}: {str(e).splitlines()[0]}") from e


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves the final step too (Lightning does not re-save ``last``
    at the end of training when a periodic checkpoint was written before it)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    def save_now(self, trainer: L.Trainer) -> str:
        """Save the current step (the periodic file and ``last``) unless it is saved already;
        returns the path of the newest checkpoint ("" when checkpoints are off)."""
        if not (
            trainer.fast_dev_run
            or trainer.sanity_checking
            or self._last_global_step_saved == trainer.global_step
        ):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return self.newest_path

    @property
    def newest_path(self) -> str:
        return self.last_model_path or self._last_checkpoint_saved or self.best_model_path

    @property
    def saved_step(self) -> int:
        """The global step of the newest checkpoint this run saved (0: none)."""
        return self._last_global_step_saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run writes into its own run directory; Lightning warns about that.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """The run's description: the resolved config (without Hydra's own node), the
    command-line overrides and the package version; plain Python types only."""
    from hydra.core.hydra_config import HydraConfig

    import mpcl

    masked = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        config = OmegaConf.to_container(masked, resolve=True)
    except Exception:  # an entry that resolves only inside a Hydra run: keep it as written
        config = OmegaConf.to_container(masked, resolve=False)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return {"config": config, "overrides": overrides, "version": mpcl.__version__}


class RunConfig(L.Callback):
    """Writes ``run_record(cfg)`` into every checkpoint under ``checkpoint["mpcl"]``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.record = run_record(cfg)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_KEY] = self.record


def _load(path: Path) -> Any:
    try:  # memory-mapped: reading the config of a 1 GB checkpoint costs nothing
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy format


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict:
    """Load a training checkpoint (CPU, memory-mapped, ``weights_only``); a missing, empty,
    truncated or foreign file is a one-line ``ConfigError`` naming it (and the config ``key``
    that gave it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}={p} does not exist: give the path of a .ckpt file")
    if p.stat().st_size == 0:
        raise ConfigError(
            f"cannot read checkpoint {p}: it is empty (0 bytes, a copy or save cut short): "
            "use an earlier checkpoint"
        )
    try:
        checkpoint = _load(p)
    except Exception as e:  # truncated, random bytes, another format
        raise ConfigError(
            f"cannot read checkpoint {p} ({type(e).__name__}: truncated or not a .ckpt): "
            "use an earlier checkpoint"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{p} has no state_dict: it is not an mpcl training checkpoint")
    return checkpoint


def stored_run(checkpoint: dict) -> dict | None:
    """The ``run_record`` a checkpoint carries, or None (older checkpoints)."""
    record = checkpoint.get(RUN_KEY)
    return record if isinstance(record, dict) and "overrides" in record else None


def check_state_dict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> None:
    """Raise a one-line ``ConfigError`` unless ``state`` has exactly ``module``'s keys and
    shapes (``load_state_dict`` would raise a multi-line RuntimeError on a size mismatch)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [
        (k, list(state[k].shape), list(v.shape))
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or resized):
        return
    parts = []
    if resized:
        k, theirs, ours = resized[0]
        more = f" (+{len(resized) - 1} more)" if len(resized) > 1 else ""
        parts.append(f"{k} is {theirs} in the checkpoint but {ours} in the model{more}")
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    raise ConfigError(
        f"{path} does not match the configured model ({'; '.join(parts)}): pass the run's "
        "experiment/overrides, or drop those that change the model"
    )


def load_student(student: torch.nn.Module, path: str | os.PathLike) -> None:
    """Start ``student`` from the student weights of an mpcl training checkpoint
    (``init_from=<file>``: e.g. a source-only model, as CBST/ProDA-style pipelines warm up).

    Strict, except for the prototype head: a checkpoint without one (a run with
    ``prototype=none``) leaves the student's own initial head; a checkpoint with one loads
    into a student without it by dropping those keys. Anything else that differs is a
    one-line ConfigError.
    """
    checkpoint = read_checkpoint(path, key="init_from")
    state = {
        k.removeprefix("student."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("student.")
    }
    if not state:
        raise ConfigError(
            f"init_from={path} holds no student weights (student.*): give an mpcl training "
            "checkpoint"
        )
    own = student.state_dict()
    heads = [k for k in own if k.startswith("proto_head.")]
    if heads and not any(k.startswith("proto_head.") for k in state):
        state |= {k: own[k] for k in heads}
    elif not heads:
        state = {k: v for k, v in state.items() if not k.startswith("proto_head.")}
    check_state_dict(student, state, path)
    student.load_state_dict(state, strict=True)


def checkpoint_step(checkpoint: dict) -> int:
    return int(checkpoint.get("global_step", 0))


def remove_stale_checkpoint_temps(
    log_dir: str | os.PathLike | None, *directories: str | os.PathLike
) -> int:
    """Clear temp files that killed saves left in the runs under ``log_dir``
    (``<task>/runs/<run>/checkpoints`` and ``<task>/multiruns/<sweep>/<job>/checkpoints``) and
    in ``directories`` (e.g. the checkpoint directory a run resumes from)."""
    found = [Path(d) for d in directories if d and Path(d).is_dir()]
    if log_dir:
        root = Path(log_dir)
        for pattern in ("*/runs/*/checkpoints", "*/multiruns/*/*/checkpoints"):
            found += list(root.glob(pattern))
    removed = sum(remove_stale_temps(d) for d in dict.fromkeys(p.resolve() for p in found))
    if removed:
        log.info("removed %d temp files left by killed checkpoint saves", removed)
    return removed
