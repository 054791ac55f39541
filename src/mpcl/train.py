"""Train and adapt: the Hydra entry point.

    python -m mpcl.train                                   # synthetic benchmark, MPCL Gaussian
    python -m mpcl.train prototype=centroid prototype.K=3
    python -m mpcl.train uda=source_only prototype=none    # the lower bound
    python -m mpcl.train experiment=mic_gaussian paths.data_dir=/data   # GTA -> Cityscapes
    python -m mpcl.train -m prototype.K=1,3,5              # a multirun sweep
    python -m mpcl.train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume

A checkpoint carries its run's config: resuming from it needs no other argument (explicit
overrides still win). Ctrl-C / SIGTERM save a checkpoint and print the resume command; a
non-finite loss stops the run; see docs/reliability.md.

Config groups (top-level ``conf/``, installed as ``mpcl.conf``): data, model, uda, prototype, trainer, logger, callbacks,
paths, hydra, experiment, hparams_search, debug.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from mpcl.checkpoint import (
    AtomicCheckpointIO,
    RunConfig,
    check_state_dict,
    read_checkpoint,
    remove_stale_checkpoint_temps,
)
from mpcl.cli import report_error, run_cli
from mpcl.config import ConfigError, validate
from mpcl.dashboard import log_config
from mpcl.distributed import check_launch, requeue_checkpoint
from mpcl.guards import DivergenceGuard, InterruptGuard, TrainingDiverged
from mpcl.io import remove_stale_temps
from mpcl.report import final_report
from mpcl.runlog import ProgressLog, config_summary, copy_stdout, echo

__all__ = ["build", "build_module", "main", "report_error", "run_cli", "train"]

log = logging.getLogger("mpcl")


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The UDA LightningModule: student, EMA teacher and prototypes built for the student.

    Without prototypes (``prototype=none``) the student gets no prototype head; with them,
    the prototype learner takes its feature dim and resolutions from the student.
    """
    # _convert_="all": constructors get plain lists/dicts, which checkpoints can hold.
    prototype_cfg = cfg.get("prototype")
    no_head = {} if prototype_cfg is not None else {"proto_head": None}
    student = instantiate(cfg.model, _convert_="all", **no_head)
    prototype = None
    if prototype_cfg is not None:
        if "_target_" not in prototype_cfg:
            raise ConfigError(
                "prototype.* is set but there are no prototypes: choose prototype=gaussian or "
                "prototype=centroid, or drop the prototype.* overrides"
            )
        prototype = instantiate(
            prototype_cfg,
            dim=student.prototype_dim,
            resolutions=list(student.resolutions),
            _convert_="all",
        )
    return instantiate(cfg.uda, student=student, prototype=prototype, _convert_="all")


def _targets(group: DictConfig | None) -> list[DictConfig]:
    """The entries of a logger/callbacks group that name a ``_target_`` (null ones are off)."""
    return [c for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data module, LightningModule and Trainer from a composed config.

    Whatever the callbacks group says, checkpoints are written atomically and carry the run's
    config, a non-finite loss stops training, SIGINT/SIGTERM save a checkpoint, and the log
    file gets progress lines (``mpcl.checkpoint``, ``mpcl.guards``, ``mpcl.runlog``).
    """
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)
    loggers = [instantiate(c) for c in _targets(cfg.get("logger"))]
    callbacks = [instantiate(c) for c in _targets(cfg.get("callbacks"))]
    callbacks += [DivergenceGuard(), InterruptGuard(), RunConfig(cfg), ProgressLog()]
    # Added to the config's plugins (e.g. trainer=ddp_sim's BatchNorm sync), not in their place.
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[*plugins, AtomicCheckpointIO()],
    )
    return datamodule, module, trainer


def _check_resume(module: L.LightningModule, ckpt_path: str) -> None:
    """A checkpoint of another model is one line (not Lightning's size-mismatch wall); temp
    files a killed save left beside it are cleared."""
    check_state_dict(module, read_checkpoint(ckpt_path)["state_dict"], ckpt_path)
    remove_stale_temps(Path(ckpt_path).parent)


def _fit(trainer: L.Trainer, module: L.LightningModule, datamodule, ckpt_path) -> None:
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as e:
        # A divergence can surface as an unrelated error first (e.g. inside K-Means).
        if isinstance(e, TrainingDiverged):
            raise
        for cb in trainer.callbacks:
            if isinstance(cb, DivergenceGuard):
                reason = cb.diagnose(trainer, module, weights=True)
                if reason:
                    raise TrainingDiverged(reason) from e
        raise
    finally:  # after a failed fit Lightning's teardown re-installs the guard's handlers
        for cb in trainer.callbacks:
            if isinstance(cb, InterruptGuard):
                cb.restore()


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then evaluate the student on target val; returns the final metrics."""
    validate(cfg)
    check_launch(cfg)  # a plain multirun cannot start DDP ranks (mpcl.distributed)
    echo(config_summary(cfg))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if cfg.paths.get("log_dir"):
        remove_stale_checkpoint_temps(cfg.paths.log_dir)
    datamodule, module, trainer = build(cfg)
    log_config(cfg, trainer)  # the resolved config as the W&B run config (mpcl.dashboard)
    # A requeued SLURM job resumes from its own newest checkpoint (mpcl.distributed).
    ckpt_path = cfg.get("ckpt_path") or requeue_checkpoint(cfg.paths.output_dir)
    if ckpt_path:
        _check_resume(module, ckpt_path)
    _fit(trainer, module, datamodule, ckpt_path)
    metrics = {}
    if cfg.get("evaluate", True):
        # The fit loop may already have validated at the last step; don't do it twice.
        if getattr(module, "last_val_step", None) != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with copy_stdout():  # the table and the paths, into the log file too
        final_report(cfg, module, trainer, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://mpcl.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    with report_error():
        metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def main() -> None:
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
