"""Predict with a trained checkpoint: test-server submissions, or any folder of images / video.

    # A test split in its server's format (mpcl.export), zipped, + colour previews:
    python -m mpcl.predict ckpt_path=<file.ckpt> experiment=mic_gaussian data=cs2acdc split=test
    python -m mpcl.predict ckpt_path=<file.ckpt> split=val          # synthetic: label IDs
    # Any images or a video: label PNGs (trainIds) + coloured overlays (+ overlay video):
    python -m mpcl.predict ckpt_path=<file.ckpt> input=/photos [experiment=... as in training]
    python -m mpcl.predict ckpt_path=<file.ckpt> input=drive.mp4 video_stride=5

Outputs (``<run dir>``): for a split, the server folders (``labelIds/`` | ``labelTrainIds/``
[, ``labelTrainIds_invalid/``, ``confidence/``]), ``color/`` and ``<format>_submission.zip``;
for ``input=``, ``labels/<name>.png`` (uint8 trainIds at the image size), ``overlay/<name>.png``
(the image blended with the class colours) and, for a video, ``overlay.mp4``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.progress import track
from torch.utils.data import DataLoader

from mpcl.data.labels import colorize
from mpcl.errors import ConfigError
from mpcl.export import Exporter, format_for_dataset
from mpcl.io import write_image
from mpcl.run.build import build_module
from mpcl.run.cli import run_cli
from mpcl.run.resume import CheckpointFile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def predict_dataset(cfg: DictConfig):
    """The target set of ``cfg.split`` (test splits are unlabelled), built like target_val."""
    ds_cfg = cfg.data.target_val.copy()
    with open_dict(ds_cfg):
        ds_cfg.split = cfg.split
    return instantiate(ds_cfg, _convert_="all")


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours over the image.

    Args:
        image: (H, W, 3) uint8 RGB.
        train_ids: (H, W) uint8 trainIds (255 = none: left as the image).
        alpha: weight of the colours.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    color = colorize(train_ids).astype(np.float32)
    out = image.astype(np.float32)
    labelled = (train_ids < 255)[..., None]
    out = np.where(labelled, (1 - alpha) * out + alpha * color, out)
    return np.round(out).astype(np.uint8)


def _check_input(path: Path) -> None:
    if not path.is_dir() and not (path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES):
        raise ConfigError(
            f"input={path} is not a folder of images or a video file ({', '.join(VIDEO_SUFFIXES)})"
        )


def iter_input(path: Path, video_stride: int = 1) -> Iterator[tuple[str, np.ndarray]]:
    """(name, (H, W, 3) uint8 RGB) for each image of a folder (sorted) or frame of a video."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"input={path} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for p in files:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise OSError(f"cannot read image {p}: corrupt or not an image; remove it")
            yield p.stem, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
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
            write_image(out_dir / "labels" / f"{name}.png", train_ids)
            blended = cv2.cvtColor(overlay(rgb, train_ids, alpha), cv2.COLOR_RGB2BGR)
            write_image(out_dir / "overlay" / f"{name}.png", blended)
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
    finally:
        if writer is not None:
            writer.release()
        tmp_video.unlink(missing_ok=True)
    print(f"{count} predictions: {out_dir / 'labels'} (trainIds), overlays: {out_dir / 'overlay'}")
    return out_dir


@torch.no_grad()
def predict_split(cfg: DictConfig, module: L.LightningModule, device: str) -> Path:
    """The ``cfg.split`` set in its test server's format (``cfg.export``), zipped."""
    export = cfg.get("export") or {}
    fmt = export.get("format", "auto")
    if fmt == "auto":
        fmt = format_for_dataset(str(cfg.data.target_val._target_))
    out_dir = Path(cfg.paths.output_dir)
    exporter = Exporter(fmt, out_dir, invalid_below=float(export.get("invalid_below", 0.0)))
    dataset = predict_dataset(cfg)
    loader = DataLoader(dataset, batch_size=1, num_workers=cfg.data.num_workers)
    for batch in track(loader, description="predicting"):
        logits = module.predict_logits(batch["image"].to(device))
        exporter.add(logits[0], batch["name"][0])
    zip_path = exporter.finish(expected=len(dataset), make_zip=bool(export.get("zip", True)))
    folders = ", ".join(str(out_dir / f) for f in exporter.format.folders)
    print(f"predictions ({fmt} server format): {folders}; previews: {out_dir / 'color'}")
    if zip_path is not None:
        print(f"submission: {zip_path}")
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
