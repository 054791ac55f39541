"""Rare Class Sampling: statistics, P(c), and the sampling dataset."""

from __future__ import annotations

import json

import albumentations as A
import numpy as np
import pytest
import torch
from fake_trees import make_gta
from torch.utils.data import DataLoader

from mpcl.data.base import SegmentationDataset
from mpcl.data.datasets import gta
from mpcl.data.rcs import (
    SAMPLE_CLASS_STATS,
    SAMPLES_WITH_CLASS,
    RareClassSamplingDataset,
    class_frequencies,
    class_probabilities,
    compute_class_stats,
    load_stats,
    save_stats,
)
from mpcl.prepare import write_png_atomic

S = 64  # image side of the synthetic RCS set


def test_stats_match_a_direct_count(tmp_path):
    make_gta(tmp_path, n=4, mismatch=True)
    ds = gta(tmp_path, prepared=False)
    sample_class_stats, samples_with_class = compute_class_stats(ds)
    assert [s["name"] for s in sample_class_stats] == ["00001", "00002", "00003", "00004"]
    for i, s in enumerate(sample_class_stats):
        raw = ds.label_reader(ds.labels[i])  # counted at the label file's own size
        direct = np.bincount(ds.label_map[raw].ravel(), minlength=256)[:19]
        assert s["counts"] == {c: int(n) for c, n in enumerate(direct) if n > 0}
        for c, n in s["counts"].items():
            assert (s["name"], n) in samples_with_class[c]
    n_entries = sum(len(v) for v in samples_with_class.values())
    assert n_entries == sum(len(s["counts"]) for s in sample_class_stats)


def test_save_load_roundtrip_is_atomic(tmp_path):
    make_gta(tmp_path / "gta", n=3)
    stats = compute_class_stats(gta(tmp_path / "gta", prepared=False))
    save_stats(stats, tmp_path / "stats")
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == [
        SAMPLE_CLASS_STATS,
        SAMPLES_WITH_CLASS,
    ]  # no temp files left behind
    assert load_stats(tmp_path / "stats") == stats
    with pytest.raises(FileNotFoundError, match="run `python -m mpcl.prepare"):
        load_stats(tmp_path)
    (tmp_path / "stats" / SAMPLES_WITH_CLASS).write_text("{")
    with pytest.raises(ValueError, match="malformed"):
        load_stats(tmp_path / "stats")


def test_class_probabilities_is_the_temperature_softmax():
    freq = np.array([900.0, 90.0, 10.0])
    f = freq / freq.sum()
    for t in (0.01, 0.1, 1.0):
        logits = (1 - f) / t
        expected = np.exp(logits) / np.exp(logits).sum()
        np.testing.assert_allclose(class_probabilities(freq, t), expected, rtol=1e-10)
    p = class_probabilities(freq)
    assert p.sum() == pytest.approx(1.0) and p[2] > p[1] > p[0]
    np.testing.assert_allclose(class_probabilities(f), p)  # counts or fractions alike
    with pytest.raises(ValueError):
        class_probabilities(np.zeros(3))


def make_rcs_set(tmp_path, n: int = 6) -> SegmentationDataset:
    """Road everywhere; image 0 also has a 24x24 block of "train" (16) in its top-left corner,
    image 1 a 16x16 block of "bicycle" (18) - rare classes a random crop easily misses."""
    images, labels = [], []
    for i in range(n):
        lab = np.zeros((S, S), np.uint8)  # road
        if i == 0:
            lab[:24, :24] = 16
        if i == 1:
            lab[:16, :16] = 18
        images.append(tmp_path / f"img{i}.png")
        labels.append(tmp_path / f"img{i}_labelTrainIds.png")
        write_png_atomic(np.full((S, S, 3), 40 * i, np.uint8), images[-1])
        write_png_atomic(lab, labels[-1])
    transform = A.Compose([A.RandomCrop(32, 32)], seed=0)
    return SegmentationDataset(images, labels, transform)


def test_rcs_crops_contain_the_sampled_class(tmp_path):
    ds = make_rcs_set(tmp_path)
    stats = compute_class_stats(ds)
    classes, freq = class_frequencies(stats[0])
    assert classes.tolist() == [0, 16, 18]
    rcs = RareClassSamplingDataset(ds, stats, min_pixels=100, min_crop_ratio=0.5)
    np.testing.assert_allclose(rcs.probabilities, class_probabilities(freq))
    assert rcs.samples_with_class == {0: [f"img{i}" for i in range(6)], 16: ["img0"], 18: ["img1"]}
    torch.manual_seed(0)
    drawn, hits = [], 0
    for _ in range(40):
        item, c = rcs.draw()
        drawn.append(c)
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
        hits += int((item["label"] == c).sum()) > 50
    # Rare classes dominate (P(road) ~ e^-100), and re-cropping finds them: a single random
    # crop of img1 holds > 50 bicycle pixels with probability ~8%, ten tries ~57%.
    assert set(drawn) == {16, 18}
    assert hits >= 30
    assert set(rcs[123]) == {"image", "label", "name"}  # the index is ignored


def test_rcs_without_transform_returns_the_full_image(tmp_path):
    ds = make_rcs_set(tmp_path)
    ds.transform = None
    rcs = RareClassSamplingDataset(ds, compute_class_stats(ds), min_pixels=100)
    item, c = rcs.draw()
    assert item["label"].shape == (S, S) and (item["label"] == c).any()
    assert len(rcs) == len(ds)


def test_rcs_is_reproducible_and_differs_per_seed(tmp_path):
    ds = make_rcs_set(tmp_path)
    ds.transform = None
    stats = compute_class_stats(ds)

    def names(seed: int) -> list[str]:
        rcs = RareClassSamplingDataset(ds, stats, min_pixels=10, temperature=1.0)
        torch.manual_seed(seed)
        return [rcs[0]["name"] for _ in range(30)]

    assert names(1) == names(1)
    assert names(1) != names(2)


def test_rcs_dataloader_workers_draw_differently(tmp_path):
    ds = make_rcs_set(tmp_path)
    ds.transform = None
    rcs = RareClassSamplingDataset(ds, compute_class_stats(ds), min_pixels=10, temperature=1.0)

    def run() -> list[str]:
        torch.manual_seed(3)
        loader = DataLoader(rcs, batch_size=None, num_workers=2, shuffle=False)
        return [item["name"] for item in loader]

    first = run()
    # batch_size=None and in-order loading: workers 0 and 1 alternate item by item.
    assert first[0::2] != first[1::2]
    assert run() == first


def test_rcs_transform_passthrough(tmp_path):
    ds = make_rcs_set(tmp_path)
    rcs = RareClassSamplingDataset(ds, compute_class_stats(ds), min_pixels=100)
    assert rcs.transform is ds.transform
    rcs.transform.set_random_seed(7)  # what a worker_init_fn does
    new = A.Compose([A.RandomCrop(16, 16)])
    rcs.transform = new
    assert ds.transform is new and rcs.draw()[0]["label"].shape == (16, 16)


def test_rcs_reads_stats_from_a_folder_and_checks_them(tmp_path, caplog):
    (tmp_path / "data").mkdir()
    ds = make_rcs_set(tmp_path / "data")
    save_stats(compute_class_stats(ds), tmp_path / "stats")
    with caplog.at_level("WARNING"):
        rcs = RareClassSamplingDataset(ds, tmp_path / "stats", min_pixels=300)
    assert rcs.classes.tolist() == [0, 16]  # 18 has 256 pixels: never sampled, and said so
    assert "[18]" in caplog.text
    with pytest.raises(ValueError, match="lower min_pixels"):
        RareClassSamplingDataset(ds, tmp_path / "stats", min_pixels=10**6)
    data = json.loads((tmp_path / "stats" / SAMPLES_WITH_CLASS).read_text())
    data["16"] = [["img99", 500]]
    (tmp_path / "stats" / SAMPLES_WITH_CLASS).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not in the dataset"):
        RareClassSamplingDataset(ds, tmp_path / "stats", min_pixels=100)
    with pytest.raises(ValueError, match="labelled"):
        RareClassSamplingDataset(SegmentationDataset(ds.images), tmp_path / "stats")


def test_cached_stats_computes_once_and_matches_direct_count(tmp_path):
    import cv2

    from mpcl.data.base import SegmentationDataset
    from mpcl.data.rcs import cached_stats

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    labels = []
    for i in range(3):
        lab = rng.integers(0, 4, (8, 8)).astype(np.uint8)
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "labels" / f"{i}.png"), lab)
        labels.append(lab)
    ds = SegmentationDataset(
        sorted((tmp_path / "images").glob("*.png")), sorted((tmp_path / "labels").glob("*.png"))
    )
    sample_stats, _ = cached_stats(ds)
    assert (tmp_path / "sample_class_stats.json").is_file()
    for entry, lab in zip(sample_stats, labels, strict=True):
        direct = np.bincount(lab.ravel(), minlength=4)
        assert entry["counts"] == {c: int(n) for c, n in enumerate(direct) if n}
    mtime = (tmp_path / "sample_class_stats.json").stat().st_mtime_ns
    cached_stats(ds)
    assert (tmp_path / "sample_class_stats.json").stat().st_mtime_ns == mtime
