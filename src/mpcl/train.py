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

import lightning as L
import torch
from omegaconf import DictConfig

from mpcl.distributed import is_rank_zero
from mpcl.errors import TrainingDiverged
from mpcl.monitor.dashboard import log_config
from mpcl.monitor.report import final_report
from mpcl.run.build import build
from mpcl.run.checkpoint import remove_stale_checkpoint_temps
from mpcl.run.cli import run_cli
from mpcl.run.config import validate
from mpcl.run.guards import DivergenceGuard, InterruptGuard
from mpcl.run.launch import check_launch
from mpcl.run.resume import CheckpointFile, resume_for_training
from mpcl.run.runlog import config_summary, copy_stdout, echo

__all__ = ["main", "train"]

log = logging.getLogger("mpcl")


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


def train(cfg: DictConfig, resume: CheckpointFile | None = None) -> dict[str, float]:
    """Fit, then evaluate the student on target val; returns the final metrics.

    ``resume``: the ``cfg.ckpt_path`` checkpoint if the caller has read it already
    (``mpcl.run.cli``); otherwise it is read here, as is a requeued SLURM job's own.
    """
    validate(cfg)
    check_launch(cfg)  # a plain multirun cannot start DDP ranks (mpcl.run.launch)
    resume = resume_for_training(cfg, resume)
    echo(config_summary(cfg))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if is_rank_zero():  # temp files killed saves left in the log dir and beside the resume
        remove_stale_checkpoint_temps(
            cfg.paths.get("log_dir"), resume.path.parent if resume else None
        )
    datamodule, module, trainer = build(cfg, resume)
    log_config(cfg, trainer)  # the resolved config as the W&B run config (mpcl.monitor)
    if resume is not None:  # another model's checkpoint: one line, not Lightning's wall
        resume.check_model(module)
    _fit(trainer, module, datamodule, str(resume.path) if resume else None)
    metrics = {}
    if cfg.get("evaluate", True):
        # The fit loop may already have validated at the last step; don't do it twice.
        if module.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with copy_stdout():  # the table and the paths, into the log file too
        final_report(cfg, module, trainer, metrics)
    return metrics


def _train_task(cfg: DictConfig, resume: CheckpointFile | None) -> float | None:
    """``train``, returning the metric a Hydra sweeper optimises (``optimized_metric``)."""
    metrics = train(cfg, resume)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def main() -> None:
    run_cli("train", _train_task)


if __name__ == "__main__":
    main()
