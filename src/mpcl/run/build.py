"""Build what every entry point needs from a composed config: the UDA LightningModule, the data
module and the Trainer (with the guards every run gets, whatever its callbacks group says).

    module = build_module(cfg)                       # predict: the model only
    datamodule, module, trainer = build(cfg)         # train, eval
"""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from mpcl.errors import ConfigError
from mpcl.run.checkpoint import AtomicCheckpointIO, RunConfig
from mpcl.run.guards import DivergenceGuard, InterruptGuard
from mpcl.run.resume import CheckpointFile
from mpcl.run.runlog import ProgressLog


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


def build(
    cfg: DictConfig, resume: CheckpointFile | None = None
) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data module, LightningModule and Trainer from a composed config.

    Whatever the callbacks group says, checkpoints are written atomically and carry the run's
    config, a non-finite loss stops training, SIGINT/SIGTERM save a checkpoint, and the log
    file gets progress lines (``mpcl.run.checkpoint``, ``mpcl.run.guards``,
    ``mpcl.run.runlog``). ``resume``: the checkpoint ``trainer.fit`` will be given, already
    read (Lightning gets its contents instead of reading the file again).
    """
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg)
    loggers = [instantiate(c) for c in _targets(cfg.get("logger"))]
    callbacks = [instantiate(c) for c in _targets(cfg.get("callbacks"))]
    callbacks += [DivergenceGuard(), InterruptGuard(), RunConfig(cfg), ProgressLog()]
    # Added to the config's plugins (e.g. trainer=ddp_sim's BatchNorm sync), not in their place.
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    loaded = (resume.path, resume.contents) if resume is not None else None
    trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[*plugins, AtomicCheckpointIO(loaded=loaded)],
    )
    return datamodule, module, trainer
