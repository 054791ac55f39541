"""End to end: every experiment composes and runs a fast_dev_run on the CPU; prototypes turn
on; resume is exact; multirun sweeps. (Bad input: the matrix in test_reliability.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    EXPERIMENTS,
    TINY_BANK,
    compose_train,
    subprocess_env,
    tiny_synthetic,
)
from fake_trees import make_cityscapes, make_gta
from hydra.types import RunMode
from hydra.utils import instantiate

from mpcl.prepare import prepare
from mpcl.run.build import build
from mpcl.train import train

SYNTHETIC = [e for e in EXPERIMENTS if e.startswith("synthetic")]
FULL_SIZE = [e for e in EXPERIMENTS if not e.startswith("synthetic")]


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory) -> Path:
    """GTA and Cityscapes in their official layouts, prepared (trainIds + RCS statistics)."""
    root = tmp_path_factory.mktemp("data")
    make_gta(root / "gta", n=4)
    make_cityscapes(root / "cityscapes", per_city=2)
    prepare("gta", root / "gta")
    prepare("cityscapes", root / "cityscapes")
    return root


def full_size_overrides(experiment: str, data_dir: Path) -> list[str]:
    """The test-only scale-down of a full-size experiment: 1-block MiT stages or a 4-block,
    width-32 ViT (the VFM experiments), 64 px crops."""
    multi = experiment.startswith(("hrda", "mic"))
    model = "model"
    if experiment.startswith("vfm"):  # ViT-L/14 -> 4 blocks of width 32: pyramid 8, 16, 32, 32
        encoder = [
            f"++{model}.encoder.{k}={v}"
            for k, v in (("depth", 4), ("embed_dim", 32), ("num_heads", 2))
        ] + [
            f"{model}.encoder.blocks=null",
            f"{model}.decode_head.in_channels=[8,16,32,32]",
            "data.batch_size=2",  # not VFM-UDA's 8: tests run batch 2 like the others
        ]
    else:
        encoder = [f"{model}.encoder.depths=[1,1,1,1]"]
    out = [
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        *encoder,
        f"{model}.encoder.pretrained=null",
        "benchmark.source_resize=[64,128]",
        "benchmark.target_resize=[64,128]",
        "benchmark.crop_size=64",
        "benchmark.eval_resize=[64,128]",
        "benchmark.rcs_min_pixels=5",
        "trainer=cpu",
        "data.num_workers=0",
        "data.pin_memory=false",
    ]
    if not experiment.endswith("baseline"):
        out += TINY_BANK
    if multi:
        out += [
            "model.hr_crop_size=[32,32]",
            "model.hr_slide_window=[32,32]",
            "model.hr_slide_stride=[16,16]",
            "model.test_window=[64,128]",
            "model.test_stride=[32,64]",
        ]
    if experiment.startswith("mic"):
        out.append("uda.mic.block_size=16")
    return out


def _fast_dev_run(overrides: list[str], tmp_path: Path) -> None:
    cfg = compose_train([*overrides, "debug=fdr"], tmp_path)
    train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", SYNTHETIC)
def test_synthetic_experiment_fast_dev_run(experiment, cache_dir, tmp_path):
    _fast_dev_run(
        [f"experiment={experiment}", f"paths.cache_dir={cache_dir}", *tiny_synthetic(experiment)],
        tmp_path,
    )


@pytest.mark.slow
@pytest.mark.parametrize("experiment", FULL_SIZE)
def test_full_size_experiment_fast_dev_run(experiment, fake_data_dir, tmp_path):
    _fast_dev_run(full_size_overrides(experiment, fake_data_dir), tmp_path)


@pytest.mark.parametrize("data", ["synthia2cs", "cs2acdc", "cs2darkzurich"])
def test_other_benchmarks_compose(data, tmp_path):
    cfg = compose_train(["experiment=mic_gaussian", f"data={data}"], tmp_path)
    assert cfg.model._target_.endswith("HRDASegmentor")
    assert cfg.benchmark.crop_size == 1024  # multi-resolution sizes follow the data config
    if data == "synthia2cs":
        assert cfg.benchmark.source_resize == [1520, 2560]
        assert len(cfg.class_subsets.mIoU16) == 16 and len(cfg.class_subsets.mIoU13) == 13


def test_paper_settings_of_mic_gaussian(tmp_path):
    cfg = compose_train(["experiment=mic_gaussian"], tmp_path)
    assert cfg.data.source_train._target_ == "mpcl.data.datasets.gta"
    assert cfg.trainer.max_steps == 60000 and cfg.data.batch_size == 2
    assert cfg.uda.optimizer.lr == 6e-5 and cfg.uda.head_lr_mult == 10
    assert cfg.uda.optimizer.weight_decay == 0.01 and cfg.uda.scheduler.warmup_steps == 1500
    assert cfg.uda.pseudo_threshold == 0.968 and cfg.uda.ema_alpha == 0.999
    assert cfg.uda.mic.mask_ratio == 0.7 and cfg.uda.mic.block_size == 64
    assert cfg.uda.feature_distance.weight == 0.005
    p = cfg.prototype
    assert p.prototypes._target_.endswith("GaussianPrototypes")
    assert (p.K, cfg.model.proto_head.proto_dim, p.temperature) == (5, 256, 0.1)
    assert (p.lambda_contrast, p.lambda_consistency, p.lambda_d) == (0.1, 0.1, 0.1)
    assert p.feature_bank_size == 20000 and cfg.model.hr_loss_weight == 0.1
    assert cfg.benchmark.resolution == "multi"  # the data sizes follow the HRDA model
    expected = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    assert cfg.trainer.precision == expected  # bf16 autocast on GPU, fp32 on CPU
    assert (
        compose_train(["experiment=mic_gaussian", "trainer=gpu"], tmp_path).trainer.precision
        == "bf16-mixed"
    )


@pytest.mark.parametrize("experiment", ["vfm_gaussian", "synthetic_vfm_gaussian"])
def test_vfm_settings(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    # The heads' in_channels are the encoder's pyramid (structure only: the meta device).
    with torch.device("meta"):
        encoder = instantiate(cfg.model.encoder, pretrained=None)
    assert list(encoder.out_channels) == list(cfg.model.decode_head.in_channels)
    assert encoder.strides == (4, 8, 16, 32)
    assert cfg.uda.feature_distance is None and cfg.uda.mic.mask_ratio == 0.7
    assert cfg.prototype.prototypes._target_.endswith("GaussianPrototypes")
    if experiment == "vfm_gaussian":  # VFM-UDA's recipe (sources in the experiment file)
        assert cfg.model.encoder.name == "vit_large_patch14_dinov2"
        assert cfg.model.encoder.pretrained.endswith("/dinov2_vitl14_pretrain.pth")
        assert cfg.benchmark.crop_size == 512 and cfg.data.batch_size == 8
        assert cfg.uda.optimizer.lr == 1.41e-05 and cfg.uda.head_lr_mult == 10
        assert cfg.uda.layer_decay == 0.9 and cfg.uda.mic.block_size == 14
        assert cfg.trainer.max_steps == 40000
    else:  # trained from scratch on the CPU: no layer decay, patch-sized mask blocks
        assert cfg.uda.layer_decay is None and cfg.uda.mic.block_size == 8 == encoder.patch_size


@pytest.mark.slow
def test_prototypes_initialise_and_losses_turn_on(cache_dir, tmp_path):
    cfg = compose_train(
        [
            f"paths.cache_dir={cache_dir}",
            *tiny_synthetic(),
            "trainer.max_steps=15",
            "trainer.val_check_interval=15",
            "callbacks.model_checkpoint.every_n_train_steps=15",
            "callbacks.debug_images.every_n_steps=15",
            "logger=wandb",
        ],
        tmp_path,
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    import wandb

    wandb.finish()
    assert bool(module.prototype.prototypes.initialized.any())
    metrics = trainer.callback_metrics
    assert float(metrics["train/loss_contrast"]) > 0
    assert "val/mIoU_prototype" in metrics  # the prototype-based output is evaluated
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    # Figures (paper Figs. 7, 8) as PNGs, and an offline W&B run that `wandb sync` can upload.
    for name in ("predictions", "tsne", "activation_maps"):
        assert (tmp_path / "figures" / f"{name}_step000015.png").is_file(), name
    # The debug grid of step 15 with the prototype activation maps (DAFormer runs write it
    # every 1000 steps: this path once crashed every run that reached step 1000).
    assert (tmp_path / "debug" / "step_000015_prototype_maps.png").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_resume_is_exact(cache_dir, tmp_path):
    """Resuming from the step-1 or the step-3 checkpoint reaches step 6 with the uninterrupted
    run's step, learning rate, teacher, student and prototypes (from step 1, Lightning
    restarts the sample iterator: the sampler must replay the same stream)."""
    common = [
        f"paths.cache_dir={cache_dir}",
        *tiny_synthetic(),
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "evaluate=false",
        "uda.scheduler.warmup_steps=4",
    ]

    def run(out: Path, ckpt: Path | None = None):
        extra = [f"ckpt_path={ckpt}"] if ckpt else []
        cfg = compose_train([*common, *extra], out)
        datamodule, module, trainer = build(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        return module, trainer

    full, full_trainer = run(tmp_path / "full")
    lr = [g["lr"] for g in full_trainer.optimizers[0].param_groups]
    for step in (1, 3):
        mid = tmp_path / "full" / "checkpoints" / f"step_{step:06d}.ckpt"
        assert mid.is_file()
        resumed, resumed_trainer = run(tmp_path / f"resumed_{step}", mid)
        assert resumed_trainer.global_step == full_trainer.global_step == 6
        assert [g["lr"] for g in resumed_trainer.optimizers[0].param_groups] == lr
        state = zip(full.state_dict().items(), resumed.state_dict().values(), strict=True)
        for (name, a), b in state:
            torch.testing.assert_close(a, b, msg=f"{name} differs after resume from {step}")


@pytest.mark.slow
def test_multirun_sweeps_two_values(cache_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "mpcl.train", "-m", "prototype.K=1,2", "debug=fdr",
        f"paths.log_dir={tmp_path}", *tiny_synthetic(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_env(cache_dir), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LeafSpec" not in proc.stderr  # Lightning's own deprecation warning, filtered
    jobs = sorted(tmp_path.glob("train/multiruns/*/*/.hydra/overrides.yaml"))
    assert len(jobs) == 2
    assert ["prototype.K=1" in j.read_text() for j in jobs] == [True, False]


def test_hparams_search_sweeps_k_and_lambda(tmp_path):
    cfg = compose_train(["hparams_search=prototype_k"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert params["prototype.K"] == "1,3,5" and "prototype.lambda_contrast" in params
    assert cfg.hydra.mode == RunMode.MULTIRUN


@pytest.mark.slow
def test_real_benchmark_batches_have_the_configured_crops_and_sizes(fake_data_dir, tmp_path):
    cfg = compose_train(full_size_overrides("daformer_gaussian", fake_data_dir), tmp_path)
    datamodule, _, _ = build(cfg)
    datamodule.trainer = None
    datamodule.num_train_samples = 4
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["source_image"].shape == (2, 3, 64, 64)
    assert batch["source_label"].shape == (2, 64, 64)
    assert batch["target_image"].shape == (2, 3, 64, 64)
    assert "target_label" not in batch  # UDA never loads target train labels
    labels = torch.unique(batch["source_label"])
    assert bool(((labels < 19) | (labels == 255)).all())
    val = datamodule.target_val[0]
    assert val["image"].shape[-2:] == val["label"].shape == (24, 32)  # full label resolution


@pytest.mark.slow
def test_source_only_start_is_built_once_and_starts_the_student(cache_dir, tmp_path):
    """``init_from=source_only``: the source-only model is trained once, cached, and the UDA
    student (and its teacher) start from its weights; a later run reuses the file."""
    from faults import TINY_MODEL

    import mpcl.run.build as build_module
    from mpcl.train import source_only_start

    starts = tmp_path / "cache"
    starts.mkdir()
    for f in cache_dir.iterdir():  # the shared benchmark data, a private starts/ folder
        (starts / f.name).symlink_to(f)
    overrides = [
        f"paths.cache_dir={starts}",
        *tiny_synthetic(),
        *TINY_MODEL,
        "init_from=source_only",
        "pretrain.steps=3",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.figures=null",
    ]
    cfg = compose_train(overrides, tmp_path / "run")
    path = source_only_start(cfg)
    assert path.is_file() and path.parent == starts / "starts"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert not any("proto_head" in k for k in state["state_dict"])  # source-only: no head
    mtime = path.stat().st_mtime_ns
    assert source_only_start(cfg) == path and path.stat().st_mtime_ns == mtime  # cached
    other_seed = compose_train([*overrides, "seed=5"], tmp_path / "run5")
    assert source_only_start(other_seed) == path  # one start for every run seed (ImageNet-like)
    cfg = compose_train(overrides, tmp_path / "run")
    module = build_module.build_module(cfg, str(path))
    for key, value in state["state_dict"].items():
        if key.startswith("student."):
            assert torch.equal(module.state_dict()[key], value), key
            teacher = "teacher.model." + key.removeprefix("student.")
            assert torch.equal(module.state_dict()[teacher], value), teacher
    metrics = train(cfg)  # the whole run, from the cached start
    assert "val/mIoU" in metrics and path.stat().st_mtime_ns == mtime


def test_init_from_a_missing_file_is_one_line(tmp_path):
    from mpcl.errors import ConfigError
    from mpcl.run.build import build_module

    cfg = compose_train(["prototype=none", "model.encoder.depths=[1,1,1,1]"], tmp_path)
    with pytest.raises(ConfigError, match=r"init_from=.*nope.ckpt does not exist"):
        build_module(cfg, str(tmp_path / "nope.ckpt"))
