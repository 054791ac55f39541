"""Label spaces: the Cityscapes 19-class trainId space of the paper's benchmarks, and any class
set a ``classes.yaml`` defines (``LabelSet``; ``data=folders``).

Inside the package every label is a class index in [0, C) with 255 = ignore, whatever the
label files hold; a ``LabelSet`` says how a file's values (ids, colours or raw ids) map to
those indices, and gives each class a name and a colour.

The Cityscapes table comes from ``cityscapesscripts`` (the official label definitions);
the Synthia table is the one DAFormer/HRDA/MIC use (Synthia has no terrain, truck, train).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS
from omegaconf import OmegaConf

# The class index of "not labelled" inside the package (every label set, every loss and metric).
IGNORE_INDEX = 255
# The Cityscapes family (GTA, Synthia, Cityscapes, ACDC, Dark Zurich): 19 trainIds.
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


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB in the class colours; ignore is black.

    Args:
        label: (H, W) integer class indices (255, or any index >= C: not coloured).
        palette: (C, 3) uint8 RGB colour of each class (``LabelSet.palette``).
    """
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    label = np.asarray(label)
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _sid, _tid in SYNTHIA_ID_TO_TRAIN_ID_MAP.items():
    SYNTHIA_ID_TO_TRAIN_ID[_sid] = _tid


# --------------------------------------------------------------------------------------------
# Label sets: any class set (classes.yaml) or the Cityscapes trainIds
# --------------------------------------------------------------------------------------------

LABEL_FORMATS = ("index", "color", "raw")
_CLASS_KEYS = {"name", "id", "color", "raw_ids", "thing"}
_FILE_KEYS = {"classes", "ignore_index", "ignore_color"}


def default_palette(num_classes: int) -> np.ndarray:
    """(C, 3) uint8 distinct colours for classes without one: the Pascal VOC bit-interleaved
    palette from its second entry on (its first is black, the ignore colour)."""
    out = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        v, r, g, b = c + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((v >> 0) & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        out[c] = (r, g, b)
    return out


@dataclass(frozen=True)
class LabelSet:
    """A label space of C classes: what each label-file value means, each class's name and colour.

    Attributes:
        names: C class names, in class-index order (the order of ``classes.yaml``).
        ids: C values of the classes in index label files (``label_format=index``).
        colors: C (r, g, b) colours: of the classes in colour label files
            (``label_format=color``), and of every figure, overlay and preview.
        raw_ids: C tuples of the values mapped to each class in raw label files
            (``label_format=raw``), or None when the set defines none.
        ignore_index: the value of "not labelled" in index and raw label files.
        ignore_color: the colour of "not labelled" in colour label files, or None.
        thing_classes: class indices of the "thing" classes (the ImageNet Feature Distance
            keeps their features near ImageNet's); empty turns the Feature Distance off.
        source: where the set was read from (for messages).
    """

    names: tuple[str, ...]
    ids: tuple[int, ...]
    colors: tuple[tuple[int, int, int], ...]
    raw_ids: tuple[tuple[int, ...], ...] | None = None
    ignore_index: int = IGNORE_INDEX
    ignore_color: tuple[int, int, int] | None = None
    thing_classes: tuple[int, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """(C, 3) uint8 RGB class colours."""
        return np.array(self.colors, dtype=np.uint8).reshape(-1, 3)

    def id_lut(self) -> np.ndarray:
        """(256,) class index -> the class's ``id`` (uint8, uint16 where an id exceeds 255):
        ``lut[class_indices]`` turns a prediction into the values of the set's label files."""
        lut = np.zeros(256, dtype=np.uint16 if max(self.ids) > 255 else np.uint8)
        lut[: len(self)] = self.ids
        return lut

    def value_to_class(self, label_format: str) -> dict[int, int]:
        """Label-file value -> class index (``IGNORE_INDEX`` for the ignore value) of the
        ``index`` or ``raw`` format; colours are encoded as ``(r << 16) | (g << 8) | b``."""
        if label_format not in LABEL_FORMATS:
            raise ValueError(
                f"label_format={label_format!r} is unknown: choose one of "
                f"{', '.join(LABEL_FORMATS)}"
            )
        if label_format == "index":
            table = {v: c for c, v in enumerate(self.ids)}
            table[self.ignore_index] = IGNORE_INDEX
        elif label_format == "raw":
            if self.raw_ids is None:
                raise ValueError(
                    f"{self.source}: no class has raw_ids; list raw_ids for each class, or use "
                    "label_format=index"
                )
            table = {v: c for c, vs in enumerate(self.raw_ids) for v in vs}
            table[self.ignore_index] = IGNORE_INDEX
        else:
            table = {color_code(col): c for c, col in enumerate(self.colors)}
            if self.ignore_color is not None:
                table[color_code(self.ignore_color)] = IGNORE_INDEX
        return table

    def fingerprint(self, label_format: str) -> dict:
        """What prepared labels depend on (stored beside them; a change means re-preparing)."""
        return {
            "names": list(self.names),
            "label_format": label_format,
            "values": {str(k): v for k, v in sorted(self.value_to_class(label_format).items())},
        }


def color_code(color: Sequence[int]) -> int:
    """(r, g, b) -> one int ``(r << 16) | (g << 8) | b`` (how colour labels are looked up)."""
    r, g, b = (int(v) for v in color)
    return (r << 16) | (g << 8) | b


def _cityscapes_label_set() -> LabelSet:
    return LabelSet(
        names=CLASS_NAMES,
        ids=tuple(range(NUM_CLASSES)),
        colors=tuple(tuple(int(v) for v in row) for row in PALETTE),
        thing_classes=THING_CLASSES,
        source="cityscapes",
    )


CITYSCAPES = _cityscapes_label_set()
"""The 19 Cityscapes trainId classes (every label of the Cityscapes-family datasets)."""


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in {lo}-{hi}, got {value!r}")
    return value


def _color(value: object, what: str) -> tuple[int, int, int]:
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise ValueError(f"{what} must be 3 integers [r, g, b] in 0-255, got {value!r}")
    r, g, b = (_int(v, what, 0, 255) for v in value)
    return r, g, b


def parse_label_set(data: object, source: str = "classes.yaml") -> LabelSet:
    """Build a ``LabelSet`` from the parsed ``classes.yaml``; one-line ValueError naming the
    file, the class and the problem.

    The file: ``classes: [{name: road, id: 0, color: [128, 64, 128]}, ...]`` (``id``: the
    value in index label files, default its position; ``color``: default a distinct colour;
    optional ``raw_ids: [...]`` and ``thing: true``), ``ignore_index`` (default 255) and
    ``ignore_color`` (colour labels; default none).
    """
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise ValueError(
            f"{source}: expected a mapping with a list `classes: [{{name: ..., id: ..., "
            "color: [r, g, b]}}, ...]`"
        )
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; expected {sorted(_FILE_KEYS)}")
    entries = data["classes"]
    if not 1 <= len(entries) <= IGNORE_INDEX:
        raise ValueError(f"{source}: 1 to {IGNORE_INDEX} classes are needed, got {len(entries)}")
    ignore_index = _int(data.get("ignore_index", IGNORE_INDEX), f"{source}: ignore_index", 0, 65535)
    ignore_color = data.get("ignore_color")
    if ignore_color is not None:
        ignore_color = _color(ignore_color, f"{source}: ignore_color")
    fallback = default_palette(len(entries))
    names, ids, colors, raw_ids, things = [], [], [], [], []
    for c, entry in enumerate(entries):
        what = f"{source}: class {c}"
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not entry["name"]
        ):
            raise ValueError(f"{what} must be a mapping with a non-empty `name`, got {entry!r}")
        what = f"{source}: class {c} ({entry['name']})"
        bad = sorted(set(entry) - _CLASS_KEYS)
        if bad:
            raise ValueError(f"{what}: unknown keys {bad}; expected {sorted(_CLASS_KEYS)}")
        names.append(entry["name"])
        ids.append(_int(entry.get("id", c), f"{what}: id", 0, 65535))
        color = entry.get("color")
        colors.append(fallback[c].tolist() if color is None else _color(color, f"{what}: color"))
        raw = entry.get("raw_ids")
        if raw is not None:
            if not isinstance(raw, list | tuple) or not raw:
                raise ValueError(f"{what}: raw_ids must be a non-empty list, got {raw!r}")
            raw = tuple(_int(v, f"{what}: raw_ids", 0, 65535) for v in raw)
        raw_ids.append(raw)
        if entry.get("thing", False):
            things.append(c)
    for key, values in (("name", names), ("id", ids), ("color", [tuple(v) for v in colors])):
        seen: dict = {}
        for c, v in enumerate(values):
            if v in seen:
                shown = list(v) if key == "color" else repr(v)
                raise ValueError(
                    f"{source}: classes {seen[v]} and {c} have the same {key} {shown}; every "
                    f"class needs its own {key}"
                )
            seen[v] = c
    if ignore_index in ids:
        raise ValueError(
            f"{source}: class {ids.index(ignore_index)} has id {ignore_index}, the ignore_index; "
            "give it another id or set ignore_index"
        )
    if ignore_color is not None and tuple(ignore_color) in [tuple(v) for v in colors]:
        raise ValueError(f"{source}: ignore_color {list(ignore_color)} is also a class colour")
    given = [r for r in raw_ids if r is not None]
    if given and len(given) != len(raw_ids):
        missing = [names[c] for c, r in enumerate(raw_ids) if r is None]
        raise ValueError(f"{source}: classes {missing} have no raw_ids; give every class raw_ids")
    if given:
        owner: dict[int, int] = {}
        for c, vs in enumerate(raw_ids):
            for v in vs:
                if v in owner or v == ignore_index:
                    other = "the ignore_index" if v == ignore_index else f"class {owner[v]}"
                    raise ValueError(f"{source}: raw id {v} of class {c} is also {other}")
                owner[v] = c
    return LabelSet(
        names=tuple(names),
        ids=tuple(ids),
        colors=tuple(tuple(int(v) for v in col) for col in colors),
        raw_ids=tuple(given) if given else None,
        ignore_index=ignore_index,
        ignore_color=ignore_color,
        thing_classes=tuple(things),
        source=source,
    )


@functools.lru_cache(maxsize=16)
def _read_label_set(path: str, mtime_ns: int) -> LabelSet:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - YAML/OmegaConf errors have many types
        reason = " ".join(str(err).split())
        raise ValueError(f"cannot read class set {path}: not valid YAML ({reason})") from None
    return parse_label_set(data, path)


def label_set(spec: str | Path | LabelSet) -> LabelSet:
    """A label set by name (``"cityscapes"``: the 19 trainId classes) or ``classes.yaml`` path."""
    if isinstance(spec, LabelSet):
        return spec
    if str(spec) == "cityscapes":
        return CITYSCAPES
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"class set {spec} not found: give a classes.yaml file (benchmark.classes=<file>) "
            "or `cityscapes`"
        )
    return _read_label_set(str(path.resolve()), path.stat().st_mtime_ns)
