"""Segmentation models: encoders, decode/prototype heads, the segmentor, HRDA."""

from mpcl.models.encoders import MiT, ResNetV1c, load_mit_checkpoint, load_resnet_checkpoint
from mpcl.models.heads import DAFormerHead, DLV2Head, ProjectionHead, SegFormerHead
from mpcl.models.hrda import HRDASegmentor, crop_labels, slide_inference
from mpcl.models.segmentor import Segmentor

__all__ = [
    "DAFormerHead",
    "DLV2Head",
    "HRDASegmentor",
    "MiT",
    "ProjectionHead",
    "ResNetV1c",
    "SegFormerHead",
    "Segmentor",
    "crop_labels",
    "load_mit_checkpoint",
    "load_resnet_checkpoint",
    "slide_inference",
]
