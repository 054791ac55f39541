"""The embedded synthetic domain-shift benchmark: determinism, cache, content, domain shift."""

from __future__ import annotations

import colorsys
import json

import cv2
import numpy as np
import pytest
import torch

from mpcl.data import synthetic
from mpcl.data.base import SegmentationDataset
from mpcl.data.labels import IGNORE_INDEX, NUM_CLASSES

TINY = dict(image_size=(64, 128), num_source_train=3, num_target_train=3, num_target_val=2)
TINY_COUNTS = {"source_train": 3, "target_train": 3, "target_val": 2}
TINY_NAME = synthetic._root_name(0, (64, 128), TINY_COUNTS)
REQUIRED = {
    0,
    1,
    2,
    5,
    7,
    8,
    9,
    10,
    11,
    13,
}  # road sidewalk building pole sign veg terrain sky person car


def _scenes(domain: str, n: int = 24):
    """n scenes at the default size, drawn in memory: (n, H, W, 3) uint8, (n, H, W) uint8."""
    pairs = [synthetic.render_scene(domain, np.random.default_rng([123, i])) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@pytest.fixture(scope="module")
def scenes():
    return {d: _scenes(d) for d in synthetic.DOMAINS}


def _files(root):
    return sorted(p for p in root.rglob("*.png"))


def test_generate_layout_and_determinism(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=0, **TINY)
    b = synthetic.generate(tmp_path / "b", seed=0, **TINY)
    c = synthetic.generate(tmp_path / "c", seed=1, **TINY)
    assert a.name.startswith("synthetic-v1-seed0")
    for domain, splits in synthetic.SPLITS.items():
        for split in splits:
            n = 3 if split == "train" else 2
            assert len(list((a / domain / split / "images").glob("*.png"))) == n
            assert len(list((a / domain / split / "labels").glob("*.png"))) == n
    fa, fb = _files(a), _files(b)
    assert [p.relative_to(a) for p in fa] == [p.relative_to(b) for p in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    assert any(x.read_bytes() != y.read_bytes() for x, y in zip(fa, _files(c)))
    meta = json.loads((a / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == [64, 128]
    # Labels are 8-bit single-channel trainId PNGs; images 8-bit RGB of the requested size.
    lab = cv2.imread(str(a / "real" / "val" / "labels" / "00000.png"), cv2.IMREAD_UNCHANGED)
    img = cv2.imread(str(a / "real" / "val" / "images" / "00000.png"), cv2.IMREAD_UNCHANGED)
    assert lab.dtype == np.uint8 and lab.shape == (64, 128)
    assert img.shape == (64, 128, 3)
    assert set(np.unique(lab)) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}


def test_default_sizes_get_the_plain_name(tmp_path):
    name = synthetic._root_name(3, synthetic.DEFAULT_IMAGE_SIZE, dict(synthetic.DEFAULT_COUNTS))
    assert name == "synthetic-v1-seed3"


def test_synthetic_dataset_items(tmp_path):
    ds = synthetic.synthetic_dataset(tmp_path, "night", "val", seed=0, **TINY)
    assert isinstance(ds, SegmentationDataset) and len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 64, 128) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].shape == (64, 128) and item["label"].dtype == torch.int64
    assert item["name"] == "00000"


def test_unknown_domain_or_split(tmp_path):
    with pytest.raises(ValueError, match="source, real, night"):
        synthetic.synthetic_dataset(tmp_path, "foggy", "train")
    with pytest.raises(ValueError, match="choose train"):
        synthetic.synthetic_dataset(tmp_path, "source", "val")
    assert not any(tmp_path.iterdir())  # nothing generated for a bad request


def test_cache_is_reused(tmp_path, monkeypatch):
    root = synthetic.generate(tmp_path, seed=0, **TINY)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete cache")

    monkeypatch.setattr(synthetic, "render_scene", fail)
    assert synthetic.generate(tmp_path, seed=0, **TINY) == root


def test_interrupted_generation_is_not_taken_as_complete(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = synthetic.render_scene

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path, seed=0, **TINY)
    assert list(tmp_path.iterdir()) == []  # no root, and the temp dir was cleaned up
    # A temp dir left by a killed process (no cleanup ran) is ignored too.
    stale = tmp_path / f".{TINY_NAME}.tmp-killed"
    (stale / "source" / "train" / "images").mkdir(parents=True)
    monkeypatch.setattr(synthetic, "render_scene", real_render)
    root = synthetic.generate(tmp_path, seed=0, **TINY)
    assert (root / "meta.json").is_file() and len(_files(root)) == 2 * (3 + 2 * (3 + 2))
    # A root that did not come from a finished generation is refused, not silently used.
    broken = tmp_path / "x"
    (broken / TINY_NAME / "source").mkdir(parents=True)
    with pytest.raises(OSError, match="not a complete synthetic set"):
        synthetic.generate(broken, seed=0, **TINY)


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"not a directory: set paths.cache_dir=<writable dir>"):
        synthetic.generate(blocker, **TINY)
    with pytest.raises(OSError, match=r"is not writable.*set paths.cache_dir"):
        synthetic.generate(blocker / "sub", **TINY)


def test_classes_present(scenes):
    for domain, (_, labels) in scenes.items():
        present = set(np.unique(labels).tolist()) - {IGNORE_INDEX}
        assert len(present) >= 10, (domain, present)
        assert REQUIRED <= present, (domain, REQUIRED - present)
        assert (labels != IGNORE_INDEX).all()  # every pixel has a class


def test_domains_differ(scenes):
    brightness = {d: imgs.mean() for d, (imgs, _) in scenes.items()}
    assert brightness["night"] < 0.5 * brightness["real"]
    assert brightness["night"] < 0.5 * brightness["source"]

    def freq(labels):
        f = np.bincount(labels.ravel(), minlength=256)[:NUM_CLASSES].astype(float)
        return f / f.sum()

    f = {d: freq(lab) for d, (_, lab) in scenes.items()}
    assert 0.5 * np.abs(f["source"] - f["real"]).sum() > 0.05  # class frequency shift
    assert f["real"][10] > f["source"][10]  # lower horizon in `real`: more sky

    # Source is flat-shaded: few distinct colours; real is textured and noisy.
    def colours(img):
        return len(np.unique(img.reshape(-1, 3), axis=0))

    assert colours(scenes["source"][0][0]) < 0.1 * colours(scenes["real"][0][0])


def test_object_classes_are_multimodal(scenes):
    imgs, labels = scenes["source"]
    car = imgs[labels == 13].astype(float) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in car[:: max(1, len(car) // 4000)]])
    light_van = (hsv[:, 2] > 0.8) & (hsv[:, 1] < 0.35)  # white/cream vans
    saturated_sedan = hsv[:, 1] > 0.6  # red/blue/green sedans
    assert light_van.mean() > 0.15 and saturated_sedan.mean() > 0.15
    building = imgs[labels == 2].astype(int)
    brick = building[:, 0] > building[:, 2] + 40  # reddish brick houses
    glass = building[:, 2] > building[:, 0] + 40  # bluish glass towers
    assert brick.mean() > 0.15 and glass.mean() > 0.15


def test_preview(tmp_path):
    root = synthetic.generate(tmp_path, seed=0, **TINY)
    out = synthetic.save_preview(root, tmp_path / "preview.png", num=2)
    grid = cv2.imread(str(out))
    assert grid.shape == (6 * 64 + 5 * 4, 2 * 128 + 4, 3)
