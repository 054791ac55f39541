"""Transforms, the albumentations worker-seeding workaround, and the UDA data module."""

from __future__ import annotations

from types import SimpleNamespace

import albumentations as A
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mpcl.data import synthetic
from mpcl.data.base import SegmentationDataset, make_item
from mpcl.data.datamodule import PairSampler, UDADataModule
from mpcl.data.labels import IGNORE_INDEX
from mpcl.data.transforms import (
    PAD_FILL,
    reseed_transforms,
    seed_worker,
    train_transform,
    val_transform,
)

TINY = dict(image_size=(64, 128), num_source_train=6, num_target_train=5, num_target_val=2)


def _max_ratio(mask: np.ndarray) -> float:
    counts = np.bincount(mask.ravel(), minlength=256)[:IGNORE_INDEX]
    return counts.max() / max(1, counts.sum())


def test_train_transform_crop_shape_and_dtypes():
    t = train_transform((32, 48), resize=(60, 100), scale=(0.5, 2.0))
    image = np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8)
    mask = np.zeros((90, 160), np.uint8)
    for _ in range(5):
        out = t(image=image, mask=mask)
        assert out["image"].shape == (32, 48, 3) and out["image"].dtype == np.uint8
        assert out["mask"].shape == (32, 48) and out["mask"].dtype == np.uint8


def test_padding_fills_ignore():
    t = train_transform(64, scale=(1.0, 1.0), hflip=0.0)
    image = np.full((40, 50, 3), 200, np.uint8)
    mask = np.full((40, 50), 3, np.uint8)
    out = t(image=image, mask=mask)
    assert out["mask"].shape == (64, 64)
    # mmseg pads the normalised image with 0 (= the ImageNet mean colour), the label with
    # ignore, at the bottom/right.
    assert (out["mask"][:40, :50] == 3).all() and (out["mask"][40:] == IGNORE_INDEX).all()
    assert (out["mask"][:, 50:] == IGNORE_INDEX).all()
    assert (out["image"][40:] == np.array(PAD_FILL, np.uint8)).all()


def test_valid_mask_marks_padding_and_frame_borders():
    """The target's ``valid`` mask is False on padding and on the pseudo-label margins,
    which are set on the resized frame before cropping (HRDA's valid_pseudo_mask)."""
    t = train_transform(
        64, resize=(40, 64), scale=(1.0, 1.0), hflip=0.0, ignore_border=(2, 5, 3, 0)
    )
    image = np.full((20, 40, 3), 100, np.uint8)
    item = make_item(image, None, "x", t)
    valid = item["valid"].numpy()
    assert valid.shape == (64, 64) and "label" not in item
    assert not valid[40:].any()  # padding rows
    assert not valid[:2].any() and not valid[35:40].any()  # top 2, bottom 5 of the 40-row frame
    assert not valid[:, :3].any() and valid[2:35, 3:].all()  # left 3 columns


def test_cat_max_ratio_recrops():
    mask = np.zeros((128, 256), np.uint8)
    mask[:, :85] = 1  # one boundary: most 64x64 crops hold a single class
    image = np.zeros((128, 256, 3), np.uint8)
    ratios = {}
    for cmr in (1.0, 0.75):
        t = train_transform(64, scale=(1.0, 1.0), hflip=0.0, cat_max_ratio=cmr)
        reseed_transforms(t, 0)
        ratios[cmr] = np.array([_max_ratio(t(image=image, mask=mask)["mask"]) for _ in range(40)])
    # A single draw satisfies the bound with p ~ 0.17; ten draws with p ~ 0.84.
    assert (ratios[1.0] < 0.75).mean() < 0.4
    assert (ratios[0.75] < 0.75).mean() > 0.6


def test_val_transform_resizes_labels_nearest():
    mask = np.random.default_rng(0).integers(0, 19, (64, 128), dtype=np.uint8)
    image = np.zeros((64, 128, 3), np.uint8)
    out = val_transform((32, 96))(image=image, mask=mask)
    assert out["image"].shape == (32, 96, 3) and out["mask"].shape == (32, 96)
    assert set(np.unique(out["mask"])) <= set(np.unique(mask))
    assert val_transform()(image=image, mask=mask)["mask"].shape == (64, 128)


class _CropOrigin(Dataset):
    """Every item crops the same coordinate image; returns the crop's (row, col) origin."""

    def __init__(self):
        rows, cols = np.indices((64, 64))
        self.image = np.stack([rows, cols, rows * 0], axis=-1).astype(np.uint8)
        self.transform = A.Compose([A.RandomCrop(8, 8)])  # seed=None: fresh entropy, as users do

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        crop = self.transform(image=self.image)["image"]
        return torch.tensor([int(crop[0, 0, 0]), int(crop[0, 0, 1])])


def _origins(worker_init_fn) -> list[tuple[int, int]]:
    # Worker 0 loads items 0 and 2, worker 1 loads items 1 and 3.
    loader = DataLoader(
        _CropOrigin(),
        batch_size=None,
        num_workers=2,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(0),
    )
    return [tuple(x.tolist()) for x in loader]


def test_seed_worker_gives_workers_different_crops():
    without = _origins(None)
    # albumentations 2.0.8: both forked workers carry the same Compose state -> same crops.
    assert without[0] == without[1] and without[2] == without[3]
    fixed = _origins(seed_worker)
    assert fixed[0] != fixed[1] or fixed[2] != fixed[3]
    assert fixed == _origins(seed_worker)  # and reproducible from the loader's generator


class _Wrapper(Dataset):
    def __init__(self, parts):
        self.parts = parts


def test_reseed_gives_each_compose_its_own_stream():
    a, b = train_transform(16, hflip=0.0), train_transform(16, hflip=0.0)
    reseed_transforms(_Wrapper([a, b]), 123)  # e.g. a source and a target pipeline
    image, mask = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)
    mask[np.arange(64), np.arange(64)] = 1  # asymmetric content: crops are distinguishable
    image[..., 0] = np.arange(64)[:, None]
    image[..., 1] = np.arange(64)[None, :]
    ca = [a(image=image, mask=mask)["image"][0, 0, :2].tolist() for _ in range(4)]
    cb = [b(image=image, mask=mask)["image"][0, 0, :2].tolist() for _ in range(4)]
    assert ca != cb


def test_pair_sampler_shuffles_independently():
    sampler = PairSampler(5, 3, 30, torch.Generator().manual_seed(0))
    pairs = list(sampler)
    assert len(pairs) == len(sampler) == 30
    src, tgt = [p[0] for p in pairs], [p[1] for p in pairs]
    assert sorted(src[:5]) == list(range(5)) and sorted(tgt[:3]) == list(range(3))  # permutations
    assert src[:15] != src[15:30]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    source = synthetic.synthetic_dataset(
        cache, "source", "train", transform=train_transform((32, 64), cat_max_ratio=0.75), **TINY
    )
    target = synthetic.synthetic_dataset(
        cache, "real", "train", transform=train_transform(48), **TINY
    )
    val = synthetic.synthetic_dataset(cache, "real", "val", transform=val_transform(), **TINY)
    return source, target, val


def test_datamodule_batches(datasets):
    source, target, val = datasets
    dm = UDADataModule(source, target, val, batch_size=2, num_workers=0, num_train_samples=6)
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batch = next(iter(loader))
    assert set(batch) == {
        "source_image",
        "source_label",
        "target_image",
        "target_label",
        "target_valid",
    }
    assert (
        batch["source_image"].shape == (2, 3, 32, 64)
        and batch["source_image"].dtype == torch.float32
    )
    assert batch["source_label"].shape == (2, 32, 64) and batch["source_label"].dtype == torch.int64
    assert batch["target_image"].shape == (2, 3, 48, 48)
    assert batch["target_label"].shape == (2, 48, 48) and batch["target_label"].dtype == torch.int64
    vbatch = next(iter(dm.val_dataloader()))
    assert vbatch["image"].shape == (1, 3, 64, 128) and vbatch["label"].dtype == torch.int64
    assert vbatch["name"] == ["00000"]
    assert len(dm.val_dataloader()) == len(dm.test_dataloader()) == 2


def test_datamodule_reproducible_and_sized_by_trainer(datasets):
    source, target, val = datasets
    dm = UDADataModule(source, target, val, batch_size=2, num_workers=0)

    def first_batch():
        torch.manual_seed(7)  # what seed_everything does
        return next(iter(dm.train_dataloader()))

    a, b = first_batch(), first_batch()
    assert all(torch.equal(a[k], b[k]) for k in a)
    dm.trainer = SimpleNamespace(
        max_steps=10, accumulate_grad_batches=2, world_size=1, global_step=0
    )
    assert len(dm.train_dataloader()) == 20  # max_steps x accumulation batches


def test_resumed_stream_equals_the_uninterrupted_one(datasets):
    """After 3 optimiser steps, a fresh loader yields exactly the batches the uninterrupted
    loader yields from step 3 on: same pairs, same crops and flips."""
    source, target, val = datasets
    dm = UDADataModule(source, target, val, batch_size=2, num_workers=0)
    dm.trainer = SimpleNamespace(
        max_steps=6, accumulate_grad_batches=1, world_size=1, global_step=0
    )
    full = list(dm.train_dataloader())
    dm.trainer.global_step = 3
    resumed = list(dm.train_dataloader())
    assert len(full) == 6 and len(resumed) == 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_pair_sampler_start_skips_the_stream_prefix():
    full = list(PairSampler(5, 3, 12, torch.Generator().manual_seed(0)))
    tail = list(PairSampler(5, 3, 12, torch.Generator().manual_seed(0), start=7))
    assert tail == full[7:]
    assert [k for *_, k in full] == list(range(12))


def test_pair_sampler_replays_its_epoch_and_moves_on_with_the_next():
    """A second iterator of the same epoch gives the same pairs (Lightning may restart the
    iterator when it resumes: with a continuing generator the resumed run once trained on
    other pairs); set_epoch gives new pairs and sample ids."""
    sampler = PairSampler(5, 3, 12, torch.Generator().manual_seed(0), start=4)
    first, again = list(sampler), list(sampler)
    assert first == again
    sampler.set_epoch(1)
    second_epoch = list(sampler)
    assert [p[:2] for p in second_epoch] != [p[:2] for p in first]
    assert [k for *_, k in second_epoch] == list(range(16, 24))


def test_datamodule_unlabelled_target_and_workers(datasets):
    source, target, val = datasets
    unlabelled = SegmentationDataset(target.images, None, transform=train_transform(48))
    dm = UDADataModule(source, unlabelled, val, batch_size=2, num_workers=2, num_train_samples=4)
    batch = next(iter(dm.train_dataloader()))
    assert "target_label" not in batch
    assert batch["target_image"].shape == (2, 3, 48, 48)


def test_lightning_fit_runs_for_max_steps(datasets):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 19, 1)
            self.val_batches = 0

        def training_step(self, batch, batch_idx):
            logits = self.head(batch["source_image"])
            return torch.nn.functional.cross_entropy(
                logits, batch["source_label"], ignore_index=255
            )

        def validation_step(self, batch, batch_idx):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    source, target, val = datasets
    dm = UDADataModule(source, target, val, batch_size=2, num_workers=0)
    model = Tiny()
    trainer = L.Trainer(
        max_steps=5,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 5 and trainer.num_training_batches == 5
    assert model.val_batches == 2 * len(val)  # validated at steps 2 and 4
