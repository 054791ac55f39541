"""Label spaces: the Cityscapes 19-class trainId space every dataset is mapped into.

The Cityscapes table comes from ``cityscapesscripts`` (the official label definitions);
the Synthia table is the one DAFormer/HRDA/MIC use (Synthia has no terrain, truck, train).
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

IGNORE_INDEX = 255
NUM_CLASSES = 19

_TRAIN_LABELS = sorted(
    (lab for lab in _CS_LABELS if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId
)
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)
PALETTE: np.ndarray = np.array([lab.color for lab in _TRAIN_LABELS], dtype=np.uint8)  # (19, 3)
assert len(CLASS_NAMES) == NUM_CLASSES

# Cityscapes label ID -> trainId, as a 256-entry lookup table (unknown IDs -> ignore).
CITYSCAPES_ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lab in _CS_LABELS:
    if 0 <= _lab.id < 256 and 0 <= _lab.trainId < IGNORE_INDEX:
        CITYSCAPES_ID_TO_TRAIN_ID[_lab.id] = _lab.trainId
# trainId -> Cityscapes label ID (for test-server export); ignore -> 0 ("unlabeled").
TRAIN_ID_TO_CITYSCAPES_ID: np.ndarray = np.zeros(256, dtype=np.uint8)
for _lab in _TRAIN_LABELS:
    TRAIN_ID_TO_CITYSCAPES_ID[_lab.trainId] = _lab.id

# Synthia RAND-CITYSCAPES class ID (red channel of GT/LABELS) -> trainId.
SYNTHIA_ID_TO_TRAIN_ID_MAP: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8,
    1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip
SYNTHIA_16_CLASSES: tuple[int, ...] = tuple(sorted(SYNTHIA_ID_TO_TRAIN_ID_MAP.values()))
# The 13-class protocol drops wall (3), fence (4) and pole (5).
SYNTHIA_13_CLASSES: tuple[int, ...] = tuple(c for c in SYNTHIA_16_CLASSES if c not in (3, 4, 5))

# "Thing" classes for the ImageNet Feature Distance (DAFormer): pole..bicycle minus sky etc.
THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def map_ids(label: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map an integer label image through a 256-entry lookup table.

    Args:
        label: (H, W) integer array of dataset class IDs in [0, 255].
        table: (256,) uint8 lookup table, e.g. ``CITYSCAPES_ID_TO_TRAIN_ID``.

    Returns:
        (H, W) uint8 array of trainIds.
    """
    return table[np.asarray(label, dtype=np.int64).clip(0, 255)]


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) trainIds -> (H, W, 3) uint8 RGB with the Cityscapes palette; ignore is black."""
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = label < NUM_CLASSES
    out[valid] = PALETTE[label[valid]]
    return out


SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _sid, _tid in SYNTHIA_ID_TO_TRAIN_ID_MAP.items():
    SYNTHIA_ID_TO_TRAIN_ID[_sid] = _tid
