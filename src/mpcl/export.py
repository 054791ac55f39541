"""Test-server submissions: predictions in each benchmark server's format, zipped.

The rules (what the servers take; also in docs/datasets.md, "Test-server submissions"):

    format       zip members                             pixels                    dtype   W x H      images
    cityscapes   labelIds/<image stem>.png               Cityscapes label IDs      uint8   2048x1024  1525
    acdc         labelTrainIds/<image stem>.png          trainIds 0-18             uint8   1920x1080  2000
    darkzurich   labelTrainIds/<image stem>.png          trainIds 0-18             uint8   1920x1080  151
                 labelTrainIds_invalid/<image stem>.png  trainIds, 255 = invalid   uint8   1920x1080  151
                 confidence/<image stem>.png             round(65535 x max prob)   uint16  1920x1080  151
    labelids     labelIds/<image stem>.png               Cityscapes label IDs      uint8   as input   any
    ids          ids/<image stem>.png                    the label set's ids       uint8|16 as input  any

(``labelids`` is the generic format for other Cityscapes-labelled data, e.g. the synthetic
benchmark; ``ids`` for a classes.yaml label set, ``data=folders``: each class's ``id``, 16-bit
when an id exceeds 255.) Colour previews use the label set's colours. Every
file is written atomically (``mpcl.io``), then ``<out>/<format>_submission.zip`` is built
from the server folders (and nothing else) and renamed into place. Colour previews go to
``<out>/color/`` outside the zip.

    exporter = Exporter("acdc", out_dir)
    for logits, name in ...:             # logits (C, h, w), any h x w: resized to 1920x1080
        exporter.add(logits, name)
    zip_path = exporter.finish(expected=len(dataset))
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mpcl.data.labels import CITYSCAPES, TRAIN_ID_TO_CITYSCAPES_ID, LabelSet, colorize
from mpcl.io import atomic_path, write_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerFormat:
    """One server's submission rules.

    Attributes:
        name: format name (``export.format``).
        size: (H, W) every prediction is resized to, or None to keep the input size.
        num_images: the server's test-set size (a different count is warned about).
        label_ids: write Cityscapes label IDs (else trainIds, or the label set's ids).
        folder: the folder of the hard predictions inside the zip.
        darkzurich: also ``labelTrainIds_invalid/`` and ``confidence/``.
    """

    name: str
    size: tuple[int, int] | None
    num_images: int | None
    label_ids: bool
    folder: str
    darkzurich: bool = False
    any_label_set: bool = False  # writes the label set's ids (the others need Cityscapes')

    @property
    def folders(self) -> tuple[str, ...]:
        if self.darkzurich:
            return (self.folder, "labelTrainIds_invalid", "confidence")
        return (self.folder,)


FORMATS: dict[str, ServerFormat] = {
    "cityscapes": ServerFormat("cityscapes", (1024, 2048), 1525, True, "labelIds"),
    "acdc": ServerFormat("acdc", (1080, 1920), 2000, False, "labelTrainIds"),
    "darkzurich": ServerFormat("darkzurich", (1080, 1920), 151, False, "labelTrainIds", True),
    "labelids": ServerFormat("labelids", None, None, True, "labelIds"),
    "ids": ServerFormat("ids", None, None, False, "ids", any_label_set=True),
}


def format_for_dataset(target: str) -> str:
    """The server format of a dataset factory (``data.target_val._target_``); ``ids`` for a
    folder dataset (``data=folders``), ``labelids`` for other data without a server (the
    synthetic benchmark)."""
    name = target.rsplit(".", 1)[-1].lower()
    if name == "folder_dataset":
        return "ids"
    servers = [f for f, rules in FORMATS.items() if rules.num_images is not None]
    return name if name in servers else "labelids"


class Exporter:
    """Writes one prediction per test image in a server's format, then zips the folders.

    Args:
        fmt: a key of FORMATS.
        out_dir: where the folders, ``color/`` and the zip go.
        invalid_below: Dark Zurich: pixels whose confidence is below this are 255 in
            ``labelTrainIds_invalid`` (0: none, so the server's UIoU equals the IoU).
        color: also write colour previews to ``<out_dir>/color/``.
        label_set: the classes predicted (their colours for the previews; their ids for the
            ``ids`` format); the server formats need the Cityscapes trainIds.
    """

    def __init__(
        self,
        fmt: str,
        out_dir: str | Path,
        invalid_below: float = 0.0,
        color: bool = True,
        label_set: LabelSet = CITYSCAPES,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"export.format={fmt!r} is unknown: choose one of {list(FORMATS)}")
        if not FORMATS[fmt].any_label_set and label_set.names != CITYSCAPES.names:
            raise ValueError(
                f"export.format={fmt} writes Cityscapes ids but the label set is "
                f"{label_set.source or 'another'} ({len(label_set)} classes): use export.format=ids"
            )
        self.label_set = label_set
        self.ids = label_set.id_lut()  # (256,) class index -> the label set's id
        if not 0.0 <= invalid_below <= 1.0:
            raise ValueError(f"export.invalid_below={invalid_below} must be in [0, 1]")
        self.format = FORMATS[fmt]
        self.out_dir = Path(out_dir)
        self.invalid_below = invalid_below
        self.color = color
        self.names: list[str] = []
        for sub in (*self.format.folders, *(("color",) if color else ())):
            (self.out_dir / sub).mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, name: str) -> None:
        """Write the files of one image.

        Args:
            logits: (C, h, w) class scores of the image (any resolution: resized bilinearly
                to the server's size first, so the argmax is taken at full resolution).
            name: the image's file stem (the server matches files by it).
        """
        if name in self.names:
            raise ValueError(f"two test images are named {name!r}: the server needs unique names")
        fmt = self.format
        logits = logits.float()
        if fmt.size is not None and tuple(logits.shape[-2:]) != fmt.size:
            logits = F.interpolate(logits[None], size=fmt.size, mode="bilinear")[0]
        probs = torch.softmax(logits, dim=0)
        confidence, train_ids = probs.max(dim=0)
        train_ids = train_ids.to(torch.uint8).cpu().numpy()
        if fmt.any_label_set:
            labels = self.ids[train_ids]
        else:
            labels = TRAIN_ID_TO_CITYSCAPES_ID[train_ids] if fmt.label_ids else train_ids
        write_image(self.out_dir / fmt.folder / f"{name}.png", labels)
        if fmt.darkzurich:
            conf = confidence.cpu().numpy()
            invalid = np.where(conf < self.invalid_below, np.uint8(255), train_ids)
            write_image(self.out_dir / "labelTrainIds_invalid" / f"{name}.png", invalid)
            scaled = np.round(conf.astype(np.float64) * 65535).astype(np.uint16)
            write_image(self.out_dir / "confidence" / f"{name}.png", scaled)
        if self.color:
            bgr = cv2.cvtColor(colorize(train_ids, self.label_set.palette), cv2.COLOR_RGB2BGR)
            write_image(self.out_dir / "color" / f"{name}.png", bgr)
        self.names.append(name)

    def finish(self, expected: int | None = None, make_zip: bool = True) -> Path | None:
        """Check the count, zip the server folders (atomically); returns the zip path.

        Args:
            expected: images that were to be exported (a mismatch is an error: the server
                rejects incomplete submissions).
            make_zip: build ``<out_dir>/<format>_submission.zip``.
        """
        fmt = self.format
        if expected is not None and len(self.names) != expected:
            raise ValueError(
                f"exported {len(self.names)} of {expected} test images: rerun mpcl.predict"
            )
        if fmt.num_images is not None and len(self.names) != fmt.num_images:
            log.warning(
                "%d images exported; the %s server expects %d (the whole test split)",
                len(self.names),
                fmt.name,
                fmt.num_images,
            )
        if not make_zip:
            return None
        path = self.out_dir / f"{fmt.name}_submission.zip"
        # PNGs are compressed already: store them.
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for folder in fmt.folders:
                for name in sorted(self.names):
                    zf.write(self.out_dir / folder / f"{name}.png", f"{folder}/{name}.png")
        return path
