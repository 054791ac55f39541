"""Predict with a trained checkpoint: test-server submissions, or any folder of images / video.

    # A test split in its server's format (mpcl.export), zipped, + colour previews:
    python -m mpcl.predict ckpt_path=<file.ckpt> experiment=mic_gaussian data=cs2acdc split=test
    python -m mpcl.predict ckpt_path=<file.ckpt>             # synthetic: its val split, label IDs
    # Any images or a video: label PNGs (the label set's ids) + coloured overlays (+ video):
    python -m mpcl.predict ckpt_path=<file.ckpt> input=/photos [experiment=... as in training]
    python -m mpcl.predict ckpt_path=<file.ckpt> input=drive.mp4 video_stride=5

Outputs (``<run dir>``): for a split, the server folders (``labelIds/`` | ``labelTrainIds/``
[, ``labelTrainIds_invalid/``, ``confidence/``]), ``color/`` and ``<format>_submission.zip``;
for ``input=``, ``labels/<name>.png`` (at the image size, in the label set's ids: trainIds for
Cityscapes, each class's ``id`` for a classes.yaml, 16-bit where an id exceeds 255),
``overlay/<name>.png`` (the image blended with the class colours) and, for a video,
``overlay.mp4``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from rich.progress import track
from torch.utils.data import DataLoader

from mpcl.data.base import read_image
from mpcl.data.labels import colorize, label_set
from mpcl.errors import ConfigError
from mpcl.export import Exporter, format_for_dataset
from mpcl.io import write_image
from mpcl.run.build import build_module, build_target
from mpcl.run.cli import run_cli
from mpcl.run.resume import CheckpointFile
from mpcl.run.runlog import echo, to_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def default_split(cfg: DictConfig) -> str:
    """``split=null``: the target's test split, or ``val`` on the embedded benchmark (which
    has no test split)."""
    return "val" if "synthetic" in str(cfg.data.target_val.get("_target_", "")) else "test"


def predict_dataset(cfg: DictConfig):
    """The target set of ``cfg.split`` (test splits are unlabelled), built like target_val;
    nothing else is built, so only the target data need be on disk."""
    return build_target(cfg, split=cfg.get("split") or default_split(cfg))


def overlay(
    image: np.ndarray, train_ids: np.ndarray, palette: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blend the class colours over the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        train_ids: (H, W) uint8 class indices (255 = none: left as the image).
        palette: (C, 3) uint8 RGB class colours (``UDAModule.palette``).
        alpha: weight of the colours.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    color = colorize(train_ids, palette).astype(np.float32)
    out = image.astype(np.float32)
    labelled = (train_ids < 255)[..., None]
    out = np.where(labelled, (1 - alpha) * out + alpha * color, out)
    return np.round(out).astype(np.uint8)


def _check_input(path: Path) -> None:
    if not path.is_dir() and not (path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES):
        raise ConfigError(
            f"input={path} is not a folder of images or a video file ({', '.join(VIDEO_SUFFIXES)})"
        )


def output_names(files: list[Path]) -> list[str]:
    """The name each input image's outputs get: its stem, or, where several files share a
    stem (``a.png`` and ``a.jpg``), the stem and the extension (``a_png``, ``a_jpg``), so
    that no output overwrites another."""
    stems = [p.stem for p in files]
    names = [
        s if stems.count(s) == 1 else f"{s}_{p.suffix.lstrip('.').lower()}"
        for s, p in zip(stems, files, strict=True)
    ]
    taken = [n for n in names if names.count(n) > 1]  # a.PNG and a.png
    if taken:
        raise ConfigError(
            f"input has several images that would be written as {taken[0]}.png: rename them"
        )
    return names


def iter_input(path: Path, video_stride: int = 1) -> Iterator[tuple[str, np.ndarray]]:
    """(name, (H, W, 3) uint8 RGB) for each image of a folder (sorted) or frame of a video.
    A missing, corrupt or truncated image is a one-line OSError naming it."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"input={path} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for p, name in zip(files, output_names(files), strict=True):
            yield name, read_image(p)
        return
    _check_input(path)
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f"cannot open video {path}: corrupt or unsupported codec")
    try:
        index = 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            if index % video_stride == 0:
                yield f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise OSError(f"video {path} has no readable frame")


def _video_fps(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    capture.release()
    return fps


@torch.no_grad()
def predict_input(cfg: DictConfig, module: L.LightningModule, device: str) -> Path:
    """Label PNGs and overlays for ``cfg.input`` (a folder of images or a video)."""
    source = Path(str(cfg.input)).expanduser()
    out_dir = Path(cfg.paths.output_dir)
    for sub in ("labels", "overlay"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    stride = int(cfg.get("video_stride", 1))
    if stride < 1:
        raise ConfigError(f"video_stride={stride} must be >= 1")
    alpha = float(cfg.get("overlay_alpha", 0.5))
    ids = label_set(cfg.label_set).id_lut()  # class index -> the value label files hold
    is_video = source.is_file()
    count = 0
    # The overlay video goes to a temp file beside it (with the .mp4 suffix OpenCV picks the
    # container by), renamed into place only when complete.
    video = out_dir / "overlay.mp4"
    tmp_video = video.with_name(f".overlay.{os.getpid()}.tmp.mp4")
    writer = None
    try:
        for name, rgb in track(iter_input(source, stride), description="predicting"):
            image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None].to(device)
            train_ids = module.predict_logits(image).argmax(1)[0].to(torch.uint8).cpu().numpy()
            labels_png = out_dir / "labels" / f"{name}.png"
            write_image(labels_png, ids[train_ids])
            blended = cv2.cvtColor(
                overlay(rgb, train_ids, module.palette, alpha), cv2.COLOR_RGB2BGR
            )
            overlay_png = out_dir / "overlay" / f"{name}.png"
            write_image(overlay_png, blended)
            to_file(f"wrote {labels_png} {overlay_png}")  # every output path, in predict.log
            if is_video:
                if writer is None:
                    size = (blended.shape[1], blended.shape[0])
                    fps = _video_fps(source) / stride
                    fourcc = cv2.VideoWriter_fourcc(*"mp4v")
                    writer = cv2.VideoWriter(str(tmp_video), fourcc, fps, size)
                    if not writer.isOpened():
                        raise OSError(f"cannot write {video}: no mp4v encoder in this OpenCV")
                writer.write(blended)
            count += 1
        if writer is not None:
            writer.release()
            writer = None
            with open(tmp_video, "rb+") as f:  # on disk before the rename, as mpcl.io does
                os.fsync(f.fileno())
            os.replace(tmp_video, video)
            to_file(f"wrote {video}")
    finally:
        if writer is not None:
            writer.release()
        tmp_video.unlink(missing_ok=True)
    echo(f"{count} predictions: {out_dir / 'labels'} (label ids), overlays: {out_dir / 'overlay'}")
    return out_dir


@torch.no_grad()
def predict_split(cfg: DictConfig, module: L.LightningModule, device: str) -> Path:
    """The ``cfg.split`` set in its test server's format (``cfg.export``), zipped."""
    export = cfg.get("export") or {}
    fmt = export.get("format", "auto")
    if fmt == "auto":
        fmt = format_for_dataset(str(cfg.data.target_val._target_))
    out_dir = Path(cfg.paths.output_dir)
    invalid_below = float(export.get("invalid_below", 0.0))
    exporter = Exporter(fmt, out_dir, invalid_below, label_set=label_set(cfg.label_set))
    dataset = predict_dataset(cfg)
    loader = DataLoader(dataset, batch_size=1, num_workers=cfg.data.num_workers)
    for batch in track(loader, description="predicting"):
        logits = module.predict_logits(batch["image"].to(device))
        exporter.add(logits[0], batch["name"][0])
    zip_path = exporter.finish(expected=len(dataset), make_zip=bool(export.get("zip", True)))
    folders = ", ".join(str(out_dir / f) for f in exporter.format.folders)
    echo(f"predictions ({fmt} server format): {folders}; previews: {out_dir / 'color'}")
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts):
        if path.suffix != ".log":
            to_file(f"wrote {path}")  # every output path, in predict.log
    if zip_path is not None:
        echo(f"submission: {zip_path}")
    return out_dir


def predict(cfg: DictConfig, checkpoint: CheckpointFile | None = None) -> Path:
    """Predict ``cfg.input`` or the ``cfg.split`` set with the ``cfg.ckpt_path`` weights
    (``checkpoint``: that file already read, else read here)."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: python -m mpcl.predict ckpt_path=<file.ckpt>")
    if cfg.get("input"):
        _check_input(Path(str(cfg.input)).expanduser())  # before the (slow) model build
    checkpoint = checkpoint or CheckpointFile.read(cfg.ckpt_path)
    L.seed_everything(cfg.seed)
    module = build_module(cfg)
    checkpoint.load_into(module)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module.to(device).eval()
    if cfg.get("input"):
        return predict_input(cfg, module, device)
    return predict_split(cfg, module, device)


def main() -> None:
    run_cli("predict", predict)


if __name__ == "__main__":
    main()
