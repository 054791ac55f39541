"""Albumentations pipelines for training and evaluation, and the DataLoader worker seeding.

Pipelines take ``image`` (H, W, 3) uint8 RGB and ``mask`` (H, W) uint8 trainIds and return the
same types (albumentations 2.0.8 returns masks as uint8; ``SegmentationDataset`` converts them
to int64). Photometric augmentation is not done here: the UDA step applies it on the GPU to the
mixed image (DACS colour jitter + blur).

albumentations 2.0.8 keeps its random state inside each ``Compose``; DataLoader workers are
forked with a copy of it, so every worker draws the SAME crops and flips whatever numpy/torch
seeding does. ``seed_worker`` reseeds every Compose reachable from the worker's dataset.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import get_worker_info

from mpcl.data.labels import IGNORE_INDEX


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class CatMaxRatioCrop(A.RandomCrop):
    """Random crop that re-draws (up to 10 draws in all) while one class covers more than
    ``cat_max_ratio`` of the crop's labelled pixels, as mmseg/DAFormer's source crops (0.75).

    The last draw is kept when none qualifies. Ignore pixels (255) are not counted; a crop
    with a single class present is rejected as in mmseg. No padding: put ``PadIfNeeded`` first.
    """

    class InitSchema(A.RandomCrop.InitSchema):
        # RandomCrop's padding fields, fixed here (validation needs every field of the parent).
        pad_if_needed: bool = False
        border_mode: int = cv2.BORDER_CONSTANT
        fill: float = 0.0
        fill_mask: float = IGNORE_INDEX
        pad_position: str = "top_left"
        cat_max_ratio: float = 1.0

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 1.0,
        pad_if_needed: bool = False,
        border_mode: int = cv2.BORDER_CONSTANT,
        fill: float = 0.0,
        fill_mask: float = IGNORE_INDEX,
        pad_position: str = "top_left",
        p: float = 1.0,
    ):
        super().__init__(
            height=height,
            width=width,
            pad_if_needed=pad_if_needed,
            pad_position=pad_position,
            border_mode=border_mode,
            fill=fill,
            fill_mask=fill_mask,
            p=p,
        )
        self.cat_max_ratio = cat_max_ratio

    def _acceptable(self, mask: np.ndarray, coords: tuple[int, int, int, int]) -> bool:
        x0, y0, x1, y1 = coords
        counts = np.bincount(mask[y0:y1, x0:x1].ravel(), minlength=256)[:IGNORE_INDEX]
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        out = super().get_params_dependent_on_data(params, data)
        mask = data.get("mask")
        if self.cat_max_ratio >= 1.0 or mask is None:
            return out
        for _ in range(9):
            if self._acceptable(np.asarray(mask), out["crop_coords"]):
                break
            out = super().get_params_dependent_on_data(params, data)
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio")


# mmseg pads the *normalised* image with 0, i.e. with the ImageNet mean colour.
PAD_FILL = (124, 116, 104)

# Every Compose carries a second mask, ``valid`` (0 = valid pixel, 255 = padding or ignored
# border), so the UDA module can keep padded and border pixels out of the pseudo-label losses.
VALID_TARGET = {"valid": "mask"}


class IgnoreBorder(A.DualTransform):
    """Mark frame borders as ignore (255) in the masks: the pseudo-label margins of
    DAFormer/HRDA for Cityscapes targets (ego-vehicle hood, rectification borders), set on
    the resized full frame, before cropping. The image is unchanged.

    Args:
        top, bottom, left, right: border widths in pixels of the (resized) frame.
    """

    class InitSchema(A.DualTransform.InitSchema):
        top: int = 0
        bottom: int = 0
        left: int = 0
        right: int = 0

    def __init__(
        self, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0, p: float = 1.0
    ):
        super().__init__(p=p)
        self.top, self.bottom, self.left, self.right = top, bottom, left, right

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        mask = mask.copy()
        h, w = mask.shape[:2]
        mask[: self.top] = IGNORE_INDEX
        mask[h - self.bottom :] = IGNORE_INDEX if self.bottom else mask[h:]
        mask[:, : self.left] = IGNORE_INDEX
        mask[:, w - self.right :] = IGNORE_INDEX if self.right else mask[:, w:]
        return mask

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("top", "bottom", "left", "right")


def train_transform(
    crop_size: int | Sequence[int],
    resize: Sequence[int] | None = None,
    scale: Sequence[float] = (0.5, 2.0),
    hflip: float = 0.5,
    cat_max_ratio: float = 1.0,
    ignore_border: Sequence[int] | None = None,
) -> A.Compose:
    """Training pipeline: resize -> [ignore border] -> random rescale -> pad -> random crop ->
    horizontal flip.

    Args:
        crop_size: crop (H, W), or one int for a square crop.
        resize: (H, W) every image is first resized to (e.g. GTA -> (720, 1280)), or None.
        scale: range of the random rescale ratio applied after ``resize`` (mmseg ratio_range).
        hflip: probability of a horizontal flip.
        cat_max_ratio: re-crop (up to 10 draws) while one class exceeds this fraction of the
            crop; 1.0 disables it. DAFormer uses 0.75 for source crops.
        ignore_border: (top, bottom, left, right) pixels of the resized frame marked invalid
            in the masks (pseudo-label margins of Cityscapes targets), or None.

    Returns:
        A Compose mapping image (H, W, 3) uint8 + mask (H, W) uint8 to a (crop_h, crop_w) crop.
        Padding (when the rescaled image is smaller than the crop) is the ImageNet mean colour
        for the image and 255 (ignore) for the masks, at the bottom/right as in mmseg. The
        Compose also takes a ``valid`` mask (0 = valid) that padding and borders set to 255.
    """
    ch, cw = _pair(crop_size)
    steps: list = []
    if resize is not None:
        rh, rw = _pair(resize)
        steps.append(
            A.Resize(rh, rw, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
        )
    if ignore_border:
        steps.append(IgnoreBorder(*(int(v) for v in ignore_border)))
    lo, hi = float(scale[0]), float(scale[1])
    if (lo, hi) != (1.0, 1.0):
        steps.append(
            A.RandomScale(
                scale_limit=(lo - 1.0, hi - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    steps.append(
        A.PadIfNeeded(
            min_height=ch,
            min_width=cw,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=PAD_FILL,
            fill_mask=IGNORE_INDEX,
        )
    )
    steps.append(CatMaxRatioCrop(ch, cw, cat_max_ratio=cat_max_ratio))
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return A.Compose(steps, additional_targets=VALID_TARGET)


def val_transform(resize: Sequence[int] | None = None) -> A.Compose:
    """Evaluation pipeline: an optional resize to (H, W) (labels nearest), nothing random.

    Evaluation at the original label resolution (Cityscapes protocol) is done by resizing the
    logits back, so val/test labels are usually left unresized: pass ``resize=None``.
    """
    steps: list = []
    if resize is not None:
        rh, rw = _pair(resize)
        steps.append(
            A.Resize(rh, rw, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)
        )
    return A.Compose(steps, additional_targets=VALID_TARGET)


def find_composes(obj: Any) -> list[A.BaseCompose]:
    """Every top-level albumentations Compose reachable from a dataset, through wrappers.

    Walks attributes of datasets (``dataset``, ``datasets``, ``source``, ``transform``, ...),
    lists/tuples/dicts of them, without visiting an object twice. Nested Composes are covered
    by their parent.
    """
    found: list[A.BaseCompose] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, A.BaseCompose):
            found.append(o)
        elif isinstance(o, torch.utils.data.Dataset):
            stack.extend(reversed(list(vars(o).values())))
        elif isinstance(o, list | tuple):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
    return found


def reseed_transforms(dataset: Any, seed: int) -> None:
    """Give every Compose reachable from ``dataset`` its own random stream derived from ``seed``.

    Each Compose gets ONE numpy generator and ONE ``random.Random`` shared by all its
    transforms (``set_random_state``). ``Compose.set_random_seed(s)`` would seed every child
    transform with the same ``s``, so e.g. the rescale ratio and the crop position would be
    drawn from identical streams; and the source and target Composes must differ too.
    """
    for k, compose in enumerate(find_composes(dataset)):
        s = int(np.random.SeedSequence([seed % 2**32, k]).generate_state(1)[0])
        compose.set_random_seed(s)  # sets Compose.seed and the children's fallback state
        compose.set_random_state(np.random.default_rng(s), random.Random(s))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy, ``random`` and every albumentations Compose.

    ``torch.initial_seed()`` in a worker is the loader's base seed + worker id, so the seeds
    are distinct per worker and reproducible from the loader's ``generator``.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None:
        reseed_transforms(info.dataset, seed)
