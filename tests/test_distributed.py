"""trainer=ddp_sim (2 CPU processes, gloo): N ranks train like one process on the union batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train, subprocess_env, tiny_synthetic
from hydra_targets import initial_prototypes

from mpcl.data.datamodule import PairSampler, ShardSampler
from mpcl.io import file_lock
from mpcl.run.build import build
from mpcl.run.checkpoint import AtomicCheckpointIO
from mpcl.run.launch import check_launch
from mpcl.run.sync_batchnorm import SyncBatchNormAnyDevice

TESTS = Path(__file__).parent


def test_rank_shards_are_the_single_stream():
    """Rank r of N takes samples k % N == r of ONE stream: per step, the N rank batches are
    the single process's batch of N x batch_size (also when resuming mid-stream)."""

    def stream(rank: int, world: int, start: int) -> list:
        gen = torch.Generator().manual_seed(3)
        return list(PairSampler(5, 7, 24, gen, start=start, rank=rank, world_size=world))

    for start in (0, 6):
        single = stream(0, 1, start)
        ranks = [stream(r, 3, start) for r in range(3)]
        lengths = [len(PairSampler(5, 7, 24, None, rank=r, world_size=3)) for r in range(3)]
        assert lengths == [8, 8, 8]  # the whole epoch's share, also when resuming
        assert sum(len(s) for s in ranks) == len(single) == 24 - start
        batch = 2  # per rank; the single process takes 3 x 2 per step
        for step in range(len(single) // (3 * batch)):
            union = sorted(x for r in ranks for x in r[step * batch : (step + 1) * batch])
            assert union == sorted(single[step * 3 * batch : (step + 1) * 3 * batch])
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))  # every val image once, none repeated


def test_multirun_with_lightning_ddp_is_refused(tmp_path):
    cfg = compose_train(["trainer=ddp_sim", "hydra.mode=MULTIRUN"], tmp_path)
    with pytest.raises(ValueError, match="submitit_slurm"):
        check_launch(cfg)
    check_launch(compose_train(["trainer=cpu", "hydra.mode=MULTIRUN"], tmp_path))


def test_the_trainer_keeps_the_configs_plugins(cache_dir, tmp_path):
    """build() adds its checkpoint IO to trainer.plugins; it once replaced them, and
    trainer=ddp_sim silently lost its BatchNorm sync (ranks then normalised per rank)."""
    overrides = [*tiny_synthetic(), "trainer=ddp_sim", f"paths.cache_dir={cache_dir}"]
    cfg = compose_train(overrides, tmp_path)
    _, _, trainer = build(cfg)
    assert isinstance(trainer.strategy._layer_sync, SyncBatchNormAnyDevice)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # Each rank's feature bank is its own (bank_mode=queue): no broadcast of rank 0's buffers.
    assert trainer.strategy._ddp_kwargs["broadcast_buffers"] is False


@pytest.mark.parametrize("world", [2, 3])
def test_random_choices_of_ranks_are_the_union_batchs(world, monkeypatch):
    """ClassMix classes, jitter/blur parameters and MIC blocks: rank r's draws are rows
    r x B ... of one process's draws for the union batch (same seeded generator)."""
    import mpcl.distributed as distributed
    from mpcl.uda.masking import block_mask
    from mpcl.uda.mixing import StrongAugment, class_mix_mask

    labels = torch.randint(0, 19, (world * 2, 32, 32), generator=torch.Generator().manual_seed(0))

    def draws(labels: torch.Tensor) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(7)  # seeded alike in every process
        batch = labels.shape[0]
        return [
            class_mix_mask(labels, 19, generator=gen),
            StrongAugment().sample(batch, generator=gen)["factors"],
            block_mask(torch.zeros(batch, 3, 32, 32), 8, 0.5, generator=gen),
        ]

    single = draws(labels)  # one process, batch 2 x world
    per_rank = []
    for rank in range(world):  # rank r holds images 2r, 2r + 1 of the union batch
        monkeypatch.setattr(distributed, "_world", lambda r=rank: (world, r))
        per_rank.append(draws(labels[2 * rank : 2 * rank + 2]))
    for k, union in enumerate(single):
        torch.testing.assert_close(torch.cat([r[k] for r in per_rank]), union, rtol=0, atol=0)
    assert not torch.equal(per_rank[0][1], per_rank[1][1])  # ranks do not repeat each other


def _train(out: Path, cache_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "mpcl.train", f"hydra.run.dir={out}", f"paths.cache_dir={cache_dir}",
        *tiny_synthetic(), *overrides,
    ]  # fmt: skip
    env = subprocess_env(cache_dir)
    env["PYTHONPATH"] = f"{TESTS}:{env.get('PYTHONPATH', '')}"
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ddp_sim_equals_one_process_on_the_union_batch(cache_dir, tmp_path):
    """2 ranks x batch 1 == 1 process x batch 2: weights, BatchNorm statistics, prototypes.

    DACS + Gaussian MPCL: ClassMix, colour jitter, blur and the quality weight are drawn or
    reduced over the union batch (``rank_rand``, ``mean_over_ranks``); dropout / drop-path off
    (their masks are drawn per rank), no rescale padding, prototypes initialised from a seed.
    What is left is the float rounding of the all-reduces, amplified by AdamW. Tolerance:
    atol 5e-5 + rtol 1e-4 on every tensor of the state dict after 3 steps (measured largest
    difference: 2.2e-5; without synchronised BatchNorm the BN running variance alone is 0.25
    off; with per-rank random choices 1.0; with a per-rank quality weight 1e-4 in the head). MIC's masks are checked in
    ``test_random_choices_of_ranks_are_the_union_batchs``: its blanked blocks, whole 64 px
    crops at this size, make the features chaotic (1e-5 in the weights moves a blank image's
    head activations by 30%), so no end-to-end tolerance would mean anything there.
    """
    common = [
        "uda=dacs",  # ClassMix, colour jitter, blur, quality weight: random per image
        "uda.pseudo_threshold=0.06",  # untrained teacher: max prob 0.05-0.07, quality ~0.35
        "prototype=gaussian",
        "prototype.K=2",
        "prototype.momentum=0.5",  # large prototype updates: a wrong update would show
        "model.decode_head.dropout=0",
        "model.encoder.drop_path_rate=0",
        "benchmark.scale=[1.0,1.0]",  # no padding: every pixel is labelled on both ranks
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.figures=null",
        "+callbacks.init_prototypes._target_=hydra_targets.InitAllPrototypes",
    ]
    ddp = _train(tmp_path / "ddp", cache_dir, [*common, "trainer=ddp_sim", "data.batch_size=1"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("target val IoU") == 1  # the report: rank 0 only
    single = _train(tmp_path / "one", cache_dir, [*common, "data.batch_size=2"])
    assert single.returncode == 0, single.stderr[-3000:]

    def state(run: str) -> dict:
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 3
        return ckpt["state_dict"]

    a, b = state("ddp"), state("one")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)
    bn = [n for n in a if n.endswith("running_var")]
    assert bn and any(not torch.allclose(a[n], torch.ones_like(a[n])) for n in bn)
    mean = next(n for n in a if n.endswith("prototypes.mean"))
    start, _ = initial_prototypes(*a[mean].shape)
    assert (a[mean] - start).abs().max() > 1e-2  # the prototypes were updated, and agree


def _hold_lock(path: str, ready, log: str) -> None:
    import time

    with file_lock(path):
        ready.set()
        time.sleep(0.5)
        Path(log).write_text("builder done\n")


def test_file_lock_makes_the_second_process_wait(tmp_path):
    """While one process builds a cache under the lock, another waits and sees it finished."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    ready, log = ctx.Event(), tmp_path / "log.txt"
    builder = ctx.Process(target=_hold_lock, args=(str(tmp_path / ".lock"), ready, str(log)))
    builder.start()
    assert ready.wait(10)
    with file_lock(tmp_path / ".lock"):
        assert log.read_text() == "builder done\n"  # not before the builder released it
    builder.join(10)
    assert builder.exitcode == 0
