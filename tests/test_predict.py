"""mpcl.predict on a folder of images, on a video, and on a real test split (ACDC layout) in
its server format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import compose_train, tiny_synthetic
from fake_trees import make_acdc

from mpcl.data.labels import CITYSCAPES, colorize
from mpcl.predict import overlay, predict
from mpcl.run.build import build_module


@pytest.fixture(scope="module")
def checkpoint(cache_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """An (untrained) small model's weights as a checkpoint, and the overrides that built it."""
    overrides = [f"paths.cache_dir={cache_dir}", *tiny_synthetic()]
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    module = build_module(compose_train(overrides, out))
    path = out / "weights.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)
    return path, overrides


def _direct(overrides: list[str], ckpt: Path, tmp_path: Path):
    """A function: (H, W, 3) uint8 image -> trainIds, computed without mpcl.predict."""
    module = build_module(compose_train(overrides, tmp_path / "direct"))
    module.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    module.eval()

    @torch.no_grad()
    def segment(rgb: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
        return module.predict_logits(image).argmax(1)[0].numpy().astype(np.uint8)

    return segment


def test_folder_gives_label_pngs_and_overlays(checkpoint, tmp_path):
    ckpt, overrides = checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {f"img{i}": rng.integers(0, 256, (40 + 8 * i, 56, 3), np.uint8) for i in range(3)}
    for name, rgb in images.items():
        cv2.imwrite(str(folder / f"{name}.{'jpg' if name == 'img2' else 'png'}"), rgb[..., ::-1])
    (folder / "notes.txt").write_text("not an image\n")
    out = tmp_path / "pred"
    predict(compose_train([*overrides, f"ckpt_path={ckpt}", f"input={folder}"], out, "predict"))
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{n}.png" for n in images]
    segment = _direct(overrides, ckpt, tmp_path)
    for name, rgb in images.items():
        if name == "img2":  # JPEG: compare with what the reader decodes
            rgb = cv2.imread(str(folder / "img2.jpg"))[..., ::-1].copy()
        labels = cv2.imread(str(out / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint8 and labels.shape == rgb.shape[:2]
        np.testing.assert_array_equal(labels, segment(rgb))
        blended = cv2.imread(str(out / "overlay" / f"{name}.png"))[..., ::-1]
        color = colorize(labels, CITYSCAPES.palette)
        want = np.round(0.5 * rgb.astype(np.float32) + 0.5 * color).astype(np.uint8)
        np.testing.assert_array_equal(blended, want)


def test_folder_labels_are_the_class_sets_ids(cache_dir, tmp_path):
    # A classes.yaml whose ids are not the class indices (one past 255): the label PNGs hold
    # the ids, 16-bit, as the set's own label files do.
    classes = tmp_path / "classes.yaml"
    classes.write_text(
        "classes:\n"
        "  - {name: soil, id: 3, color: [120, 80, 40]}\n"
        "  - {name: crop, id: 7, color: [40, 200, 40]}\n"
        "  - {name: weed, id: 300, color: [250, 50, 50]}\n"
        "ignore_index: 0\n"
    )
    overrides = [f"paths.cache_dir={cache_dir}", *tiny_synthetic(), f"label_set={classes}"]
    torch.manual_seed(0)
    module = build_module(compose_train(overrides, tmp_path / "build"))
    assert module.num_classes == 3
    ckpt = tmp_path / "weights.ckpt"
    torch.save({"state_dict": module.state_dict()}, ckpt)
    folder = tmp_path / "photos"
    folder.mkdir()
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), np.uint8)
    cv2.imwrite(str(folder / "a.png"), rgb[..., ::-1])
    out = tmp_path / "pred"
    predict(compose_train([*overrides, f"ckpt_path={ckpt}", f"input={folder}"], out, "predict"))
    labels = cv2.imread(str(out / "labels" / "a.png"), cv2.IMREAD_UNCHANGED)
    indices = _direct(overrides, ckpt, tmp_path)(rgb)
    assert labels.dtype == np.uint16 and set(np.unique(labels)) <= {3, 7, 300}
    np.testing.assert_array_equal(labels, np.array([3, 7, 300])[indices])


def test_overlay_leaves_unlabelled_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 255], [255, 255]], np.uint8)
    out = overlay(image, labels, CITYSCAPES.palette, alpha=0.25)
    assert (out[0, 1] == 100).all() and not (out[0, 0] == 100).all()


def test_video_frames_and_overlay_video(checkpoint, tmp_path):
    ckpt, overrides = checkpoint
    video = tmp_path / "drive.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    out = tmp_path / "pred"
    cfg = compose_train(
        [*overrides, f"ckpt_path={ckpt}", f"input={video}", "video_stride=2"], out, "predict"
    )
    predict(cfg)
    names = sorted(p.stem for p in (out / "labels").iterdir())
    assert names == ["frame_000000", "frame_000002", "frame_000004"]
    capture = cv2.VideoCapture(str(out / "overlay.mp4"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == 3 and not list(out.glob(".overlay*"))  # complete, temp file gone


def test_missing_input_is_a_clear_error(checkpoint, tmp_path):
    ckpt, overrides = checkpoint
    cfg = compose_train([*overrides, f"ckpt_path={ckpt}", "input=/nope"], tmp_path, "predict")
    with pytest.raises(ValueError, match="input=/nope is not a folder of images or a video"):
        predict(cfg)


def test_acdc_test_split_is_exported_for_the_server(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    make_acdc(tmp_path / "data" / "acdc", conditions=("fog",), per_split=2)
    overrides = [
        "prototype.feature_bank_size=380",  # as the checkpoint's model
        "data=cs2acdc",
        f"paths.data_dir={tmp_path / 'data'}",
        "benchmark.conditions=[fog]",
        "benchmark.eval_resize=[64,128]",  # the fake images are 24x32: too small for MiT
        "trainer=cpu",
        "data.num_workers=0",
    ]
    out = tmp_path / "pred"
    predict(compose_train([*overrides, f"ckpt_path={ckpt}"], out, "predict"))
    stems = sorted(p.stem for p in (tmp_path / "data/acdc/rgb_anon/fog/test").rglob("*.png"))
    assert len(stems) == 2
    with zipfile.ZipFile(out / "acdc_submission.zip") as zf:
        assert sorted(zf.namelist()) == [f"labelTrainIds/{s}.png" for s in stems]
        image = cv2.imdecode(
            np.frombuffer(zf.read(f"labelTrainIds/{stems[0]}.png"), np.uint8),
            cv2.IMREAD_UNCHANGED,
        )
    assert image.dtype == np.uint8 and image.shape == (1080, 1920) and image.max() < 19
