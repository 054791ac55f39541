"""benchmarks/ablation.py: its paired tests against closed forms, and its summary table."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

_path = Path(__file__).parents[1] / "benchmarks" / "ablation.py"
_spec = importlib.util.spec_from_file_location("ablation", _path)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 12.0])
def test_t_test_p_value_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has P(|T| >= t) = 1 - t / sqrt(2 + t^2).
    assert ablation._t_sf_two_sided(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t))
    assert ablation._t_sf_two_sided(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # df = 3: 1 - 2/pi (atan(u) + u / (1 + u^2)), u = t / sqrt(3).
    u = t / math.sqrt(3)
    expected = 1 - 2 / math.pi * (math.atan(u) + u / (1 + u * u))
    assert ablation._t_sf_two_sided(t, 3) == pytest.approx(expected)


def test_paired_tests_by_hand():
    a, b = [22.0, 21.0, 23.5], [21.0, 21.5, 22.0]  # differences 1.0, -0.5, 1.5
    d = [1.0, -0.5, 1.5]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - 2 / 3) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    assert ablation.paired_t_test(a, b) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # Sign flips of (1, -0.5, 1.5): |sums| 2, 3, 0, 1, 1, 0, 3, 2 -> 4 of 8 reach 2.
    assert ablation.sign_flip_test(a, b) == pytest.approx(0.5)
    assert ablation.sign_flip_test([2, 3, 4], [1, 1, 1]) == pytest.approx(0.25)  # 2 / 2^3


def _fake_run(root: Path, name: str, seed: int, miou: float) -> None:
    run = root / f"{name}_{seed}" / "csv"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(f"step,val/mIoU\n9,\n599,{miou}\n")


def test_summary_pairs_by_seed(tmp_path):
    for seed, (base, queue) in enumerate([(20.0, 21.0), (22.0, 22.5), (21.0, 23.0)]):
        _fake_run(tmp_path, "baseline", seed, base)
        _fake_run(tmp_path, "queue", seed, queue)
    _fake_run(tmp_path, "early", 0, 19.0)  # one seed: no paired test
    lines = ablation.summarise(tmp_path, ["baseline", "queue", "early"], [0, 1, 2], "baseline")
    assert lines[2].startswith("| baseline | Table VI | 0,1,2 | 20.00, 22.00, 21.00 | 21.00 ± 1.00")
    queue = lines[3]
    assert "21.00, 22.50, 23.00" in queue and "+1.17 ± 0.76 (n=3)" in queue
    expected = ablation.paired_t_test([21.0, 22.5, 23.0], [20.0, 22.0, 21.0])
    assert f"| {expected:.3f} | 0.250 |" in queue
    assert lines[4].startswith("| early | item 2 | 0 | 19.00 | 19.00 | - | - | - |")


def test_summary_of_another_metric(tmp_path):
    for seed, (base, mpcl) in enumerate([(0.5, 0.62), (0.52, 0.7)]):
        for name, value in (("study_control", base), ("study_mpcl", mpcl)):
            run = tmp_path / f"{name}_{seed}" / "csv"
            run.mkdir(parents=True)
            (run / "metrics.csv").write_text(f"step,val/class_separation\n9,0.1\n1999,{value}\n")
    lines = ablation.summarise(
        tmp_path, ["study_control", "study_mpcl"], [0, 1], "study_control",
        metric="val/class_separation",
    )  # fmt: skip
    assert "| val/class_separation mean ± std |" in lines[0]
    assert lines[3].startswith("| study_mpcl | issue 21 | 0,1 | 0.620, 0.700 | 0.660 ± 0.057 |")
    assert "+0.150 ± 0.042 (n=2)" in lines[3]


def test_every_row_names_known_overrides():
    for name, (_, overrides) in ablation.LADDER.items():
        assert overrides and all("=" in o for o in overrides), name


def test_csv_lists_each_finished_run(tmp_path):
    _fake_run(tmp_path, "baseline", 0, 20.5)
    _fake_run(tmp_path, "queue", 1, 21.25)
    out = tmp_path / "runs.csv"
    assert ablation.write_csv(tmp_path, ["baseline", "queue"], [0, 1], out) == 2
    lines = out.read_text().splitlines()
    assert lines[0] == "row,group,seed,miou,miou_prototype,overrides"
    assert lines[1] == "baseline,Table VI,0,20.5000,,experiment=synthetic_baseline"
    assert lines[2].startswith("queue,item 1,1,21.2500,,experiment=synthetic_gaussian ")


def test_paired_confidence_interval_matches_scipy():
    from scipy import stats

    for df in (1, 4, 9, 30):
        assert math.isclose(ablation.t_quantile(0.05, df), stats.t.ppf(0.975, df), rel_tol=1e-6)
    a = [21.3, 20.8, 22.1, 21.0, 21.7, 20.9, 21.4, 21.8, 21.1, 20.6]
    b = [21.0, 20.9, 21.5, 20.7, 21.6, 20.2, 21.3, 21.1, 21.2, 20.5]
    d = [x - y for x, y in zip(a, b, strict=True)]
    low, high = stats.t.interval(0.95, len(d) - 1, loc=statistics.mean(d), scale=stats.sem(d))
    got = ablation.paired_ci(a, b)
    assert math.isclose(got[0], low, rel_tol=1e-6) and math.isclose(got[1], high, rel_tol=1e-6)
