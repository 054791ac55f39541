"""mpcl: contrastive learning with multiple prototypes for UDA semantic segmentation."""

import warnings

from omegaconf import OmegaConf

# conf/hydra/launcher/submitit_*.yaml hold every key of the hydra-submitit-launcher plugin's
# schema of the same name, so Hydra 1.3 validates them against it (deprecated, with a warning
# on every run; the files stay complete configs without it).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")

__version__ = "0.1.0"


def _default_precision() -> str:
    """bf16 autocast on a GPU, fp32 on the CPU (``trainer.precision: ${mpcl.precision:}``)."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


OmegaConf.register_new_resolver("mpcl.precision", _default_precision, replace=True)


def _input_resolution(model_target: str) -> str:
    """ "multi" for a multi-resolution student (HRDA, MIC: ``len(resolutions) > 1``), else
    "single" (``benchmark.resolution: ${mpcl.resolution:${model._target_}}``): the data
    sizes follow the model instead of restating it."""
    from hydra.utils import get_class

    return "multi" if len(get_class(model_target).resolutions) > 1 else "single"


OmegaConf.register_new_resolver("mpcl.resolution", _input_resolution, replace=True)


def _class_names(label_set: str) -> list[str]:
    """The class names of a known label set (``class_names: ${mpcl.class_names:cityscapes}``
    in the data configs): "cityscapes" is the 19 trainId classes of cityscapesscripts."""
    if label_set != "cityscapes":
        raise ValueError(f"unknown label set {label_set!r}: use cityscapes, or list class_names")
    from mpcl.data.labels import CLASS_NAMES

    return list(CLASS_NAMES)


OmegaConf.register_new_resolver("mpcl.class_names", _class_names, replace=True)
# ``num_classes: ${mpcl.len:${class_names}}``: the number follows the data config's list.
OmegaConf.register_new_resolver("mpcl.len", len, replace=True)


def _run_name() -> str:
    """The W&B run name: experiment + overrides (``${mpcl.run_name:}``; mpcl.monitor.dashboard)."""
    from mpcl.monitor.dashboard import run_name

    return run_name()


def _run_group() -> str:
    """The W&B group: the multirun, "" for a single run (``${mpcl.run_group:}``)."""
    from mpcl.monitor.dashboard import run_group

    return run_group()


OmegaConf.register_new_resolver("mpcl.run_name", _run_name, replace=True)
OmegaConf.register_new_resolver("mpcl.run_group", _run_group, replace=True)
