"""W&B dashboards (offline run read back from disk): the resolved config, run name, images at
the right trainer/global_step; debug images; the checkpoint artifact when online."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from conftest import compose_train, tiny_synthetic
from wandb_records import read_run

from mpcl.data.labels import CITYSCAPES
from mpcl.monitor.dashboard import WandbExtras
from mpcl.monitor.debug_images import debug_grid
from mpcl.train import train


def _steps(history: list[dict], key: str) -> list[int]:
    """trainer/global_step of the rows that hold ``key`` (images: ``key/_type``)."""
    return [row["trainer/global_step"] for row in history if key in row or f"{key}/_type" in row]


@pytest.mark.slow
def test_offline_wandb_run_has_the_config_and_images_at_the_global_step(cache_dir, tmp_path):
    cfg = compose_train(
        [
            f"paths.cache_dir={cache_dir}",
            *tiny_synthetic(),
            "logger=wandb",
            "prototype.K=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.every_n_train_steps=4",
            "callbacks.debug_images.every_n_steps=2",
            "callbacks.figures.tsne_points=100",
        ],
        tmp_path,
    )
    train(cfg)
    import wandb

    wandb.finish()  # flush the run (the CLI does it in mpcl.run.cli.report_error)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_run(run_dir)
    # The whole resolved config, not only the module's hyperparameters.
    assert run["config"]["prototype"]["K"] == 2
    assert run["config"]["seed"] == 0 and run["config"]["data"]["batch_size"] == 2
    assert run["config"]["trainer"]["max_steps"] == 4
    assert run["name"].startswith("synthetic_gaussian ") and "prototype.K=2" in run["name"]
    history = run["history"]
    # Lightning logs step k's metrics (and the validation after it) at trainer/global_step
    # k - 1; the images must sit at the same x value as the metrics they belong to.
    assert _steps(history, "train/loss") == [0, 1, 2, 3]
    assert _steps(history, "val/mIoU") == [1, 3]  # validation after steps 2 and 4
    assert _steps(history, "val/predictions") == [1, 3]
    assert _steps(history, "val/IoU_table") == [1, 3]
    # Debug images of steps 2 and 4 (every 2 steps), beside those steps' losses.
    assert _steps(history, "debug/panels") == [1, 3]
    assert _steps(history, "debug/target") == [1, 3]
    for step in (2, 4):  # files count completed steps, as the checkpoints do
        grid = cv2.imread(str(tmp_path / "debug" / f"step_{step:06d}.png"))
        # 16 px titles + 2 samples x 64 px crops; 8 panels of 64 px (no MIC in DACS)
        assert grid.shape == (16 + 2 * 64, 8 * 64, 3)


def test_debug_grid_draws_each_intermediate_in_its_column():
    b, h, w = 2, 8, 12
    images = {
        "source": torch.zeros(b, 3, h, w),
        "pseudo_label": torch.full((b, h, w), 13),
        "mic_mask": torch.ones(b, 1, h // 2, w // 2),  # other sizes are resized
    }
    grid = debug_grid(images, CITYSCAPES.palette, max_rows=1)
    assert grid.shape == (16 + h, 3 * w, 3)
    cells = grid[16:]
    assert (cells[:, :w] == 0).all()  # black source image
    assert (cells[:, w : 2 * w] == [0, 0, 142]).all()  # car (13) in the Cityscapes palette
    viridis_top = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_VIRIDIS)
    assert (cells[:, 2 * w :] == viridis_top[0, 0, ::-1]).all()  # weight 1


class WandbLogger:  # named like Lightning's: the callbacks look loggers up by type name
    def __init__(self, offline: bool):
        self._offline = offline
        self.artifacts = []
        self.experiment = SimpleNamespace(id="abc", log_artifact=self._log)

    def _log(self, artifact, aliases):
        self.artifacts.append((artifact, aliases))


@pytest.mark.parametrize("offline", [True, False])
def test_final_checkpoint_is_an_artifact_only_online(offline, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"weights")
    logger = WandbLogger(offline)
    trainer = SimpleNamespace(
        global_rank=0,
        global_step=7,
        loggers=[logger],
        checkpoint_callback=SimpleNamespace(last_model_path=str(ckpt)),
    )
    WandbExtras().on_fit_end(trainer, None)
    if offline:
        assert logger.artifacts == []
        return
    ((artifact, aliases),) = logger.artifacts
    assert artifact.type == "model" and aliases == ["last", "step-7"]
    assert [e.path for e in artifact.manifest.entries.values()] == ["last.ckpt"]


def test_run_name_and_group_come_from_hydra(tmp_path):
    from mpcl.monitor.dashboard import run_group, run_name

    compose_train(["prototype.K=3", "seed=1", "paths.log_dir=/x"], tmp_path)
    assert run_name() == "synthetic_gaussian prototype.K=3 seed=1"
    assert run_group() == ""
    sweep = "/logs/train/multiruns/2026-01-01_00-00-00-000001"
    compose_train(["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}", "seed=2"], tmp_path)
    assert run_name() == "synthetic_gaussian seed=2"
    assert run_group() == "train/2026-01-01_00-00-00-000001"
