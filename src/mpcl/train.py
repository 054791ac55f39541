"""Train and adapt: the Hydra entry point.

    python -m mpcl.train                                   # default: experiment=synthetic_gaussian
    python -m mpcl.train experiment=synthetic_centroid     # centroid prototypes
    python -m mpcl.train experiment=synthetic_baseline     # DACS without prototypes
    python -m mpcl.train uda=source_only prototype=none    # lower bound;  uda=oracle: upper bound
    python -m mpcl.train benchmark.target=night            # the night target domain
    python -m mpcl.train prototype.K=3 prototype.lambda_contrast=0.2 seed=1
    python -m mpcl.train -m prototype.K=1,3,5              # Hydra multirun sweep
    python -m mpcl.train hparams_search=prototype_k        # Table IX / X sweep (K x lambda_1)
    python -m mpcl.train logger=wandb                      # + W&B, offline; `wandb sync <dir>` later
    python -m mpcl.train experiment=mic_gaussian paths.data_dir=/data   # GTA -> Cityscapes
    python -m mpcl.train ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # exact resume

A checkpoint carries its run's config: resuming from it needs no other argument (explicit
overrides still win). Ctrl-C / SIGTERM save a checkpoint and print the resume command; a
non-finite loss stops the run; see docs/reliability.md.

Config groups (top-level ``conf/``, installed as ``mpcl.conf``): data, model, uda, prototype, trainer, logger, callbacks,
paths, hydra, experiment, hparams_search, debug.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mpcl.distributed import is_rank_zero
from mpcl.errors import ConfigError, TrainingDiverged
from mpcl.io import file_lock
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
    # A fresh run may start from another run's weights; a resume continues its own.
    init_from = cfg.get("init_from") if resume is None else None
    if init_from == SOURCE_ONLY:
        init_from = str(source_only_start(cfg))
    echo(config_summary(cfg))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision"):
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    if is_rank_zero():  # temp files killed saves left in the log dir and beside the resume
        remove_stale_checkpoint_temps(
            cfg.paths.get("log_dir"), resume.path.parent if resume else None
        )
    datamodule, module, trainer = build(cfg, resume, init_from)
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


SOURCE_ONLY = "source_only"
# What the source-only start depends on: its cache key (paths, loggers, workers left out).
_START_KEYS = ("model", "data", "benchmark", "uda.optimizer", "uda.head_lr_mult", "seed")


def source_only_start(cfg: DictConfig) -> Path:
    """The checkpoint of ``init_from=source_only``: the student of ``cfg`` trained on the
    source domain alone (``uda.method=source_only``, no prototypes) for ``pretrain.steps``
    iterations, with ``cfg``'s model, data and optimizer and ``pretrain.seed``: like ImageNet
    weights, one start for every seed of a study (the run's seed does not change it).

    Built once per such configuration (a hash of it names the file), deterministically, under
    ``<paths.cache_dir>/starts/``; concurrent runs (sweep jobs, DDP ranks) wait on a file lock
    for the first to build it, as for the benchmark data.
    """
    steps = int(cfg.pretrain.steps)
    if steps < 1:
        raise ConfigError(f"pretrain.steps={steps} must be >= 1 (init_from=source_only)")
    pre = cfg.copy()
    with open_dict(pre):
        pre.hydra = None
        pre.uda.method = "source_only"
        pre.prototype = None
        pre.init_from = pre.ckpt_path = None
        pre.seed = int(cfg.pretrain.get("seed", 0))
        pre.evaluate = False
        pre.logger = None
        pre.trainer.max_steps = steps
        pre.trainer.limit_val_batches = 0
        pre.trainer.devices, pre.trainer.num_nodes, pre.trainer.strategy = 1, 1, "auto"
        pre.trainer.sync_batchnorm, pre.trainer.plugins = False, None
        pre.data.num_workers = cfg.data.get("num_workers", 0)
    described: dict = {"steps": steps}
    for k in _START_KEYS:
        node = OmegaConf.select(pre, k)
        resolvable = isinstance(node, DictConfig)
        described[k] = OmegaConf.to_container(node, resolve=True) if resolvable else node
    described["data"].pop("num_workers", None)
    key = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
    starts = Path(cfg.paths.cache_dir) / "starts"
    path = starts / f"source_only-{key[:16]}.ckpt"
    with file_lock(starts / f".{path.name}.lock"):
        if path.is_file():
            return path
        build_dir = starts / f".build-{key[:16]}"
        shutil.rmtree(build_dir, ignore_errors=True)
        with open_dict(pre):
            pre.paths.output_dir = str(build_dir)
            pre.callbacks = {
                "model_checkpoint": {
                    "_target_": "mpcl.run.checkpoint.Checkpoint",
                    "dirpath": str(build_dir / "checkpoints"),
                    "filename": "last",
                    "save_last": False,
                    "every_n_train_steps": 0,
                    "save_on_train_epoch_end": False,
                }
            }
        echo(f"building the source-only start ({steps} steps on the source): {path}")
        train(pre)
        os.replace(build_dir / "checkpoints" / "last.ckpt", path)  # same file system: atomic
        shutil.rmtree(build_dir, ignore_errors=True)
    return path


def _train_task(cfg: DictConfig, resume: CheckpointFile | None) -> float | None:
    """``train``, returning the metric a Hydra sweeper optimises (``optimized_metric``)."""
    metrics = train(cfg, resume)
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def main() -> None:
    run_cli("train", _train_task)


if __name__ == "__main__":
    main()
