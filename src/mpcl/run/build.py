"""Build what every entry point needs from a composed config: the UDA LightningModule, the data
module and the Trainer (with the guards every run gets, whatever its callbacks group says).

    datamodule, module, trainer = build(cfg)         # train
    module = build_module(cfg)                       # predict: the model
    dataset = build_target(cfg)                      # eval, predict: only the target set read
    trainer = build_trainer(cfg, single_process=True)   # eval

Every labelled dataset built here checks each label it reads against the model's class set
(``check_labels``): a value outside it is one line naming the file.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import Dataset

from mpcl.data.base import SegmentationDataset
from mpcl.errors import ConfigError
from mpcl.run.checkpoint import AtomicCheckpointIO, RunConfig, load_student
from mpcl.run.guards import DivergenceGuard, InterruptGuard
from mpcl.run.resume import CheckpointFile
from mpcl.run.runlog import ProgressLog
from mpcl.streams import seeded


def build_module(cfg: DictConfig, init_from: str | None = None) -> L.LightningModule:
    """The UDA LightningModule: student, EMA teacher and prototypes built for the student.

    Without prototypes (``prototype=none``) the student gets no prototype head; with them,
    the prototype learner takes its feature dim and resolutions from the student. The
    prototype head and the prototypes draw their initial values from their own streams
    (``mpcl.streams.seeded``): the rest of the student starts from the same weights with or
    without them. ``init_from`` (a training run's ``cfg.init_from``) then loads the student's
    weights from a checkpoint (the teacher and the Feature Distance reference start as its
    copies); eval, predict and a resume leave it out, their weights come from their
    checkpoint.
    """
    # _convert_="all": constructors get plain lists/dicts, which checkpoints can hold.
    prototype_cfg = cfg.get("prototype")
    if prototype_cfg is not None and "_target_" not in prototype_cfg:
        raise ConfigError(
            "prototype.* is set but there are no prototypes: choose prototype=gaussian or "
            "prototype=centroid, or drop the prototype.* overrides"
        )
    seed = int(cfg.get("seed") or 0)
    head = None
    if prototype_cfg is not None and cfg.model.get("proto_head") is not None:
        with seeded(seed, "prototype_head"):
            head = instantiate(cfg.model.proto_head, _convert_="all")
    student = instantiate(cfg.model, _convert_="all", proto_head=head)
    if init_from:
        load_student(student, init_from)
    prototype = None
    if prototype_cfg is not None:
        with seeded(seed, "prototypes"):
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


def check_labels(datasets: Any, num_classes: int) -> None:
    """Make every ``SegmentationDataset`` in ``datasets`` (a data module, a dataset, or
    wrappers of one: ``.dataset``) check the labels it reads against ``num_classes``."""
    if isinstance(datasets, L.LightningDataModule):
        names = ("source_train", "source_sampler_dataset", "target_train", "target_val")
        for name in names:
            check_labels(getattr(datasets, name, None), num_classes)
        return
    seen = 0
    while datasets is not None and seen < 8:  # a wrapper of a wrapper of ... a dataset
        if isinstance(datasets, SegmentationDataset):
            datasets.num_classes = num_classes
        datasets, seen = getattr(datasets, "dataset", None), seen + 1


def build_target(cfg: DictConfig, split: str | None = None) -> Dataset:
    """The target set eval and predict read (``data.target_val``; ``split``: another split
    of it), and nothing else: no source data need be on disk. Its labels are checked."""
    ds_cfg = cfg.data.target_val.copy()
    if split is not None:
        with open_dict(ds_cfg):
            ds_cfg.split = split
    dataset = instantiate(ds_cfg, _convert_="all")
    check_labels(dataset, len(cfg.class_names))
    return dataset


def build(
    cfg: DictConfig, resume: CheckpointFile | None = None, init_from: str | None = None
) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate data module, LightningModule and Trainer from a composed config.

    Whatever the callbacks group says, checkpoints are written atomically and carry the run's
    config, a non-finite loss stops training, SIGINT/SIGTERM save a checkpoint, and the log
    file gets progress lines (``mpcl.run.checkpoint``, ``mpcl.run.guards``,
    ``mpcl.run.runlog``). ``resume``: the checkpoint ``trainer.fit`` will be given, already
    read (Lightning gets its contents instead of reading the file again). ``init_from``: a
    checkpoint whose student weights the module starts from (``build_module``).
    """
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_module(cfg, init_from)
    check_labels(datamodule, module.num_classes)
    return datamodule, module, build_trainer(cfg, resume)


def build_trainer(
    cfg: DictConfig, resume: CheckpointFile | None = None, single_process: bool = False
) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` with the guards (see ``build``). ``single_process``:
    one device, no DDP, whatever the run was trained with (eval: one process prints one
    table)."""
    loggers = [instantiate(c) for c in _targets(cfg.get("logger"))]
    callbacks = [instantiate(c) for c in _targets(cfg.get("callbacks"))]
    callbacks += [DivergenceGuard(), InterruptGuard(), RunConfig(cfg), ProgressLog()]
    # Added to the config's plugins (e.g. trainer=ddp_sim's BatchNorm sync), not in their place.
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    loaded = (resume.path, resume.contents) if resume is not None else None
    one: dict[str, Any] = {}
    if single_process:
        one = dict(devices=1, num_nodes=1, strategy="auto", sync_batchnorm=False)
        plugins = []  # e.g. trainer=ddp_sim's BatchNorm sync: nothing to sync
    return instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[*plugins, AtomicCheckpointIO(loaded=loaded)],
        **one,
    )
