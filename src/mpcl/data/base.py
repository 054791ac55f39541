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
from PIL import Image
from torch.utils.data import Dataset

from mpcl.data.labels import IGNORE_INDEX

EXIF_ORIENTATION = 0x0112  # the EXIF tag of the image's turn/mirror (1: as stored)

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV threads would oversubscribe


def check_complete(path: str | Path, what: str = "image") -> None:
    """Raise a one-line OSError unless a JPEG or PNG file ends as one should.

    OpenCV decodes a truncated JPEG (or PNG) with only a library warning on stderr, grey or
    black where the data is missing. The end marker (JPEG EOI, PNG IEND) is looked for in
    the last bytes; a file without one there (truncated, or with trailing data after it) is
    decoded strictly by Pillow, which raises on a truncated file. Other formats, and files
    that cannot be opened (the reader names those), pass.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64))
            tail = f.read()
    except OSError:
        return
    marker = b"\xff\xd9" if head[:2] == b"\xff\xd8" else b"IEND" if head[1:4] == b"PNG" else None
    if marker is None or marker in tail:
        return
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(
            f"cannot read {what} {path}: the file is truncated or corrupt ({err}); re-extract "
            "or delete it"
        ) from None


def read_image(path: str | Path) -> np.ndarray:
    """Read an 8-bit RGB image -> (H, W, 3) uint8. Raises a one-line error on a bad file
    (missing, corrupt, truncated)."""
    check_complete(path)  # before OpenCV, which would warn and decode it
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise OSError(f"cannot read image {path}: missing or corrupt file; re-extract or delete it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1, as stored, when it has none): 2-8 mean
    ``read_image`` returns it turned or mirrored, as viewers display it (OpenCV applies the
    tag). Reads the header only."""
    try:
        with Image.open(path) as image:
            return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError):
        return 1  # no readable header: read_image says what is wrong with the file


def read_label(path: str | Path) -> np.ndarray:
    """Read a label PNG unchanged -> (H, W) or (H, W, C) integer array (C in OpenCV BGR order)."""
    check_complete(path, "label")
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise OSError(f"cannot read label {path}: missing or corrupt file; re-extract or delete it")
    return lab


def check_label_values(
    label: np.ndarray, num_classes: int, ignore_index: int, path: str | Path
) -> None:
    """Raise a one-line ValueError naming ``path`` and the value unless every value of
    ``label`` is a class (0 .. num_classes - 1) or ``ignore_index``.

    Vectorised (a few passes over the array, on the CPU when the file is read), so a bad file
    stops the run where it is read instead of deep inside the loss or the IoU on the GPU.
    """
    bad = (label >= num_classes) & (label != ignore_index)
    if np.issubdtype(label.dtype, np.signedinteger):
        bad |= label < 0
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (" ..." if len(values) > 5 else "")
        raise ValueError(
            f"label {path} holds the value {shown} at {int(bad.sum())} pixels, outside the "
            f"{num_classes} classes (0-{num_classes - 1}, {ignore_index} = ignore): it belongs "
            "to another label space or is not a trainId file; re-run mpcl.prepare or fix the file"
        )


class SegmentationDataset(Dataset):
    """Images and optional labels, with an albumentations transform.

    Args:
        images: image file paths.
        labels: label file paths parallel to ``images``, or None for an unlabelled set.
        transform: an albumentations ``Compose`` (image + mask), or None.
        label_map: (256,) uint8 lookup table from the file's IDs to trainIds, or None when the
            label files already hold trainIds.
        label_reader: reads a label file into an (H, W) integer array (default: ``read_label``).
        num_classes: when set, every label read is checked to hold only classes
            0 .. num_classes - 1 and ignore (``check_label_values``; ``mpcl.run.build`` sets it
            from the model's class set).

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
        num_classes: int | None = None,
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
        self.num_classes = num_classes

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
            if self.num_classes is not None:
                check_label_values(label, self.num_classes, IGNORE_INDEX, self.labels[index])
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
