"""mpcl: contrastive learning with multiple prototypes for UDA semantic segmentation."""

__version__ = "0.1.0"
