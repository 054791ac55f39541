"""Convert a dataset's labels to trainId PNGs once and compute its Rare Class Sampling stats.

    python -m mpcl.prepare gta --root data/gta --workers 8
    python -m mpcl.prepare folders --classes classes.yaml --images DIR --labels DIR

``folders`` (your own data, ``data=folders``) checks every image/label pair (an id or colour
outside the class set, a label of another size than its image, an image without a label, an
unreadable or truncated file: one line naming the file and the value) and writes the labels as
class-index PNGs and the RCS statistics into ``<labels>_prepared/`` (``mpcl.data.folders``).

Writes, beside each original label, an 8-bit trainId PNG (``labels/X_labelTrainIds.png`` for
GTA and SYNTHIA, ``*_gtFine_labelTrainIds.png`` for Cityscapes, ``*_gt_labelTrainIds.png`` for
ACDC and Dark Zurich, whose official downloads usually contain them already), and for the
source datasets (gta, synthia, cityscapes train) ``sample_class_stats.json`` and
``samples_with_class.json`` in the root. Files that exist are skipped, each file is written to
a temporary name and renamed, so an interrupted run leaves no half-written file and rerunning
finishes the job. Label IDs the format does not define are mapped to ignore (255) and counted.

Errors (missing root, wrong layout, corrupt PNG) print one line ``error: ...`` on stderr and
exit with status 2. Do not run two prepares on the same root at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mpcl.data import folders
from mpcl.data.base import SegmentationDataset, check_label_values, exif_orientation
from mpcl.data.datasets import (
    ACDC_CONDITIONS,
    CITYSCAPES_KNOWN_IDS,
    DATASETS,
    SYNTHIA_KNOWN_IDS,
    prepared_label_path,
    read_id_label,
)
from mpcl.data.labels import IGNORE_INDEX, LABEL_FORMATS, LabelSet, label_set, map_ids
from mpcl.data.rcs import (
    SAMPLE_CLASS_STATS,
    SAMPLES_WITH_CLASS,
    count_classes,
    save_stats,
    stats_from_counts,
)
from mpcl.io import atomic_write_bytes, remove_stale_temps, write_image
from mpcl.run.cli import command_name

log = logging.getLogger("mpcl.prepare")

# The splits of each official download that have labels.
LABELLED_SPLITS: dict[str, tuple[str, ...]] = {
    "gta": ("train",),
    "synthia": ("train",),
    "cityscapes": ("train", "val"),
    "acdc": ("train", "val"),
    "darkzurich": ("val",),
}
# Source datasets get RCS statistics, over their training split.
STATS_SPLIT: dict[str, str] = {"gta": "train", "synthia": "train", "cityscapes": "train"}
KNOWN_IDS: dict[str, np.ndarray] = {"synthia": SYNTHIA_KNOWN_IDS}  # default: Cityscapes IDs


@dataclass(frozen=True)
class Job:
    """Convert one label file ``src`` -> ``dst`` (and count its classes if ``count``)."""

    src: Path
    dst: Path
    reader: Callable[[str | Path], np.ndarray]
    table: np.ndarray  # (256,) raw ID -> trainId
    known: np.ndarray  # (257,) bool, which raw IDs the format defines (256 = "> 255")
    count: bool


@dataclass(frozen=True)
class JobResult:
    dst: Path
    converted: bool
    counts: np.ndarray | None  # (255,) int64 pixels per trainId (count_classes), when asked for
    unknown_pixels: int
    unknown_ids: tuple[int, ...]


@dataclass
class PrepareReport:
    """What a ``prepare`` run did."""

    converted: int = 0
    skipped: int = 0
    unknown_pixels: int = 0
    unknown_files: int = 0
    unknown_ids: set[int] = field(default_factory=set)
    stats_dir: Path | None = None  # where RCS statistics were written, if they were


def write_png_atomic(array: np.ndarray, path: Path) -> None:
    """Write an (H, W) uint8 array as PNG all or nothing (``mpcl.io.write_image``: checked
    encode, temp file ``.<name>.<pid>@<host>.tmp`` beside it, fsync, rename)."""
    write_image(path, array)


def convert_one(job: Job) -> JobResult:
    """Write ``job.dst`` from ``job.src`` unless it exists; count classes if asked."""
    if job.dst.exists():
        if job.count:  # a trainId file already there (e.g. shipped with the download)
            existing = read_id_label(job.dst)
            classes = int(job.table[job.table != IGNORE_INDEX].max()) + 1  # the table's trainIds
            check_label_values(existing, classes, IGNORE_INDEX, job.dst)
            return JobResult(job.dst, False, count_classes(existing), 0, ())
        return JobResult(job.dst, False, None, 0, ())
    raw = job.reader(job.src).astype(np.int64)  # (H, W) raw IDs
    unknown = ~job.known[np.clip(raw, 0, 256)]
    n_unknown = int(unknown.sum())
    ids = tuple(np.unique(raw[unknown]).tolist()) if n_unknown else ()
    train_ids = map_ids(raw, job.table)  # (H, W) uint8, unknown -> 255
    write_png_atomic(train_ids, job.dst)
    counts = count_classes(train_ids) if job.count else None
    return JobResult(job.dst, True, counts, n_unknown, ids)


def _datasets(name: str, root: Path) -> dict[str, SegmentationDataset]:
    """The labelled splits of ``name`` read from the original labels (``prepared=False``)."""
    kwargs = {}
    if name == "acdc":
        # Prepare the conditions that were downloaded (all four if none, for the error).
        present = [c for c in ACDC_CONDITIONS if (root / "rgb_anon" / c).is_dir()]
        kwargs["conditions"] = tuple(present) or ACDC_CONDITIONS
    return {
        split: DATASETS[name](root, split, prepared=False, **kwargs)
        for split in LABELLED_SPLITS[name]
    }


def say(console: Console, message: str) -> None:
    """Print a plain message (no rich markup, no line wrapping in logs)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def _remove_stale_temps(dsts: Sequence[Path]) -> int:
    """Delete temp files an interrupted run left beside the labels; returns how many."""
    wanted = {d.name for d in dsts}
    return sum(remove_stale_temps(f, wanted) for f in sorted({d.parent for d in dsts}))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(jobs: Sequence, workers: int, console: Console, work: Callable = convert_one) -> Iterator:
    """``work(job)`` for every job, in order, with a progress bar (``workers`` processes)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    if workers <= 1:
        with Progress(*columns, console=console) as progress:
            for job in progress.track(jobs, description="labels"):
                yield work(job)
        return
    # The pool is forked before the progress bar starts its refresh thread. Workers ignore
    # Ctrl-C: the parent gets it, stops them, and a rerun removes their temp files.
    with (
        multiprocessing.Pool(workers, _ignore_sigint) as pool,
        Progress(*columns, console=console) as progress,
    ):
        task = progress.add_task("labels", total=len(jobs))
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        for result in pool.imap(work, jobs, chunksize=chunk):
            progress.advance(task)
            yield result


def prepare(
    name: str, root: str | Path, workers: int = 1, console: Console | None = None
) -> PrepareReport:
    """Write the trainId labels of every labelled split and, for source datasets, the RCS
    statistics. Safe to rerun: finished files are skipped, and with nothing to do nothing is
    written."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    console = console or Console()
    root = Path(root).expanduser()
    splits = _datasets(name, root)  # checks the root and layout first
    known = KNOWN_IDS.get(name, CITYSCAPES_KNOWN_IDS)

    stats_split = STATS_SPLIT.get(name)
    need_stats = False
    if stats_split is not None:
        stats_labels = splits[stats_split].labels or []
        stats_missing = not all(
            (root / f).is_file() for f in (SAMPLE_CLASS_STATS, SAMPLES_WITH_CLASS)
        )
        need_stats = stats_missing or not all(prepared_label_path(p).exists() for p in stats_labels)

    report = PrepareReport()
    jobs: list[Job] = []
    for split, ds in splits.items():
        count = need_stats and split == stats_split
        for src in ds.labels or []:
            dst = prepared_label_path(src)
            if count or not dst.exists():
                jobs.append(Job(src, dst, ds.label_reader, ds.label_map, known, count))
            else:
                report.skipped += 1
    if not jobs:
        say(console, f"{name}: already prepared in {root}; nothing to do")
        return report

    stale = _remove_stale_temps([j.dst for j in jobs])
    if stale:
        log.info("%s: removed %d temp files left by an interrupted run", name, stale)
    say(console, f"{name}: preparing {len(jobs)} label files in {root}")
    counts: dict[Path, np.ndarray] = {}
    for res in _run(jobs, workers, console):
        report.converted += res.converted
        report.skipped += not res.converted
        if res.unknown_pixels:
            report.unknown_pixels += res.unknown_pixels
            report.unknown_files += 1
            report.unknown_ids.update(res.unknown_ids)
        if res.counts is not None:
            counts[res.dst] = res.counts
    if report.unknown_pixels:
        log.warning(
            "%s: %d pixels in %d label files had IDs the format does not define %s; "
            "mapped to ignore (255)",
            name,
            report.unknown_pixels,
            report.unknown_files,
            sorted(report.unknown_ids),
        )

    if need_stats:
        ds = splits[stats_split]
        names = [p.stem for p in ds.images]
        stats = stats_from_counts(names, [counts[prepared_label_path(p)] for p in ds.labels])
        save_stats(stats, root)
        report.stats_dir = root
        say(
            console,
            f"{name}: wrote Rare Class Sampling statistics ({SAMPLE_CLASS_STATS}, "
            f"{SAMPLES_WITH_CLASS}) for {len(names)} {stats_split} images to {root}",
        )
    say(console, f"{name}: {report.converted} labels converted, {report.skipped} already done")
    return report


# --------------------------------------------------------------------------------------------
# Your own data: python -m mpcl.prepare folders --classes C --images I --labels L
# --------------------------------------------------------------------------------------------

PENDING_LABEL_SET = ".label_set.pending.json"  # written first: files it covers can be kept


@dataclass(frozen=True)
class FolderJob:
    """Check one image/label pair and write its class-index PNG ``dst`` (unless ``keep``:
    written by an earlier run for the same class set, then only read back for the counts)."""

    image: Path
    label: Path
    dst: Path
    classes: LabelSet
    label_format: str
    keep: bool


def check_pair(job: FolderJob) -> tuple[np.ndarray | None, str | None]:
    """(pixels per class (255,) int64, None), or (None, the one-line problem of the pair)."""
    try:
        if job.keep:
            return count_classes(folders.read_prepared_label(job.dst)), None
        image = folders.read_image(job.image)  # decoded in full: truncated files fail here
        label = folders.read_class_label(job.label, job.classes, job.label_format)
        folders.check_same_size(image, label, job.image, job.label)
        job.dst.parent.mkdir(parents=True, exist_ok=True)
        write_png_atomic(label, job.dst)
        return count_classes(label), None
    except (OSError, ValueError) as err:
        return None, " ".join(str(err).split())


def prepare_folders(
    classes: str | Path | LabelSet,
    images: str | Path,
    labels: str | Path,
    label_format: str = "index",
    file_list: str | Path | None = None,
    workers: int = 1,
    console: Console | None = None,
) -> PrepareReport:
    """Check every image/label pair of a folder dataset and write, into ``<labels>_prepared``,
    its labels as class-index PNGs (255 = ignore), the RCS statistics and ``label_set.json``
    (the class set and format they were made for; written last). Files already written for
    the same class set, and not older than their label, are kept; with nothing to do nothing
    is written. Any bad pair: a
    ValueError naming the first file and the value, and how many more have problems."""
    console = console or Console()
    classes = label_set(classes)
    if label_format not in LABEL_FORMATS:
        raise ValueError(
            f"--label-format {label_format!r} is unknown: choose one of {', '.join(LABEL_FORMATS)}"
        )
    classes.value_to_class(label_format)  # raw without raw_ids: fails before any work
    image_paths, label_paths = folders.pair_files(images, labels, file_list)
    out = folders.prepared_dir(labels)
    fingerprint = classes.fingerprint(label_format)
    dsts = [folders.prepared_label_path(labels, p) for p in label_paths]
    done = folders.is_prepared(labels, classes, label_format)
    stats_there = all((out / f).is_file() for f in (SAMPLE_CLASS_STATS, SAMPLES_WITH_CLASS))
    report = PrepareReport()
    fresh = [folders.is_up_to_date(d, lab) for d, lab in zip(dsts, label_paths, strict=True)]
    if done and stats_there and all(fresh):
        report.skipped = len(dsts)
        say(console, f"folders: {labels} already prepared in {out}; nothing to do")
        return report
    pending = out / PENDING_LABEL_SET
    trusted = done
    try:
        trusted = trusted or json.loads(pending.read_text()) == fingerprint
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / folders.LABEL_SET_FILE).unlink(missing_ok=True)  # complete again only at the end
    atomic_write_bytes(pending, json.dumps(fingerprint).encode())
    stale = _remove_stale_temps(dsts)
    if stale:
        log.info("folders: removed %d temp files left by an interrupted run", stale)
    jobs = [
        FolderJob(i, lab, d, classes, label_format, keep=trusted and ok)
        for i, lab, d, ok in zip(image_paths, label_paths, dsts, fresh, strict=True)
    ]
    say(console, f"folders: checking {len(jobs)} image/label pairs of {images} and {labels}")
    counts, problems = [], []
    for job, (cnt, problem) in zip(jobs, _run(jobs, workers, console, check_pair), strict=True):
        counts.append(cnt)
        if problem is not None:
            problems.append(problem)
        elif job.keep:
            report.skipped += 1
        else:
            report.converted += 1
    if problems:
        more = f" ({len(problems) - 1} more pairs have problems)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)
    names = [p.stem for p in image_paths]
    if len(set(names)) != len(names):
        log.warning(
            "folders: image names repeat in subfolders; Rare Class Sampling needs unique names"
        )
    rotated = [p for p in image_paths if exif_orientation(p) != 1]
    if rotated:  # a label drawn on the stored pixels would be turned against its image
        say(
            console,
            f"folders: {len(rotated)} images carry an EXIF rotation (first: {rotated[0]}) and "
            "are read turned, as displayed: their labels must be drawn on the displayed image",
        )
    save_stats(stats_from_counts(names, counts), out)
    atomic_write_bytes(out / folders.LABEL_SET_FILE, json.dumps(fingerprint).encode())
    pending.unlink(missing_ok=True)
    report.stats_dir = out
    say(
        console,
        f"folders: {report.converted} labels converted, {report.skipped} already done; class "
        f"indices and Rare Class Sampling statistics in {out}",
    )
    return report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog=command_name("prepare"),
        description="Convert a dataset's labels to trainId PNGs once and compute its Rare "
        "Class Sampling statistics (see docs/datasets.md for the expected trees); `folders`: "
        "check and convert your own image/label folders (docs/datasets.md, Your own data).",
    )
    parser.add_argument("dataset", choices=[*DATASETS, "folders"])
    parser.add_argument("--root", type=Path, help="the dataset's root folder")
    parser.add_argument("--classes", type=Path, help="folders: the classes.yaml")
    parser.add_argument("--images", type=Path, help="folders: the image folder")
    parser.add_argument("--labels", type=Path, help="folders: the label folder")
    parser.add_argument(
        "--label-format", default="index", choices=LABEL_FORMATS, help="folders: %(choices)s"
    )
    parser.add_argument("--file-list", type=Path, help="folders: relative paths to keep")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="parallel processes (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.dataset == "folders":
        missing = [f"--{k}" for k in ("classes", "images", "labels") if getattr(args, k) is None]
        if missing:
            parser.error(f"folders needs {', '.join(missing)}")
    elif args.root is None:
        parser.error(f"{args.dataset} needs --root")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.dataset == "folders":
            prepare_folders(
                args.classes,
                args.images,
                args.labels,
                args.label_format,
                args.file_list,
                workers=max(1, args.workers),
            )
        else:
            prepare(args.dataset, args.root, workers=max(1, args.workers))
    except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
        print("error: " + str(err).replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; finished files are kept, rerun to complete", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
