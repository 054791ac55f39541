"""Your own data (data=folders): class sets, pairing, label formats, checks (prepared and lazy,
same messages), prepare folders, exports, and the docs' worked example end to end."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import TINY_BANK, compose_train

from mpcl.data.base import exif_orientation, read_image
from mpcl.data.folders import (
    FolderDataset,
    folder_dataset,
    is_prepared,
    pair_files,
    prepared_dir,
    read_class_label,
    read_prepared_label,
    size_defaults,
)
from mpcl.data.folders import read_image as read_folder_image
from mpcl.data.labels import CITYSCAPES, IGNORE_INDEX, colorize, label_set, parse_label_set
from mpcl.data.rcs import compute_class_stats, load_stats
from mpcl.export import Exporter, format_for_dataset
from mpcl.prepare import main as prepare_main
from mpcl.prepare import prepare_folders
from mpcl.run.cli import _handled

DOCS = Path(__file__).parents[1] / "docs" / "datasets.md"
CLASSES = {
    "classes": [
        {"name": "soil", "id": 3, "color": [120, 80, 40]},
        {"name": "crop", "id": 7, "color": [40, 200, 40], "thing": True},
        {"name": "weed", "id": 300, "color": [250, 50, 50]},
    ],
    "ignore_index": 0,
    "ignore_color": [0, 0, 0],
}


def write_classes(path: Path, data: dict = CLASSES) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def write_pair(root: Path, rel: str, ids: np.ndarray, ext: str = ".png") -> None:
    """An image ``images/<rel><ext>`` and its 16-bit index label ``labels/<rel>.png``."""
    image = np.random.default_rng(len(rel)).integers(0, 255, (*ids.shape, 3), dtype=np.uint8)
    for sub in ("images", "labels"):
        (root / sub / rel).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / f"{rel}{ext}"), image)
    cv2.imwrite(str(root / "labels" / f"{rel}.png"), ids.astype(np.uint16))


def ids_image(seed: int, shape=(24, 32)) -> np.ndarray:
    """(H, W) of the CLASSES ids and the ignore value 0."""
    return np.random.default_rng(seed).choice([0, 3, 7, 300], size=shape)


ID_TO_INDEX = {3: 0, 7: 1, 300: 2, 0: IGNORE_INDEX}


# ------------------------------------------------------------------------- the class set


def test_label_set_from_classes_yaml(tmp_path):
    classes = label_set(write_classes(tmp_path / "classes.yaml"))
    assert classes.names == ("soil", "crop", "weed")
    assert classes.ids == (3, 7, 300) and classes.thing_classes == (1,)
    assert classes.palette.tolist() == [[120, 80, 40], [40, 200, 40], [250, 50, 50]]
    assert classes.value_to_class("index") == ID_TO_INDEX
    # defaults: id = position, distinct colours that are not black (the ignore colour)
    plain = parse_label_set({"classes": [{"name": "a"}, {"name": "b"}]})
    assert plain.ids == (0, 1) and plain.ignore_index == 255
    assert len({tuple(c) for c in plain.colors}) == 2 and (0, 0, 0) not in plain.colors
    assert label_set("cityscapes") is CITYSCAPES and len(CITYSCAPES) == 19


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"classes": [{"name": "a"}, {"name": "a"}]}, r"classes 0 and 1 have the same name 'a'"),
        ({"classes": [{"name": "a", "id": 255}]}, r"class 0 has id 255, the ignore_index"),
        ({"classes": [{"name": "a", "colour": [1, 2, 3]}]}, r"class 0 \(a\): unknown keys"),
        ({"classes": [{"name": "a", "color": [1, 2]}]}, r"class 0 \(a\): color must be 3"),
        ({"classes": [{"name": "a", "raw_ids": [1]}, {"name": "b"}]}, r"\['b'\] have no raw_ids"),
        ({"classes": [{"name": "a", "raw_ids": [1]}, {"name": "b", "raw_ids": [1]}]}, r"raw id 1"),
        ({"names": ["a"]}, r"expected a mapping with a list `classes"),
    ],
)
def test_bad_class_sets_are_one_line(data, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_label_set(data, "c.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("c.yaml: ")


# ------------------------------------------------------------------------- pairing


def test_pairing_by_relative_path_and_stem(tmp_path):
    write_pair(tmp_path, "a/x", ids_image(0), ".jpg")
    write_pair(tmp_path, "b/x", ids_image(1), ".png")
    write_pair(tmp_path, "y", ids_image(2), ".webp")
    (tmp_path / "labels" / "orphan.png").write_bytes(b"")  # a label without image: unused
    images, labels = pair_files(tmp_path / "images", tmp_path / "labels")
    rel = [p.relative_to(tmp_path).as_posix() for p in [*images, *labels]]
    assert rel == ["images/a/x.jpg", "images/b/x.png", "images/y.webp"] + [
        "labels/a/x.png",
        "labels/b/x.png",
        "labels/y.png",
    ]
    (tmp_path / "list.txt").write_text("# subset\nb/x.png\n\ny\n")
    images, labels = pair_files(tmp_path / "images", tmp_path / "labels", tmp_path / "list.txt")
    assert [p.name for p in images] == ["x.png", "y.webp"] and labels[0].parent.name == "b"
    (tmp_path / "labels" / "y.png").unlink()
    with pytest.raises(ValueError, match=r"^1 of 3 images have no label file \(y\.webp\); "):
        pair_files(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "list.txt").write_text("a/x\nzz\n")
    with pytest.raises(ValueError, match=r"names 1 images not in .*\(e\.g\. zz\)"):
        pair_files(tmp_path / "images", None, tmp_path / "list.txt")


# ------------------------------------------------------------------------- formats


def test_index_color_and_raw_labels_map_like_a_direct_lookup(tmp_path):
    classes = label_set(write_classes(tmp_path / "classes.yaml"))
    ids = ids_image(3)
    want = np.vectorize(ID_TO_INDEX.get)(ids).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "index.png"), ids.astype(np.uint16))  # 16-bit: id 300
    assert np.array_equal(read_class_label(tmp_path / "index.png", classes, "index"), want)
    rgb = np.zeros((*ids.shape, 3), np.uint8)
    for value, c in ID_TO_INDEX.items():
        if c != IGNORE_INDEX:
            rgb[ids == value] = CLASSES["classes"][c]["color"]
    cv2.imwrite(str(tmp_path / "color.png"), rgb[..., ::-1])
    assert np.array_equal(read_class_label(tmp_path / "color.png", classes, "color"), want)
    # raw: many raw ids to one class (here the 19 Cityscapes trainIds into 3 classes)
    merged = parse_label_set(
        {"classes": [{"name": "low", "raw_ids": list(range(0, 9))}, {"name": "high",
         "raw_ids": list(range(9, 18))}, {"name": "last", "raw_ids": [18]}]}
    )  # fmt: skip
    raw = np.random.default_rng(4).choice([*range(19), 255], size=(16, 16))
    cv2.imwrite(str(tmp_path / "raw.png"), raw.astype(np.uint8))
    expected = np.where(raw == 255, 255, np.where(raw < 9, 0, np.where(raw < 18, 1, 2)))
    assert np.array_equal(read_class_label(tmp_path / "raw.png", merged, "raw"), expected)
    with pytest.raises(ValueError, match=r"no class has raw_ids"):
        read_class_label(tmp_path / "raw.png", classes, "raw")


# ------------------------------------------------------------------------- checks

BAD_CASES = ["unknown id", "unknown colour", "size", "truncated image", "truncated label"]


def _break(root: Path, case: str) -> tuple[str, str]:
    """Damage pair 1 of ``root``; returns (the file the message names, a value in it)."""
    image, label = root / "images" / "p1.png", root / "labels" / "p1.png"
    if case == "unknown id":
        ids = ids_image(1)
        ids[2, 3] = 9
        cv2.imwrite(str(label), ids.astype(np.uint16))
        return str(label), "has id 9 outside the class set"
    if case == "unknown colour":
        return str(label), "has colour [3, 3, 3] that is no class colour"  # grey id 3 as RGB
    if case == "size":
        cv2.imwrite(str(label), ids_image(1, (12, 32)).astype(np.uint16))
        return str(label), "is 32x12 but its image"
    target = image if case == "truncated image" else label
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return str(target), "unreadable or truncated file"


@pytest.mark.parametrize("case", BAD_CASES)
def test_prepare_and_lazy_reads_stop_with_the_same_line(tmp_path, case):
    classes = write_classes(tmp_path / "classes.yaml")
    root = tmp_path / "data"
    for i in range(3):
        write_pair(root, f"p{i}", ids_image(i))
    fmt = "color" if case == "unknown colour" else "index"
    if fmt == "color":  # every other label as proper colours
        ls = label_set(classes)
        for i in (0, 2):
            mine = read_class_label(root / "labels" / f"p{i}.png", ls, "index")
            cv2.imwrite(str(root / "labels" / f"p{i}.png"), colorize(mine, ls.palette)[..., ::-1])
    file, value = _break(root, case)
    with pytest.raises((OSError, ValueError)) as prepared:
        prepare_folders(classes, root / "images", root / "labels", fmt, workers=1)
    line = str(prepared.value)
    assert "\n" not in line and file in line and value in line
    assert not (prepared_dir(root / "labels") / "label_set.json").exists()
    dataset = folder_dataset(root / "images", root / "labels", classes, fmt)
    dataset[0]  # good pairs load
    with pytest.raises((OSError, ValueError)) as lazy:
        dataset[1]
    assert str(lazy.value) == line  # one problem: no "(N more ...)" suffix


def test_prepare_folders_writes_once_and_training_reads_it(tmp_path, capsys):
    classes = write_classes(tmp_path / "classes.yaml")
    root = tmp_path / "data"
    for i in range(4):
        write_pair(root, f"sub/p{i}", ids_image(i))
    report = prepare_folders(classes, root / "images", root / "labels", workers=1)
    out = prepared_dir(root / "labels")
    assert report.converted == 4 and out == tmp_path / "data" / "labels_prepared"
    for i in range(4):
        got = read_prepared_label(out / "sub" / f"p{i}.png")
        assert np.array_equal(got, np.vectorize(ID_TO_INDEX.get)(ids_image(i)))
    images, labels = pair_files(root / "images", root / "labels")
    original = FolderDataset(images, labels, label_set(classes))  # reads the original files
    assert load_stats(out) == compute_class_stats(original)
    assert not list(out.rglob("*.tmp"))
    # the dataset reads the prepared PNGs; a rerun writes nothing
    dataset = folder_dataset(root / "images", root / "labels", classes)
    assert dataset.label_reader is read_prepared_label
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert prepare_folders(classes, root / "images", root / "labels").converted == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert "nothing to do" in capsys.readouterr().out
    # another class set (ids swapped): not prepared for it -> the originals are read again
    swapped = json.loads(json.dumps(CLASSES))
    swapped["classes"][0]["id"], swapped["classes"][1]["id"] = 7, 3
    write_classes(classes, swapped)
    assert not is_prepared(root / "labels", label_set(classes), "index")
    assert folder_dataset(root / "images", root / "labels", classes).label_reader is not (
        read_prepared_label
    )
    assert prepare_folders(classes, root / "images", root / "labels").converted == 4


def _exif_turned_jpeg(path: Path, stored: np.ndarray, orientation: int = 6) -> None:
    """A JPEG of ``stored`` (H, W, 3) RGB pixels with an EXIF orientation tag (6: shown turned
    90 degrees clockwise, W x H)."""
    from PIL import Image

    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif, quality=95)


def test_exif_turned_photos_are_read_as_displayed(tmp_path, capsys):
    classes = write_classes(tmp_path / "classes.yaml")
    root = tmp_path / "data"
    stored = np.zeros((24, 40, 3), np.uint8)  # stored 40 x 24, displayed 24 x 40
    _exif_turned_jpeg(root / "images" / "phone.jpg", stored)
    assert exif_orientation(root / "images" / "phone.jpg") == 6
    # training (Pillow) and predict (OpenCV) read it alike, as displayed
    assert read_image(root / "images" / "phone.jpg").shape == (40, 24, 3)
    assert read_folder_image(root / "images" / "phone.jpg").shape == (40, 24, 3)
    # a label drawn on the stored pixels: the size error says why
    (root / "labels").mkdir(parents=True)
    cv2.imwrite(str(root / "labels" / "phone.png"), ids_image(0, (24, 40)).astype(np.uint16))
    with pytest.raises(ValueError, match="the image's EXIF orientation turns it: draw the label"):
        prepare_folders(classes, root / "images", root / "labels")
    # drawn on the displayed image: prepared, and the turn is said
    cv2.imwrite(str(root / "labels" / "phone.png"), ids_image(0, (40, 24)).astype(np.uint16))
    assert prepare_folders(classes, root / "images", root / "labels").converted == 1
    out = capsys.readouterr().out
    assert "1 images carry an EXIF rotation" in out and "phone.jpg" in out


def test_size_defaults_follow_the_images(tmp_path):
    for name, (h, w) in {"small": (60, 100), "large": (2000, 3000)}.items():
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "a.png"), np.zeros((h, w, 3), np.uint8))
    assert size_defaults(tmp_path / "small", 1024) == {"crop_size": 32, "rcs_min_pixels": 9}
    # 3000x2000 shrunk to 1024x683: crop 512; RCS threshold at the file's resolution
    assert size_defaults(tmp_path / "large", 1024) == {"crop_size": 512, "rcs_min_pixels": 9000}


# ------------------------------------------------------------------------- exports


def test_export_writes_the_label_sets_ids_and_colours(tmp_path):
    import torch

    classes = label_set(write_classes(tmp_path / "classes.yaml"))
    assert format_for_dataset("mpcl.data.folders.folder_dataset") == "ids"
    exporter = Exporter("ids", tmp_path / "out", label_set=classes)
    logits = torch.zeros(3, 2, 3)
    logits[2, 0], logits[1, 1] = 1.0, 1.0  # row 0: weed (id 300), row 1: crop (id 7)
    exporter.add(logits, "img")
    ids = cv2.imread(str(tmp_path / "out" / "ids" / "img.png"), cv2.IMREAD_UNCHANGED)
    assert ids.dtype == np.uint16 and ids.tolist() == [[300] * 3, [7] * 3]
    color = cv2.imread(str(tmp_path / "out" / "color" / "img.png"))[..., ::-1]
    assert color[0, 0].tolist() == [250, 50, 50] and color[1, 0].tolist() == [40, 200, 40]
    with pytest.raises(ValueError, match=r"export\.format=acdc writes Cityscapes ids .*ids$"):
        Exporter("acdc", tmp_path / "acdc", label_set=classes)


# ------------------------------------------------------------------------- the worked example


def _docs_section() -> str:
    text = DOCS.read_text()
    return text[text.index("### Worked example") : text.index("## Test-server submissions")]


def _block(section: str, lang: str) -> str:
    return re.search(rf"```{lang}\n(.*?)```", section, re.S)[1]


def test_worked_example_in_the_docs_trains_end_to_end(tmp_path, monkeypatch, capsys):
    from mpcl.data.synthetic import generate
    from mpcl.train import train

    section = _docs_section()
    monkeypatch.chdir(tmp_path)
    Path("my_classes.yaml").write_text(_block(section, "yaml"))
    assert label_set("my_classes.yaml").names == ("ground", "structure", "greenery", "sky", "mover")
    # the export, on a tiny benchmark (the one line that differs from the docs)
    code = _block(section, "python")
    line = 'root, out = generate("~/.cache/mpcl"), Path("my_data")'
    assert line in code
    tiny = "dict(image_size=(64, 128), num_source_train=6, num_target_train=4, num_target_val=2)"
    code = code.replace(line, f'root, out = generate("cache", **{tiny}), Path("my_data")')
    exec(compile(code, "docs/datasets.md", "exec"), {"generate": generate})
    commands = [c for c in _block(section, "bash").splitlines() if c.strip()]
    assert len(commands) == 3
    for command in commands[:2]:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "mpcl.prepare"]
        assert prepare_main([*argv[3:], "--workers", "1"]) == 0
    overrides = shlex.split(commands[2])[3:]
    tiny_run = [
        "trainer=cpu",
        "data.num_workers=0",
        "trainer.max_steps=10",
        "trainer.val_check_interval=10",
        "callbacks.debug_images.every_n_steps=10",
        *TINY_BANK,
    ]
    cfg = compose_train([*overrides, *tiny_run], tmp_path / "run")
    assert cfg.num_classes == 5 and cfg.model.decode_head.num_classes == 5
    assert cfg.thing_classes == [4] and cfg.palette[4] == [220, 20, 60]
    capsys.readouterr()
    train(cfg)
    printed = capsys.readouterr().out
    for name in ("ground", "structure", "greenery", "sky", "mover", "mIoU"):
        assert re.search(rf"│ {name} +│ +(\d+\.\d+|nan) │", printed), name
    # the debug grid's source-label column (the second, 64 px crops under 16 px of titles)
    debug = cv2.imread(str(next((tmp_path / "run" / "debug").glob("step_*.png"))))[..., ::-1]
    drawn = {tuple(c) for c in debug[16:, 64:128].reshape(-1, 3).tolist()}
    palette = {tuple(c) for c in label_set("my_classes.yaml").colors}
    assert drawn <= palette | {(0, 0, 0)} and drawn & palette  # the new colours, black = ignore

    # a bad label: prepare stops with one line naming the file and the colour
    bad = Path("my_data/source/labels/00003.png")
    label = cv2.imread(str(bad))
    label[5, 7] = (0, 255, 255)  # BGR yellow
    cv2.imwrite(str(bad), label)
    assert prepare_main([*shlex.split(commands[0])[3:], "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(f"error: label {bad} has colour [255, 255, 0] that is no class colour")
    # ... and so does training on the unprepared folders (RCS counts the labels first)
    import shutil

    shutil.rmtree("my_data/source/labels_prepared")
    with pytest.raises(Exception) as info:
        train(compose_train([*overrides, *tiny_run], tmp_path / "run2"))
    code, message = _handled(info.value)
    assert code == 2 and message == err
