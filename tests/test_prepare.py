"""``python -m mpcl.prepare``: trainId PNGs, RCS statistics, reruns, interrupts and errors."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from fake_trees import (
    cityscapes_train_ids,
    labels_by_name,
    make_acdc,
    make_cityscapes,
    make_darkzurich,
    make_gta,
    make_synthia,
    synthia_train_ids,
)

from mpcl.data.datasets import acdc, cityscapes, darkzurich, gta, read_id_label, synthia
from mpcl.data.rcs import SAMPLE_CLASS_STATS, SAMPLES_WITH_CLASS, compute_class_stats, load_stats
from mpcl.prepare import main, prepare


def run_cli(*arg_lists: list[str]) -> list[subprocess.CompletedProcess]:
    """Run ``python -m mpcl.prepare`` once per argument list, concurrently (each start-up
    imports torch, which takes seconds)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mpcl.prepare", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in arg_lists
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def assert_prepared_equals_on_the_fly(factory, root, **kwargs) -> None:
    fast = factory(root, prepared=True, **kwargs)
    slow = factory(root, prepared=False, **kwargs)
    assert all(p.name.endswith("_labelTrainIds.png") for p in fast.labels)
    assert fast.label_map is None  # no mapping at load time
    a, b = labels_by_name(fast), labels_by_name(slow)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_gta_trainids_and_stats(tmp_path):
    raw = make_gta(tmp_path, n=4, mismatch=True)
    report = prepare("gta", tmp_path)
    assert report.converted == 4 and report.stats_dir == tmp_path
    for name, ids in raw.items():
        out = read_id_label(tmp_path / "labels" / f"{name}_labelTrainIds.png")
        np.testing.assert_array_equal(out, cityscapes_train_ids(ids))  # label's own size
    assert_prepared_equals_on_the_fly(gta, tmp_path)
    stats = load_stats(tmp_path)
    assert stats == compute_class_stats(gta(tmp_path, prepared=False))
    for s in stats[0]:
        direct = np.bincount(cityscapes_train_ids(raw[s["name"]]).ravel(), minlength=256)
        assert s["counts"] == {c: int(n) for c, n in enumerate(direct[:19]) if n}


def test_synthia_trainids(tmp_path):
    raw = make_synthia(tmp_path)
    prepare("synthia", tmp_path)
    for name, ids in raw.items():
        out = read_id_label(tmp_path / "GT" / "LABELS" / f"{name}_labelTrainIds.png")
        np.testing.assert_array_equal(out, synthia_train_ids(ids))
    assert_prepared_equals_on_the_fly(synthia, tmp_path)
    assert (tmp_path / SAMPLE_CLASS_STATS).is_file()


def test_cityscapes_trainids_and_train_only_stats(tmp_path):
    raw = make_cityscapes(tmp_path)
    report = prepare("cityscapes", tmp_path, workers=2)  # through the process pool
    assert report.converted == 8  # train + val; test has no labels
    for split in ("train", "val"):
        assert_prepared_equals_on_the_fly(cityscapes, tmp_path, split=split)
    for lab in (tmp_path / "gtFine" / "train").rglob("*_gtFine_labelTrainIds.png"):
        ids = raw[lab.name.replace("_gtFine_labelTrainIds.png", "_leftImg8bit")]
        np.testing.assert_array_equal(read_id_label(lab), cityscapes_train_ids(ids))
    assert not list((tmp_path / "gtFine" / "test").rglob("*TrainIds.png"))
    names = [s["name"] for s in load_stats(tmp_path)[0]]
    assert len(names) == 4 and all(n.endswith("_leftImg8bit") for n in names)


def test_acdc_and_darkzurich_have_no_stats(tmp_path):
    make_acdc(tmp_path / "acdc", conditions=("fog", "snow"))
    assert prepare("acdc", tmp_path / "acdc").converted == 8  # present conditions only
    for split in ("train", "val"):
        assert_prepared_equals_on_the_fly(
            acdc, tmp_path / "acdc", split=split, conditions=("fog", "snow")
        )
    make_darkzurich(tmp_path / "dz")
    assert prepare("darkzurich", tmp_path / "dz").converted == 2
    assert_prepared_equals_on_the_fly(darkzurich, tmp_path / "dz", split="val")
    assert not (tmp_path / "acdc" / SAMPLE_CLASS_STATS).exists()
    assert not (tmp_path / "dz" / SAMPLE_CLASS_STATS).exists()


def test_official_trainid_files_are_kept(tmp_path):
    make_darkzurich(tmp_path, with_train_ids=True)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*_labelTrainIds.png")}
    assert prepare("darkzurich", tmp_path).converted == 0
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*_labelTrainIds.png")}


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_rerun_is_a_no_op(tmp_path):
    make_gta(tmp_path, n=3)
    prepare("gta", tmp_path)
    before = snapshot(tmp_path)
    report = prepare("gta", tmp_path)
    assert report.converted == 0 and report.skipped == 3 and report.stats_dir is None
    assert snapshot(tmp_path) == before


def test_missing_stats_are_recomputed_without_rewriting_labels(tmp_path):
    make_gta(tmp_path, n=3)
    prepare("gta", tmp_path)
    stats = load_stats(tmp_path)
    labels = {p: p.stat().st_mtime_ns for p in tmp_path.glob("labels/*_labelTrainIds.png")}
    (tmp_path / SAMPLES_WITH_CLASS).unlink()
    report = prepare("gta", tmp_path)
    assert report.converted == 0 and report.stats_dir == tmp_path
    assert load_stats(tmp_path) == stats
    assert labels == {p: p.stat().st_mtime_ns for p in tmp_path.glob("labels/*_labelTrainIds.png")}


def test_interrupted_write_is_not_taken_as_complete(tmp_path):
    raw = make_gta(tmp_path, n=3)
    prepare("gta", tmp_path)
    # As if killed while writing 00002: its temp file exists, the final file does not.
    final = tmp_path / "labels" / "00002_labelTrainIds.png"
    final.unlink()
    temp = tmp_path / "labels" / ".00002_labelTrainIds.png.4242.tmp"
    temp.write_bytes(b"\x89PNG\r\n\x1a\n half")
    with pytest.raises(FileNotFoundError, match="1 of 3 labels are not converted"):
        gta(tmp_path)
    report = prepare("gta", tmp_path)
    assert report.converted == 1 and report.stats_dir == tmp_path
    np.testing.assert_array_equal(read_id_label(final), cityscapes_train_ids(raw["00002"]))
    assert not temp.exists()
    assert_prepared_equals_on_the_fly(gta, tmp_path)


def test_unknown_ids_are_ignored_and_counted(tmp_path, caplog):
    make_gta(tmp_path, n=2, unknown_id=200)
    make_synthia(tmp_path / "synthia", n=1)
    with caplog.at_level(logging.WARNING, logger="mpcl.prepare"):
        report = prepare("gta", tmp_path)
    assert report.unknown_pixels == 5 and report.unknown_files == 1
    assert report.unknown_ids == {200}
    assert "gta: 5 pixels in 1 label files had IDs the format does not define [200]" in caplog.text
    assert (read_id_label(tmp_path / "labels" / "00001_labelTrainIds.png")[0, :5] == 255).all()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli(tmp_path):
    make_gta(tmp_path / "ok", n=2)
    (tmp_path / "wrong" / "imgs").mkdir(parents=True)
    make_gta(tmp_path / "corrupt", n=3)
    bad = tmp_path / "corrupt" / "labels" / "00002.png"
    bad.write_bytes(b"not a png")
    ok, missing, wrong, corrupt = run_cli(
        ["gta", "--root", str(tmp_path / "ok"), "--workers", "1"],
        ["gta", "--root", str(tmp_path / "missing")],
        ["gta", "--root", str(tmp_path / "wrong")],
        ["gta", "--root", str(tmp_path / "corrupt"), "--workers", "2"],
    )
    assert ok.returncode == 0, ok.stderr
    assert "2 labels converted" in ok.stdout and ok.stderr == ""
    assert (tmp_path / "ok" / SAMPLES_WITH_CLASS).is_file()
    assert_one_line_error(missing, "does not exist")
    assert_one_line_error(wrong, f"expected folder images/ under {tmp_path / 'wrong'}")
    assert_one_line_error(corrupt, f"cannot read label {bad}")


def test_main_returns_2_on_errors(tmp_path, capsys):
    make_cityscapes(tmp_path, splits=("train",))  # no val split
    assert main(["cityscapes", "--root", str(tmp_path), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: Cityscapes: expected folder leftImg8bit/val/")
        and err.count("\n") == 1
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gta"], "error: gta needs --root (see python -m mpcl.prepare --help)"),
        (
            ["folders", "--classes", "c.yaml"],
            "error: folders needs --images, --labels (see python -m mpcl.prepare --help)",
        ),
    ],
)
def test_missing_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err == message + "\n"


def test_prepare_folders_interrupted_keeps_its_files_and_finishes(tmp_path, monkeypatch):
    """A folders prepare killed mid-way leaves no label_set.json (training reads the
    originals); the rerun keeps the finished PNGs and converts the rest."""
    import cv2

    import mpcl.prepare as prep

    (tmp_path / "classes.yaml").write_text("classes: [{name: a}, {name: b}]\n")
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for i in range(4):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.zeros((8, 8, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "labels" / f"{i}.png"), np.full((8, 8), i % 2, np.uint8))
    real, calls = prep.check_pair, []

    def dies_at_the_third(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(prep, "check_pair", dies_at_the_third)
    args = (tmp_path / "classes.yaml", tmp_path / "images", tmp_path / "labels")
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_folders(*args, workers=1)
    out = tmp_path / "labels_prepared"
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "1.png"]
    assert not (out / "label_set.json").exists()
    monkeypatch.setattr(prep, "check_pair", real)
    report = prep.prepare_folders(*args, workers=1)
    assert (report.converted, report.skipped) == (2, 2)
    assert (out / "label_set.json").is_file()
    assert not (out / prep.PENDING_LABEL_SET).exists()
