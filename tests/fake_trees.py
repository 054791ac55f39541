"""Small fake dataset trees in each official layout, with the real file names and encodings.

- GTA5: ``images/00001.png``, ``labels/00001.png`` as 8-bit PALETTE PNGs of Cityscapes IDs.
- SYNTHIA: ``RGB/0000000.png``, ``GT/LABELS/0000000.png`` as 16-bit 3-channel PNGs, class in
  the red channel, instance in green (written with OpenCV, which takes BGR arrays).
- Cityscapes: ``leftImg8bit/<split>/<city>/<city>_000000_0000NN_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/..._gtFine_{labelIds,instanceIds,color}.png`` (8-bit grey IDs).
- ACDC: ``rgb_anon/<cond>/<split>/<seq>/<seq>_frame_0000NN_rgb_anon.png`` and
  ``gt/<cond>/{train,val}/<seq>/..._gt_{labelIds,labelColor}.png`` (+ the official
  ``_gt_labelTrainIds.png`` when asked).
- Dark Zurich: ``rgb_anon/{train,test}/night/<seq>/...``, ``rgb_anon/train/day/...``,
  ``rgb_anon/val/night/GOPR0356/...`` and ``gt/val/night/GOPR0356/..._gt_labelIds.png``.

Each builder returns ``{image stem: raw label-ID array}`` for the labelled images, so tests can
compare what the code reads with what was written.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import id2label
from PIL import Image

from mpcl.data.labels import SYNTHIA_ID_TO_TRAIN_ID_MAP

H, W = 24, 32  # small, and not square so that transposes show
CITYSCAPES_IDS = np.arange(34)  # every label ID the Cityscapes format defines
SYNTHIA_IDS = np.arange(23)  # SYNTHIA RAND-CITYSCAPES classes 0 (void) .. 22 (lanemarking)


def cityscapes_train_ids(ids: np.ndarray) -> np.ndarray:
    """Reference mapping label ID -> trainId straight from cityscapesscripts' table."""
    out = np.full(ids.shape, 255, dtype=np.uint8)
    for i in np.unique(ids):
        lab = id2label.get(int(i))
        if lab is not None and 0 <= lab.trainId < 255:
            out[ids == i] = lab.trainId
    return out


def synthia_train_ids(ids: np.ndarray) -> np.ndarray:
    """Reference Synthia mapping, from the dict (not the lookup table the code uses)."""
    out = np.full(ids.shape, 255, dtype=np.uint8)
    for sid, tid in SYNTHIA_ID_TO_TRAIN_ID_MAP.items():
        out[ids == sid] = tid
    return out


def labels_by_name(ds) -> dict[str, np.ndarray]:
    """{item name: (H, W) int64 label} over a labelled dataset."""
    return {ds[i]["name"]: ds[i]["label"].numpy() for i in range(len(ds))}


def write_image(path: Path, rng: np.random.Generator, shape: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rng.integers(0, 256, (*shape, 3), dtype=np.uint8))


def write_grey(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def write_palette(path: Path, ids: np.ndarray) -> None:
    """8-bit palette PNG, like GTA5's labels: pixel values are palette indices = label IDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    for i, lab in id2label.items():
        if 0 <= i < 256:
            palette[i] = lab.color
    im.putpalette(palette.ravel().tolist())
    im.save(path)


def write_color(path: Path, ids: np.ndarray) -> None:
    """The *_color.png / *_labelColor.png files the downloads also contain (RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    for i in np.unique(ids):
        lab = id2label.get(int(i))
        if lab is not None:
            rgb[ids == i] = lab.color
    Image.fromarray(rgb, mode="RGB").save(path)


def write_synthia_label(path: Path, classes: np.ndarray, instances: np.ndarray) -> None:
    """16-bit 3-channel PNG with class = red, instance = green, blue = 0.

    OpenCV writes BGR arrays, so red goes to index 2.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.zeros((*classes.shape, 3), dtype=np.uint16)
    bgr[:, :, 2] = classes
    bgr[:, :, 1] = instances
    assert cv2.imwrite(str(path), bgr)


def random_ids(rng: np.random.Generator, ids: np.ndarray, shape=(H, W)) -> np.ndarray:
    """Blocky random label map (4x4 cells), so that classes form regions as in real data."""
    cells = rng.choice(ids, size=(shape[0] // 4 + 1, shape[1] // 4 + 1))
    return np.kron(cells, np.ones((4, 4), dtype=cells.dtype))[: shape[0], : shape[1]]


def make_gta(
    root: Path, n: int = 3, seed: int = 0, mismatch: bool = False, unknown_id: int | None = None
) -> dict[str, np.ndarray]:
    """GTA5 tree. ``mismatch``: the first label is 2x smaller than its image (as a few real
    GTA labels differ in size). ``unknown_id``: put that (undefined) ID into the first label."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        write_image(root / "images" / f"{name}.png", rng)
        shape = (H // 2, W // 2) if mismatch and i == 1 else (H, W)
        ids = random_ids(rng, CITYSCAPES_IDS, shape).astype(np.uint8)
        if unknown_id is not None and i == 1:
            ids[0, :5] = unknown_id
        write_palette(root / "labels" / f"{name}.png", ids)
        out[name] = ids
    return out


def make_synthia(root: Path, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        name = f"{i:07d}"
        write_image(root / "RGB" / f"{name}.png", rng)
        classes = random_ids(rng, SYNTHIA_IDS).astype(np.uint16)
        # Instance IDs are valid class IDs too, and large: reading the wrong channel shows.
        instances = random_ids(rng, np.array([1, 3, 300, 1000])).astype(np.uint16)
        write_synthia_label(root / "GT" / "LABELS" / f"{name}.png", classes, instances)
        out[name] = classes
    return out


def make_cityscapes(
    root: Path,
    splits: tuple[str, ...] = ("train", "val", "test"),
    cities: tuple[str, ...] = ("aachen", "bochum"),
    per_city: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    frame = 0
    for split in splits:
        for city in cities:
            for _ in range(per_city):
                frame += 1
                base = f"{city}_{frame:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", rng)
                gt = root / "gtFine" / split / city
                # Test labels are dummies (all 0 / unlabeled) in the official download.
                ids = (
                    np.zeros((H, W), np.uint8)
                    if split == "test"
                    else random_ids(rng, CITYSCAPES_IDS)
                )
                write_grey(gt / f"{base}_gtFine_labelIds.png", ids)
                write_grey(gt / f"{base}_gtFine_instanceIds.png", ids)
                write_color(gt / f"{base}_gtFine_color.png", ids)
                if split != "test":
                    out[f"{base}_leftImg8bit"] = ids.astype(np.uint8)
    return out


def make_acdc(
    root: Path,
    conditions: tuple[str, ...] = ("fog", "night", "rain", "snow"),
    splits: tuple[str, ...] = ("train", "val", "test"),
    per_split: int = 2,
    seed: int = 0,
    with_train_ids: bool = False,
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    frame = 0
    for c, cond in enumerate(conditions):
        for split in splits:
            seq = f"GOPR0{400 + c:03d}"
            for _ in range(per_split):
                frame += 1
                base = f"{seq}_frame_{frame:06d}"
                write_image(root / "rgb_anon" / cond / split / seq / f"{base}_rgb_anon.png", rng)
                if split == "test":
                    continue
                # Reference (day) images live in <split>_ref folders and must be ignored.
                ref = root / "rgb_anon" / cond / f"{split}_ref" / f"{seq}_ref"
                write_image(ref / f"{base}_ref_rgb_anon.png", rng)
                gt = root / "gt" / cond / split / seq
                ids = random_ids(rng, CITYSCAPES_IDS)
                write_grey(gt / f"{base}_gt_labelIds.png", ids)
                write_color(gt / f"{base}_gt_labelColor.png", ids)
                if with_train_ids:
                    write_grey(gt / f"{base}_gt_labelTrainIds.png", cityscapes_train_ids(ids))
                out[f"{base}_rgb_anon"] = ids.astype(np.uint8)
    return out


def make_darkzurich(
    root: Path, per_split: int = 2, seed: int = 0, with_train_ids: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    for k in range(per_split):
        for tod in ("night", "day", "twilight"):
            seq = {"night": "GOPR0351", "day": "GOPR0348", "twilight": "GOPR0350"}[tod]
            base = f"{seq}_frame_{k:06d}"
            write_image(root / "rgb_anon" / "train" / tod / seq / f"{base}_rgb_anon.png", rng)
        base = f"GOPR0364_frame_{k:06d}"
        write_image(root / "rgb_anon" / "test" / "night" / "GOPR0364" / f"{base}_rgb_anon.png", rng)
    out = {}
    for k in range(per_split):
        base = f"GOPR0356_frame_{321 + 3 * k:06d}"
        write_image(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{base}_rgb_anon.png", rng)
        gt = root / "gt" / "val" / "night" / "GOPR0356"
        ids = random_ids(rng, CITYSCAPES_IDS)
        write_grey(gt / f"{base}_gt_labelIds.png", ids)
        write_color(gt / f"{base}_gt_labelColor.png", ids)
        if with_train_ids:
            write_grey(gt / f"{base}_gt_labelTrainIds.png", cityscapes_train_ids(ids))
        out[f"{base}_rgb_anon"] = ids.astype(np.uint8)
    return out


MAKERS = {
    "gta": make_gta,
    "synthia": make_synthia,
    "cityscapes": make_cityscapes,
    "acdc": make_acdc,
    "darkzurich": make_darkzurich,
}
