"""The one dataset class: image files with (optional) label files, read and augmented.

Every dataset (synthetic, GTA, Synthia, Cityscapes, ACDC, Dark Zurich) is a list of image
paths, an optional parallel list of label paths, and a label lookup table into the 19-class
trainId space. Images come out as float tensors in [0, 1] (the model normalises them), so
that mixing and colour augmentation work on plain RGB values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV threads would oversubscribe


def read_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit RGB image -> (H, W, 3) uint8. Raises a one-line error on a bad file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path}: missing or corrupt file; re-extract or delete it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    """Read a label PNG unchanged -> (H, W) or (H, W, C) integer array (C in OpenCV BGR order)."""
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise OSError(f"cannot read label {path}: missing or corrupt file; re-extract or delete it")
    return lab


class SegmentationDataset(Dataset):
    """Images and optional labels, with an albumentations transform.

    Args:
        images: image file paths.
        labels: label file paths parallel to ``images``, or None for an unlabelled set.
        transform: an albumentations ``Compose`` (image + mask), or None.
        label_map: (256,) uint8 lookup table from the file's IDs to trainIds, or None when the
            label files already hold trainIds.
        label_reader: reads a label file into an (H, W) integer array (default: ``read_label``).

    Items are dicts: ``image`` (3, H, W) float32 in [0, 1], ``label`` (H, W) int64 with 255 =
    ignore (only when labelled), ``valid`` (H, W) bool (False on padding and on ignored frame
    borders, when the transform takes a ``valid`` mask), ``name`` the image file stem.
    """

    def __init__(
        self,
        images: Sequence[str | Path],
        labels: Sequence[str | Path] | None = None,
        transform: Callable | None = None,
        label_map: np.ndarray | None = None,
        label_reader: Callable[[str | Path], np.ndarray] = read_label,
    ) -> None:
        if labels is not None and len(labels) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(labels)} labels: every image needs one"
            )
        self.images = [Path(p) for p in images]
        self.labels = None if labels is None else [Path(p) for p in labels]
        self.transform = transform
        self.label_map = label_map
        self.label_reader = label_reader

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (image (H, W, 3) uint8, label (H, W) uint8 trainIds or None), no transform."""
        image = read_image(self.images[index])
        label = None
        if self.labels is not None:
            label = self.label_reader(self.labels[index])
            if self.label_map is not None:
                label = self.label_map[label.astype(np.int64).clip(0, 255)]
            label = label.astype(np.uint8)
            if label.shape[:2] != image.shape[:2]:
                # GTA has a few images whose label differs in size: resize the label (nearest).
                label = cv2.resize(
                    label, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST
                )
        return image, label

    def __getitem__(self, index: int) -> dict:
        image, label = self.load(index)
        return make_item(image, label, self.images[index].stem, self.transform)


def make_item(
    image: np.ndarray, label: np.ndarray | None, name: str, transform: Callable | None
) -> dict:
    """Transform (image (H, W, 3) uint8, label (H, W) uint8 or None) into a dataset item."""
    valid = None
    if transform is not None:
        targets = {"image": image}
        if label is not None:
            targets["mask"] = label
        if "valid" in getattr(transform, "additional_targets", {}):
            targets["valid"] = np.zeros(image.shape[:2], np.uint8)
        out = transform(**targets)
        image, label, valid = out["image"], out.get("mask", label), out.get("valid")
    item = {
        "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0,
        "name": name,
    }
    if label is not None:
        item["label"] = torch.from_numpy(np.ascontiguousarray(label)).long()
    if valid is not None:
        item["valid"] = torch.from_numpy(np.ascontiguousarray(valid)) == 0
    return item
