"""mpcl: contrastive learning with multiple prototypes for UDA semantic segmentation."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _default_precision() -> str:
    """bf16 autocast on a GPU, fp32 on the CPU (``trainer.precision: ${mpcl.precision:}``)."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


OmegaConf.register_new_resolver("mpcl.precision", _default_precision, replace=True)
