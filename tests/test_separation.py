"""benchmarks/separation.py: the encoder's class separation against a direct float64
computation, and its paired summary against scipy."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from conftest import compose_train, tiny_synthetic
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader

from mpcl.run.build import build_module, build_target

_path = Path(__file__).parents[1] / "benchmarks" / "separation.py"
_spec = importlib.util.spec_from_file_location("separation", _path)
separation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(separation)


def _fisher(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """trace(S_B) / trace(S_W) of (N, D) float64 features, by class means (brute force)."""
    keep = labels < num_classes
    x, y = features[keep], labels[keep]
    overall = x.mean(0)
    between = within = 0.0
    for c in np.unique(y):
        xc = x[y == c]
        between += len(xc) * ((xc.mean(0) - overall) ** 2).sum()
        within += ((xc - xc.mean(0)) ** 2).sum()
    return between / within


def test_encoder_separation_matches_a_direct_computation(cache_dir, tmp_path):
    cfg = compose_train([f"paths.cache_dir={cache_dir}", *tiny_synthetic()], tmp_path / "out")
    with open_dict(cfg):
        del cfg["hydra"]
    torch.manual_seed(0)
    module = build_module(cfg)
    run = tmp_path / "run_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    torch.save({"state_dict": module.state_dict()}, run / "checkpoints" / "last.ckpt")

    got = separation.encoder_separation(run)
    assert len(got) == 4 and json.loads((run / separation.CACHE).read_text()) == got

    module.eval()
    stage = {i: ([], []) for i in range(4)}
    with torch.no_grad():
        for batch in DataLoader(build_target(cfg), batch_size=3):
            feats = module.student.forward(batch["image"], with_features=False)["encoder_features"]
            for i, f in enumerate(feats):
                lab = F.interpolate(batch["label"][:, None].float(), f.shape[-2:], mode="nearest")
                stage[i][0].append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double().numpy())
                stage[i][1].append(lab.long().reshape(-1).numpy())
    for i in range(4):
        want = _fisher(np.concatenate(stage[i][0]), np.concatenate(stage[i][1]), 19)
        assert math.isclose(got[i], want, rel_tol=1e-9), (i, got[i], want)


def test_summary_pairs_by_seed_against_scipy(tmp_path):
    from scipy import stats

    control = {0: [0.5, 0.6, 0.7, 2.5], 1: [0.52, 0.61, 0.72, 2.4], 2: [0.51, 0.66, 0.7, 2.7]}
    mpcl = {0: [0.5, 0.62, 0.64, 2.3], 1: [0.53, 0.6, 0.69, 2.5], 2: [0.5, 0.65, 0.61, 2.6]}
    for row, runs in (("control", control), ("mpcl", mpcl)):
        for seed, values in runs.items():
            run = tmp_path / f"{row}_{seed}"
            (run / "checkpoints").mkdir(parents=True)
            (run / "checkpoints" / "last.ckpt").touch()
            (run / separation.CACHE).write_text(json.dumps(values))
    lines = separation.summarise(tmp_path, ["control", "mpcl"], [0, 1, 2, 3], "control")
    assert len(lines) == 2 + 8
    stage3 = lines[2 + 4 + 2]
    d = [mpcl[s][2] - control[s][2] for s in range(3)]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(d), scale=stats.sem(d))
    assert stage3.startswith("| mpcl | 3 | 0,1,2 | 0.647 ± 0.040 | -0.060 (n=3) |")
    assert f"[{low:+.3f}, {high:+.3f}]" in stage3
    assert (
        f"| {stats.ttest_rel([mpcl[s][2] for s in range(3)], [control[s][2] for s in range(3)]).pvalue:.3f} |"
        in stage3
    )
