"""mpcl.eval against a direct confusion-matrix computation; mpcl.predict's server format."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import compose_train, tiny_synthetic

from mpcl.data.labels import CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX, NUM_CLASSES
from mpcl.errors import ConfigError
from mpcl.eval import evaluate
from mpcl.predict import predict
from mpcl.run.build import build
from mpcl.run.resume import CheckpointFile
from mpcl.train import train

pytestmark = pytest.mark.slow  # end to end: trains, spawns processes or runs a script


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """A checkpoint of a short synthetic run and the overrides that built it."""
    out = tmp_path_factory.mktemp("run")
    overrides = [f"paths.cache_dir={cache_dir}", *tiny_synthetic()]
    cfg = compose_train(
        [*overrides, "trainer.max_steps=12", "trainer.val_check_interval=12", "evaluate=false"],
        out,
    )
    train(cfg)
    return out / "checkpoints" / "last.ckpt", overrides


def _direct_predictions(overrides, ckpt, tmp_path):
    """(predicted trainIds, labels, names) of the val set, computed without mpcl.eval."""
    cfg = compose_train(overrides, tmp_path)
    datamodule, module, _ = build(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    preds, labels, names = [], [], []
    with torch.no_grad():
        for item in datamodule.target_val:
            logits = module.predict_logits(item["image"][None])
            preds.append(logits.argmax(1)[0].numpy())
            labels.append(item["label"].numpy())
            names.append(item["name"])
    return preds, labels, names


def test_eval_matches_direct_confusion_matrix(trained, tmp_path):
    ckpt, overrides = trained
    cfg = compose_train([*overrides, f"ckpt_path={ckpt}"], tmp_path / "eval", "eval")
    results = evaluate(cfg)
    preds, labels, _ = _direct_predictions(overrides, ckpt, tmp_path / "direct")
    p, t = np.concatenate([x.ravel() for x in preds]), np.concatenate([x.ravel() for x in labels])
    keep = t != IGNORE_INDEX
    cm = np.bincount(t[keep] * NUM_CLASSES + p[keep], minlength=NUM_CLASSES**2)
    cm = cm.reshape(NUM_CLASSES, NUM_CLASSES)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    assert results["means"]["mIoU"] == pytest.approx(100 * np.nanmean(iou), abs=1e-3)
    got = [np.nan if v is None else v for v in results["per_class_iou"].values()]
    np.testing.assert_allclose(got, 100 * iou, atol=1e-3)
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["means"]["mIoU"] == pytest.approx(results["means"]["mIoU"])
    assert "| **mIoU** |" in (tmp_path / "eval" / "results.md").read_text()


def test_predict_writes_label_ids_that_map_back(trained, tmp_path):
    ckpt, overrides = trained
    cfg = compose_train(
        [*overrides, f"ckpt_path={ckpt}", "split=val"], tmp_path / "pred", "predict"
    )
    predict(cfg)
    preds, _, names = _direct_predictions(overrides, ckpt, tmp_path / "direct")
    for pred, name in zip(preds, names, strict=True):
        ids = cv2.imread(str(tmp_path / "pred" / "labelIds" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == pred.shape
        np.testing.assert_array_equal(CITYSCAPES_ID_TO_TRAIN_ID[ids], pred)
        assert (tmp_path / "pred" / "color" / f"{name}.png").is_file()


def test_eval_rejects_missing_and_mismatched_checkpoints(trained, tmp_path):
    ckpt, overrides = trained
    cfg = compose_train(overrides, tmp_path)
    _, module, _ = build(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        CheckpointFile.read(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        CheckpointFile.read(bad)
    no_prototypes = [o for o in overrides if not o.startswith("prototype.")]
    cfg = compose_train([*no_prototypes, "prototype=none"], tmp_path / "b")
    _, baseline, _ = build(cfg)
    with pytest.raises(ConfigError, match="does not match the configured model"):
        CheckpointFile.read(ckpt).load_into(baseline)


def test_notebook_runs_from_the_checkpoint_alone(trained, tmp_path, monkeypatch):
    """Execute the notebook with a Jupyter kernel (nbclient), given only the checkpoint: it
    builds the model and the val set from the stored config and draws both figures."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    ckpt, _ = trained
    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / "prototypes.ipynb", as_version=4)
    monkeypatch.setenv("MPCL_CKPT", str(ckpt))  # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows figures
    nbclient.NotebookClient(
        nb, timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "build_target(cfg)" in code[2].source and "OVERRIDES" not in "".join(
        c.source for c in code
    )
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    shown = [o for o in code[2].outputs if o.output_type == "display_data"]
    assert len(shown) == 2 and all("image/png" in o.data for o in shown)  # both figures
