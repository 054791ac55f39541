"""Rare Class Sampling (DAFormer): draw source crops so that rare classes are seen often.

A class c is drawn with probability P(c) = softmax((1 - f_c) / T) over the classes present in
the source set, f_c being the fraction of labelled pixels of class c; then a source image with
more than ``min_pixels`` pixels of c, then random crops of it (up to 10) until one holds more
than ``min_pixels * min_crop_ratio`` pixels of c. DAFormer uses T = 0.01, min_pixels = 3000,
min_crop_ratio = 0.5; HRDA and MIC use min_crop_ratio = 2.0 (their crops are larger).

The per-image class counts are computed once per dataset (``python -m mpcl.prepare`` writes
them beside the data) into ``sample_class_stats.json`` and ``samples_with_class.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mpcl.data.base import SegmentationDataset, make_item
from mpcl.data.labels import IGNORE_INDEX, map_ids
from mpcl.io import atomic_write_bytes, file_lock

log = logging.getLogger(__name__)

SAMPLE_CLASS_STATS = "sample_class_stats.json"
SAMPLES_WITH_CLASS = "samples_with_class.json"

# sample_class_stats: one {"name": image stem, "counts": {class index: n_pixels}} per labelled image
# (classes with 0 pixels left out). samples_with_class: class index -> [(image stem, n_pixels)].
SampleClassStats = list[dict]
SamplesWithClass = dict[int, list[tuple[str, int]]]
ClassStats = tuple[SampleClassStats, SamplesWithClass]


def count_classes(label: np.ndarray) -> np.ndarray:
    """Pixels per class: (H, W) uint8 class indices -> (255,) int64, entry c the pixels of class
    c (any label set: C <= 255; ignore, 255, not counted)."""
    return np.bincount(label.ravel(), minlength=256)[:IGNORE_INDEX].astype(np.int64)


def stats_from_counts(names: Sequence[str], counts: Sequence[np.ndarray]) -> ClassStats:
    """Build both statistics from per-image counts.

    Args:
        names: image stems (the ``name`` of the dataset items), one per image.
        counts: one int array of pixels per class index per image (``count_classes``).
    """
    sample_class_stats: SampleClassStats = []
    samples_with_class: SamplesWithClass = {}
    for name, cnt in zip(names, counts, strict=True):
        present = {int(c): int(cnt[c]) for c in np.flatnonzero(cnt)}
        sample_class_stats.append({"name": name, "counts": present})
        for c, n in present.items():
            samples_with_class.setdefault(c, []).append((name, n))
    return sample_class_stats, dict(sorted(samples_with_class.items()))


def read_train_ids(dataset: SegmentationDataset, index: int) -> np.ndarray:
    """The label of item ``index`` as (H, W) uint8 class indices, at the label file's resolution."""
    assert dataset.labels is not None
    label = dataset.label_reader(dataset.labels[index])
    if dataset.label_map is not None:
        label = map_ids(label, dataset.label_map)
    return label.astype(np.uint8)


def compute_class_stats(dataset: SegmentationDataset) -> ClassStats:
    """Count class pixels per image of a labelled dataset (labels only; images not read).

    Returns:
        (sample_class_stats, samples_with_class), see ``stats_from_counts``.
    """
    if not dataset.has_labels:
        raise ValueError("Rare Class Sampling needs a labelled (source) dataset")
    names = [p.stem for p in dataset.images]
    counts = [count_classes(read_train_ids(dataset, i)) for i in range(len(dataset))]
    return stats_from_counts(names, counts)


def _atomic_write_json(obj: object, path: Path) -> None:
    """Write JSON all or nothing (``mpcl.io``: temp file in the same folder, fsync, rename)."""
    atomic_write_bytes(path, json.dumps(obj).encode())


def save_stats(stats: ClassStats, directory: str | Path) -> None:
    """Write ``sample_class_stats.json`` and ``samples_with_class.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sample_class_stats, samples_with_class = stats
    _atomic_write_json(sample_class_stats, directory / SAMPLE_CLASS_STATS)
    _atomic_write_json(
        {str(c): v for c, v in samples_with_class.items()}, directory / SAMPLES_WITH_CLASS
    )


def load_stats(directory: str | Path) -> ClassStats:
    """Read the statistics ``save_stats`` wrote (JSON string keys back to int class indices)."""
    directory = Path(directory)
    paths = [directory / SAMPLE_CLASS_STATS, directory / SAMPLES_WITH_CLASS]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"Rare Class Sampling statistics {path} not found; run "
                "`python -m mpcl.prepare <dataset> --root DIR` once for the source dataset"
            )
    try:
        raw_samples = json.loads(paths[0].read_text())
        raw_with_class = json.loads(paths[1].read_text())
        sample_class_stats = [
            {"name": s["name"], "counts": {int(c): int(n) for c, n in s["counts"].items()}}
            for s in raw_samples
        ]
        samples_with_class = {
            int(c): [(str(name), int(n)) for name, n in v] for c, v in raw_with_class.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"Rare Class Sampling statistics in {directory} are malformed ({err}); delete them "
            "and rerun `python -m mpcl.prepare`"
        ) from None
    return sample_class_stats, samples_with_class


def cached_stats(dataset: SegmentationDataset, directory: str | Path | None = None) -> ClassStats:
    """The dataset's statistics from ``directory``, computed and saved there on first use.

    For generated data (the synthetic benchmark), which has no ``prepare`` step. ``directory``
    defaults to the folder above the label folder (``<domain>/<split>``).
    """
    if not dataset.has_labels:
        raise ValueError("Rare Class Sampling needs a labelled (source) dataset")
    directory = Path(directory) if directory is not None else dataset.labels[0].parent.parent
    # One process computes them (DDP ranks start together); the others wait for both files.
    with file_lock(directory / ".rcs_stats.lock"):
        if not all(
            (directory / name).is_file() for name in (SAMPLE_CLASS_STATS, SAMPLES_WITH_CLASS)
        ):
            save_stats(compute_class_stats(dataset), directory)
    return load_stats(directory)


def class_frequencies(sample_class_stats: SampleClassStats) -> tuple[np.ndarray, np.ndarray]:
    """Total pixels per class over the set -> (classes (K,) int64, pixel counts (K,) int64),
    for the K classes present, in class-index order."""
    total = np.zeros(IGNORE_INDEX, dtype=np.int64)
    for s in sample_class_stats:
        for c, n in s["counts"].items():
            total[c] += n
    classes = np.flatnonzero(total)
    return classes, total[classes]


def class_probabilities(freq: np.ndarray, temperature: float = 0.01) -> np.ndarray:
    """P(c) = softmax((1 - f_c) / T) with f_c = freq_c / sum(freq).

    Args:
        freq: (K,) pixel counts or frequencies of the K classes to sample from.
        temperature: T; smaller puts more mass on rare classes.

    Returns:
        (K,) float64 probabilities summing to 1.
    """
    freq = np.asarray(freq, dtype=np.float64)
    if freq.ndim != 1 or freq.size == 0 or freq.sum() <= 0 or (freq < 0).any():
        raise ValueError(
            f"class frequencies must be a non-empty 1-D non-negative array, got {freq}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = (1.0 - freq / freq.sum()) / temperature
    p = np.exp(logits - logits.max())  # shift for numerical stability
    return p / p.sum()


class RareClassSamplingDataset(Dataset):
    """Wraps a labelled source dataset; each item is a rare-class-biased random crop.

    The index is ignored: an item draws class c ~ P, an image with more than ``min_pixels``
    pixels of c, and applies ``dataset.transform`` (which should include the random crop) up
    to 10 times until the crop holds more than ``min_pixels * min_crop_ratio`` pixels of c.

    Args:
        dataset: the labelled source ``SegmentationDataset`` (its transform does the cropping).
        stats: a folder holding the two JSON files, or the ``(sample_class_stats,
            samples_with_class)`` tuple from ``compute_class_stats``.
        temperature: T of P(c) (DAFormer: 0.01).
        min_pixels: pixels of c an image must hold to be drawn (DAFormer: 3000, at full
            resolution; scale it with the image area for small images).
        min_crop_ratio: a crop must hold more than ``min_pixels * min_crop_ratio`` pixels of c
            (DAFormer 0.5; HRDA, MIC 2.0). 0 accepts the first crop.
        seed: mixed with ``torch.initial_seed()``, which differs per DataLoader worker and
            follows ``torch.manual_seed`` / Lightning's ``seed_everything``.

    Items are the wrapped dataset's: ``image`` (3, H, W) float32 in [0, 1], ``label`` (H, W)
    int64, ``name``. ``len`` is the wrapped dataset's (one epoch = as many draws as images).
    """

    max_tries = 10

    def __init__(
        self,
        dataset: SegmentationDataset,
        stats: str | Path | ClassStats,
        temperature: float = 0.01,
        min_pixels: int = 3000,
        min_crop_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not dataset.has_labels:
            raise ValueError("Rare Class Sampling needs a labelled (source) dataset")
        sample_class_stats, samples_with_class = (
            load_stats(stats) if isinstance(stats, (str, Path)) else stats
        )
        self.dataset = dataset
        self.min_pixels = min_pixels
        self.min_crop_ratio = min_crop_ratio
        self.seed = seed
        self.name_to_index = {p.stem: i for i, p in enumerate(dataset.images)}
        if len(self.name_to_index) != len(dataset):
            raise ValueError("Rare Class Sampling needs unique image names in the dataset")

        classes, freq = class_frequencies(sample_class_stats)
        probs = class_probabilities(freq, temperature)
        keep, self.samples_with_class = [], {}
        for k, c in enumerate(classes.tolist()):
            names = [name for name, n in samples_with_class.get(c, []) if n > min_pixels]
            if names:
                keep.append(k)
                self.samples_with_class[c] = names
        dropped = sorted(set(classes.tolist()) - set(self.samples_with_class))
        if dropped:
            # DAFormer asserts here; on small or cropped data it is more useful to go on.
            log.warning(
                "RCS: classes %s have no image with more than %d pixels; never sampled",
                dropped,
                min_pixels,
            )
        if not keep:
            raise ValueError(
                f"Rare Class Sampling: no image has more than min_pixels={min_pixels} pixels of "
                "any class; lower min_pixels (it is in full-resolution pixels)"
            )
        unknown = {n for v in self.samples_with_class.values() for n in v} - set(self.name_to_index)
        if unknown:
            raise ValueError(
                f"Rare Class Sampling statistics name {len(unknown)} images not in the dataset "
                f"(e.g. {sorted(unknown)[0]}); they belong to another dataset or split: rerun "
                "`python -m mpcl.prepare` or pass the right stats"
            )
        self.classes = classes[keep]  # (K,) class indices that can be drawn
        self.probabilities = probs[keep] / probs[keep].sum()  # (K,) P(c)
        self._rng: np.random.Generator | None = None
        self._rng_seed: int | None = None

    @property
    def transform(self) -> Callable | None:
        """The wrapped dataset's transform (so a worker_init_fn can reseed it)."""
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.dataset)

    def rng(self) -> np.random.Generator:
        """This process's generator, re-seeded whenever ``torch.initial_seed()`` changes.

        Each DataLoader worker gets its own ``torch.initial_seed()`` (base seed + worker id),
        so workers draw differently, and a seeded run draws the same classes again. (Calling
        ``torch.manual_seed`` again with the same seed in this process does not rewind it.)
        """
        torch_seed = torch.initial_seed()
        if self._rng is None or self._rng_seed != torch_seed:
            self._rng = np.random.default_rng([self.seed, torch_seed])
            self._rng_seed = torch_seed
        return self._rng

    def reseed(self, seed: int) -> None:
        """Draw the next items from a generator seeded by (``self.seed``, seed): the data
        module does this per sample so that a resumed run draws the same classes."""
        self._rng = np.random.default_rng([self.seed, seed])
        self._rng_seed = torch.initial_seed()

    def draw(self) -> tuple[dict, int]:
        """One rare-class sample -> (item dict, the drawn class c)."""
        rng = self.rng()
        c = int(rng.choice(self.classes, p=self.probabilities))
        names = self.samples_with_class[c]
        index = self.name_to_index[names[int(rng.integers(len(names)))]]
        # Read once, crop up to max_tries times (DAFormer re-reads the files for every try).
        image, label = self.dataset.load(index)
        transform = self.dataset.transform
        name = self.dataset.images[index].stem
        tries = self.max_tries if transform is not None and self.min_crop_ratio > 0 else 1
        for _ in range(tries):
            item = make_item(image, label, name, transform)
            if int((item["label"] == c).sum()) > self.min_pixels * self.min_crop_ratio:
                break
        return item, c

    def __getitem__(self, index: int) -> dict:
        return self.draw()[0]
