"""mpcl: contrastive learning with multiple prototypes for UDA semantic segmentation."""

import warnings

from omegaconf import OmegaConf

# conf/hydra/launcher/submitit_*.yaml hold every key of the hydra-submitit-launcher plugin's
# schema of the same name, so Hydra 1.3 validates them against it (deprecated, with a warning
# on every run; the files stay complete configs without it).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")
# Lightning (<= 2.6) tests `isinstance(treespec, LeafSpec)` in its own pytree helper, which
# torch >= 2.10 deprecates, with a warning on every run: nothing of ours to change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

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


def _class_names(spec: str) -> list[str]:
    """The class names of a label set (``class_names: ${mpcl.class_names:${label_set}}``):
    "cityscapes" (the 19 trainId classes of cityscapesscripts) or a classes.yaml path."""
    from mpcl.data.labels import label_set

    return list(label_set(spec).names)


def _palette(spec: str) -> list[list[int]]:
    """The (C, 3) RGB class colours of a label set (``palette: ${mpcl.palette:${label_set}}``)."""
    from mpcl.data.labels import label_set

    return label_set(spec).palette.tolist()


def _thing_classes(spec: str) -> list[int]:
    """The "thing" class indices of a label set (the ImageNet Feature Distance's classes)."""
    from mpcl.data.labels import label_set

    return list(label_set(spec).thing_classes)


def _folder_default(key: str, images: str, max_size: int | None) -> int:
    """``crop_size`` or ``rcs_min_pixels`` from a folder's image sizes (``data=folders``:
    ``${mpcl.folder_default:crop_size,<images>,<max_size>}``; ``mpcl.data.folders.size_defaults``)."""
    from mpcl.data.folders import size_defaults

    return size_defaults(images, max_size)[key]


OmegaConf.register_new_resolver("mpcl.class_names", _class_names, replace=True)
OmegaConf.register_new_resolver("mpcl.palette", _palette, replace=True)
OmegaConf.register_new_resolver("mpcl.thing_classes", _thing_classes, replace=True)
OmegaConf.register_new_resolver("mpcl.folder_default", _folder_default, replace=True)
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
