"""Tensors to pictures: the conversions every figure, debug grid and W&B image shares."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from mpcl.data.labels import colorize
from mpcl.io import write_image


def rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(
        np.uint8
    )


def gray(values: torch.Tensor) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 (viridis), e.g. weights and masks."""
    v = (values.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(v, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def labels(values: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices (255 = ignore) -> (H, W, 3) uint8 in the class colours.

    ``palette``: (C, 3) uint8 RGB class colours (``UDAModule.palette``); ignore is black.
    """
    return colorize(values.detach().cpu().numpy().astype(np.int64).clip(0, 255), palette)


def save_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) RGB image atomically; a failed write raises OSError naming path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
