"""Your own data: any folder of images, with or without labels, in any class set.

    python -m mpcl.train data=folders benchmark.classes=classes.yaml \
        benchmark.source.images=src/images benchmark.source.labels=src/labels \
        benchmark.target.images=tgt/images \
        benchmark.val.images=val/images benchmark.val.labels=val/labels

Images and labels pair by relative path and stem (``a/b/x.jpg`` with ``a/b/x.png``; any
common image extension). The class set is a ``classes.yaml`` (``mpcl.data.labels.LabelSet``);
labels are ``index`` PNGs of its ids, ``color`` PNGs of its colours, or ``raw`` ids mapped by
each class's ``raw_ids`` (``label_format``). An optional file list (one relative path per
line, extension optional) selects a subset.

``python -m mpcl.prepare folders --classes C --images I --labels L`` checks every pair once and
writes the labels as class-index PNGs (255 = ignore) and the Rare Class Sampling statistics
into ``<L>_prepared/``; a folder dataset reads those when they match the class set and label
format, else the original labels, checked as they are read with the same one-line messages:
an id or colour outside the class set, a label whose size differs from its image, an image
without a label, an unreadable or truncated file.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from mpcl.data.base import SegmentationDataset, exif_orientation
from mpcl.data.labels import LabelSet, label_set
from mpcl.data.rcs import (
    SAMPLE_CLASS_STATS,
    ClassStats,
    compute_class_stats,
    load_stats,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PREPARED_SUFFIX = "_prepared"  # <labels>_prepared/: class-index PNGs + RCS statistics
LABEL_SET_FILE = "label_set.json"  # in the prepared folder: what the labels were made for
DEFAULT_CROP = 512


# --------------------------------------------------------------------------------------------
# Files: listing and pairing
# --------------------------------------------------------------------------------------------


def _key(relative: Path) -> str:
    """'a/b/x.png' -> 'a/b/x': how images and labels pair."""
    return relative.with_suffix("").as_posix()


def list_images(folder: str | Path, what: str) -> dict[str, Path]:
    """Image files under ``folder`` (recursive), keyed by relative path without extension.

    Raises FileNotFoundError if the folder is missing, ValueError if it holds no image or two
    files share a key (``x.png`` and ``x.jpg``). ``what`` names the folder in messages.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} not found; check the path")
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        key = _key(path.relative_to(folder))
        if key in files:
            raise ValueError(
                f"{what} folder {folder} has two files for {key}: {files[key].name} and "
                f"{path.name}; keep one"
            )
        files[key] = path
    if not files:
        raise ValueError(
            f"{what} folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}); check the path"
        )
    return files


def read_file_list(path: str | Path) -> list[str]:
    """Keys of a file list: one relative path per line (extension optional; blank lines and
    lines starting with # skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"file list {path} not found; check the path")
    keys = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rel = Path(line)
            keys.append(_key(rel) if rel.suffix.lower() in IMAGE_SUFFIXES else rel.as_posix())
    return keys


def pair_files(
    images: str | Path,
    labels: str | Path | None = None,
    file_list: str | Path | None = None,
) -> tuple[list[Path], list[Path] | None]:
    """(image paths, label paths or None), paired by relative path and stem, sorted.

    An image without a label is an error naming how many, which, and the file expected.
    """
    found = list_images(images, "images")
    if file_list is not None:
        wanted = read_file_list(file_list)
        missing = [k for k in wanted if k not in found]
        if missing:
            raise ValueError(
                f"file list {file_list} names {len(missing)} images not in {images} "
                f"(e.g. {', '.join(missing[:3])}); fix the list or the folder"
            )
        found = {k: found[k] for k in sorted(set(wanted))}
    image_paths = list(found.values())
    if labels is None:
        return image_paths, None
    label_files = list_images(labels, "labels")
    lonely = [k for k in found if k not in label_files]
    if lonely:
        names = ", ".join(
            found[k].relative_to(Path(images).expanduser()).as_posix() for k in lonely[:3]
        )
        raise ValueError(
            f"{len(lonely)} of {len(found)} images have no label file ({names}"
            f"{', ...' if len(lonely) > 3 else ''}); expected e.g. "
            f"{Path(labels).expanduser() / lonely[0]}.png"
        )
    return image_paths, [label_files[k] for k in found]


# --------------------------------------------------------------------------------------------
# Reading and checking one file
# --------------------------------------------------------------------------------------------


def _open(path: Path, what: str) -> Image.Image:
    """A fully decoded Pillow image; unreadable or truncated files: one-line OSError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split())
        raise OSError(
            f"cannot read {what} {path}: unreadable or truncated file ({type(err).__name__}: "
            f"{reason}); re-export or delete it"
        ) from None


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file as displayed: turned by its EXIF orientation, as
    viewers, labelling tools and ``mpcl.data.base.read_image`` (predict) show it (Pillow:
    truncated files are errors)."""
    return np.array(ImageOps.exif_transpose(_open(Path(path), "image")).convert("RGB"))


def read_label_values(path: str | Path, label_format: str) -> np.ndarray:
    """The stored values of a label file: (H, W) integers (``index``, ``raw``: palette
    indices, 8- or 16-bit grey) or (H, W) int32 colour codes ``(r << 16) | (g << 8) | b``
    (``color``)."""
    path = Path(path)
    im = _open(path, "label")
    if label_format == "color":
        rgb = np.asarray(im.convert("RGB")).astype(np.int32)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
        raise ValueError(
            f"label {path} is a {im.mode} colour image, but label_format={label_format} reads one "
            "channel of ids: set benchmark.label_format=color to map colours to classes"
        )
    return np.asarray(im).astype(np.int64)


def to_class_indices(
    values: np.ndarray, classes: LabelSet, label_format: str, path: str | Path
) -> np.ndarray:
    """Map a label file's values to (H, W) uint8 class indices (255 = ignore).

    Args:
        values: (H, W) values from ``read_label_values``.
        classes: the label set; label_format: index | color | raw.
        path: the file (named in the error for a value outside the class set).
    """
    table = classes.value_to_class(label_format)
    keys = np.array(sorted(table), dtype=np.int64)
    targets = np.array([table[k] for k in keys], dtype=np.uint8)
    pos = np.searchsorted(keys, values).clip(0, len(keys) - 1)
    known = keys[pos] == values
    if not known.all():
        bad = np.unique(values[~known])
        if label_format == "color":
            shown = [[int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255] for v in bad[:3]]
            others = f" ({len(bad)} such colours: {shown}{' ...' if len(bad) > 3 else ''})"
            raise ValueError(
                f"label {path} has colour {shown[0]} that is no class colour of "
                f"{classes.source}{others if len(bad) > 1 else ''}; fix the file, add the class, "
                "or set ignore_color"
            )
        shown = [int(v) for v in bad[:5]]
        field = "raw_ids" if label_format == "raw" else "ids"
        others = f" ({len(bad)} such values: {shown}{' ...' if len(bad) > 5 else ''})"
        others = others if len(bad) > 1 else ""
        raise ValueError(
            f"label {path} has id {shown[0]} outside the class set {classes.source} (not a "
            f"class's {field}, not ignore_index {classes.ignore_index}){others}; fix the file "
            "or the class set"
        )
    return targets[pos]


def read_class_label(path: str | Path, classes: LabelSet, label_format: str) -> np.ndarray:
    """A label file as (H, W) uint8 class indices, checked (one-line errors)."""
    return to_class_indices(read_label_values(path, label_format), classes, label_format, path)


def read_prepared_label(path: str | Path) -> np.ndarray:
    """A prepared class-index PNG (``mpcl.prepare folders``) -> (H, W) uint8."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None or label.ndim != 2:
        raise OSError(
            f"cannot read prepared label {path}: missing or corrupt; rerun mpcl.prepare folders"
        )
    return label


def check_same_size(
    image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path
) -> None:
    """A label must have its image's size (W x H in the message), the image as displayed
    (turned by its EXIF orientation, as ``read_image`` returns it)."""
    if label.shape[:2] != image.shape[:2]:
        turned = exif_orientation(image_path) != 1
        fix = (
            "the image's EXIF orientation turns it: draw the label on the displayed image, or "
            "remove the tag"
            if turned
            else "labels must have their image's size"
        )
        raise ValueError(
            f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} "
            f"is {image.shape[1]}x{image.shape[0]} (W x H); {fix}"
        )


def shrink(
    image: np.ndarray, label: np.ndarray | None, max_size: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Shrink (H, W, 3) image and (H, W) label so the longer side is at most ``max_size``
    (image: area interpolation; label: nearest). Smaller images are left as they are."""
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image, label
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if label is not None:
        label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    return image, label


# --------------------------------------------------------------------------------------------
# Prepared labels
# --------------------------------------------------------------------------------------------


def prepared_dir(labels: str | Path) -> Path:
    """Where ``mpcl.prepare folders`` writes for a label folder: ``<labels>_prepared``."""
    labels = Path(labels).expanduser()
    return labels.parent / (labels.name + PREPARED_SUFFIX)


def prepared_label_path(labels: str | Path, label: Path) -> Path:
    """The prepared class-index PNG of ``label`` (a file under ``labels``)."""
    rel = label.relative_to(Path(labels).expanduser())
    return prepared_dir(labels) / rel.with_suffix(".png")


def is_up_to_date(prepared: Path, label: Path) -> bool:
    """Whether a prepared PNG exists and is not older than its original label."""
    try:
        return prepared.stat().st_mtime_ns >= label.stat().st_mtime_ns
    except OSError:
        return False


def is_prepared(labels: str | Path, classes: LabelSet, label_format: str) -> bool:
    """Whether ``<labels>_prepared`` was written for this class set and label format."""
    path = prepared_dir(labels) / LABEL_SET_FILE
    try:
        return json.loads(path.read_text()) == classes.fingerprint(label_format)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class FolderDataset(SegmentationDataset):
    """A ``SegmentationDataset`` of a folder pair: labels checked as they are read.

    Args:
        images, labels: paired image and label paths (labels None: unlabelled).
        classes: the label set; label_format: index | color | raw.
        transform: albumentations Compose (after ``max_size``), or None.
        max_size: images (and labels) whose longer side exceeds it are shrunk to it when
            loaded; None keeps every size.
        prepared: label paths of prepared class-index PNGs to read instead (same order).

    Items as ``SegmentationDataset``'s: ``image`` (3, H, W) float in [0, 1], ``label`` (H, W)
    int64 class indices (255 = ignore), ``name`` the image stem.
    """

    def __init__(
        self,
        images: Sequence[Path],
        labels: Sequence[Path] | None,
        classes: LabelSet,
        label_format: str = "index",
        transform=None,
        max_size: int | None = None,
        prepared: Sequence[Path] | None = None,
    ) -> None:
        classes.value_to_class(label_format)  # checks the format (and raw_ids) first
        self.classes = classes
        self.label_format = label_format
        self.max_size = max_size
        self.original_labels = None if labels is None else [Path(p) for p in labels]
        reader = read_prepared_label if prepared is not None else self.read_original
        super().__init__(
            images, prepared if prepared is not None else labels, transform, label_reader=reader
        )

    def read_original(self, path: str | Path) -> np.ndarray:
        """An original label file -> (H, W) uint8 class indices (checked)."""
        return read_class_label(path, self.classes, self.label_format)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image (H, W, 3) uint8, label (H, W) uint8 class indices or None), shrunk to
        ``max_size``; a label of another size than its image is an error."""
        image = read_image(self.images[index])
        label = None
        if self.labels is not None:
            label = self.label_reader(self.labels[index])
            check_same_size(image, label, self.images[index], self.labels[index])
        return shrink(image, label, self.max_size)


def folder_dataset(
    images: str | Path,
    labels: str | Path | None = None,
    classes: str | Path | LabelSet = "classes.yaml",
    label_format: str = "index",
    file_list: str | Path | None = None,
    transform=None,
    max_size: int | None = None,
    split: str | None = None,
) -> FolderDataset:
    """A folder of images (and labels) as a dataset: ``data=folders``'s source, target and val.

    Args:
        images: the image folder (searched recursively).
        labels: the label folder (same relative paths and stems), or None for images only.
        classes: the label set: a classes.yaml path (or a ``LabelSet``).
        label_format: index (PNG of class ids) | color (class colours) | raw (``raw_ids``).
        file_list: a text file of relative paths selecting a subset, or None for all.
        transform: albumentations Compose, or None.
        max_size: longer-side limit applied when loading (None: none).
        split: only for ``mpcl.predict split=...``: the folder is its own split, so only
            ``val`` (the validation folders) is accepted.

    Prepared labels (``<labels>_prepared``, written by ``mpcl.prepare folders`` for this class
    set and format) are read when present; otherwise the original labels are read and checked.
    """
    if split not in (None, "val"):
        raise ValueError(
            f"data=folders has no {split!r} split: predict split=val (benchmark.val) or "
            "input=<folder of images>"
        )
    classes = label_set(classes)
    image_paths, label_paths = pair_files(images, labels, file_list)
    prepared = None
    if label_paths is not None and is_prepared(labels, classes, label_format):
        candidates = [prepared_label_path(labels, p) for p in label_paths]
        if all(is_up_to_date(d, p) for d, p in zip(candidates, label_paths, strict=True)):
            prepared = candidates
        else:
            log.warning(
                "%s: some labels are new or changed since they were prepared: reading the "
                "original labels; rerun python -m mpcl.prepare folders",
                prepared_dir(labels),
            )
    return FolderDataset(
        image_paths, label_paths, classes, label_format, transform, max_size, prepared
    )


def class_stats(dataset: FolderDataset) -> ClassStats:
    """Rare Class Sampling statistics of a labelled folder dataset: the prepared ones
    (``mpcl.prepare folders``) when it reads prepared labels, else counted now (every label
    read and checked once; run the prepare command to keep them)."""
    if not dataset.has_labels:
        raise ValueError("Rare Class Sampling needs a labelled (source) folder dataset")
    folder = dataset.labels[0].parent if dataset.label_reader is read_prepared_label else None
    if folder is not None:
        root = next((p for p in (folder, *folder.parents) if (p / LABEL_SET_FILE).is_file()), None)
        if root is not None and (root / SAMPLE_CLASS_STATS).is_file():
            return load_stats(root)
    log.info(
        "Rare Class Sampling: counting the classes of %d labels (python -m mpcl.prepare folders "
        "writes them once)",
        len(dataset),
    )
    return compute_class_stats(dataset)


# --------------------------------------------------------------------------------------------
# Size defaults
# --------------------------------------------------------------------------------------------


def size_defaults(images: str | Path, max_size: int | None = None) -> dict[str, int]:
    """Crop size and Rare Class Sampling threshold that suit a folder's images.

    From the sizes (file headers only) of up to 32 images spread over the folder, each shrunk
    to ``max_size``: ``crop_size`` = min(512, the median shorter side) rounded down to a
    multiple of 32 (at least 32); ``rcs_min_pixels`` = 0.15% of the median image area at the
    label files' resolution (DAFormer's 3000 pixels of a 1914x1052 GTA label).
    """
    files = list(list_images(images, "images").values())
    step = max(1, len(files) // 32)
    sizes = []
    for path in files[::step][:32]:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)  # (W, H), header only
        except (OSError, ValueError, SyntaxError) as err:
            raise OSError(
                f"cannot read image {path}: unreadable or truncated file ({type(err).__name__}); "
                "re-export or delete it"
            ) from None
    shorter = []
    for w, h in sizes:
        scale = min(1.0, max_size / max(w, h)) if max_size else 1.0
        shorter.append(min(w, h) * scale)
    crop = max(32, int(min(DEFAULT_CROP, statistics.median(shorter))) // 32 * 32)
    area = statistics.median(w * h for w, h in sizes)
    return {"crop_size": crop, "rcs_min_pixels": max(1, round(0.0015 * area))}


__all__ = [
    "FolderDataset",
    "class_stats",
    "folder_dataset",
    "pair_files",
    "read_class_label",
    "size_defaults",
]
