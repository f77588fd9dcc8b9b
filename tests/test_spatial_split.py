"""Retraining from one or two annotated slides through the CLI: spatial train/val/test splits with
a gap, the typed error when a class is too rare to split, the decision threshold chosen on the
validation split, and `wsipipe run` stitching at the card's threshold unless one is configured."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from wsipipe.errors import TrainingDataError
from wsipipe.learn.metrics import choose_threshold, classification_metrics
from wsipipe.learn.patchsets import load_patch_sets, split_patch_set, split_spatial

WSIPIPE = [sys.executable, "-m", "wsipipe.cli"]
SMALL = ("tile: {mpp: 1.0, patch_size: 64, chunk_patches: 32}\ninference: {device: cpu, precision: fp32}\n"
         "train: {arch: shufflenet_v2_x0_5, epochs: 2, min_epochs: 2, batch_size: 32, train_size: 32, lr: 0.003,"
         " device: cpu, precision: fp32}\n")


def run(*args, timeout=300):
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*WSIPIPE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def error_lines(res):
    """The command's error lines (the progress bar shares stderr)."""
    return [ln for ln in res.stderr.splitlines() if ln.startswith("wsipipe")]


def grid_cells(data, idx):
    """(group, column, row) of the patches ``idx`` on their slide's grid."""
    out = set()
    for g in np.unique(data.groups):
        sel = data.groups == g
        origin = data.coords[sel].min(axis=0)
        for i in idx[sel[idx]]:
            x, y = np.rint((data.coords[i] - origin) / data.pitch[i]).astype(int)
            out.add((str(g), int(x), int(y)))
    return out


def test_one_slide_splits_into_blocks_with_a_gap_and_every_class(labelled_slides):
    data = load_patch_sets(labelled_slides["stores"][:1])
    split = split_patch_set(data, (0.6, 0.2, 0.2), "auto", seed=3)
    assert split.by == "spatial" and split.gap_patches == 1 and (split.block_patches or 0) >= 2
    parts = [split.indices[k] for k in ("train", "val", "test")]
    assert all(len(np.intersect1d(a, b)) == 0 for i, a in enumerate(parts) for b in parts[i + 1:])
    assert sum(map(len, parts)) + split.dropped == len(data.labels)
    for part in parts:  # both classes in every split
        assert set(np.unique(data.labels[part])) == {0, 1}, np.unique(data.labels[part])
    cells = [grid_cells(data, p) for p in parts]
    for i in range(3):  # no patch of one split touches (8-neighbourhood) a patch of another
        for j in range(i + 1, 3):
            for g, x, y in cells[i]:
                assert not any((g, x + dx, y + dy) in cells[j] for dx in (-1, 0, 1) for dy in (-1, 0, 1))
    again = split_patch_set(data, (0.6, 0.2, 0.2), "auto", seed=3)
    assert all(np.array_equal(again.indices[k], split.indices[k]) for k in split.indices)
    with pytest.raises(TrainingDataError, match="split 'val' is empty.*--split-by spatial"):
        split_patch_set(data, (0.6, 0.2, 0.2), "slide", seed=3)


def test_a_class_too_rare_to_split_names_the_class_counts():
    coords = np.array([(x * 64, y * 64) for x in range(12) for y in range(10)])
    labels = np.zeros(len(coords), np.int64)
    labels[:4] = 1  # four tumor patches in one corner: three splits cannot each get two
    with pytest.raises(TrainingDataError, match=r"class counts: Normal 116, Tumor 4"):
        split_spatial(np.array(["s"] * len(coords)), coords, np.full(len(coords), 64.0), labels, seed=0,
                      classes=["Normal", "Tumor"])
    labels[:] = 0
    labels[(coords[:, 0] < 3 * 64) & (coords[:, 1] < 3 * 64)] = 1  # one 3 x 3 clump: enough patches, one place
    with pytest.raises(TrainingDataError, match=r"too concentrated \(class counts: Normal 111, Tumor 9\)"):
        split_spatial(np.array(["s"] * len(coords)), coords, np.full(len(coords), 64.0), labels, seed=0,
                      classes=["Normal", "Tumor"])


def test_threshold_is_the_middle_of_the_best_gap_and_metrics_use_it():
    probs, labels = np.array([0.02, 0.1, 0.2, 0.7, 0.9, 0.97]), np.array([0, 0, 0, 1, 1, 1])
    assert choose_threshold(probs, labels) == (pytest.approx(0.45), 1.0)
    assert choose_threshold(probs, labels, "dice") == (pytest.approx(0.45), 1.0)
    assert choose_threshold(probs, np.zeros(6, int)) is None
    # a model that ranks perfectly but is badly calibrated: accuracy 0.5 at 0.5, 1.0 at the val threshold
    shy = np.array([0.01, 0.02, 0.03, 0.2, 0.3, 0.4])
    assert classification_metrics(shy, labels)["accuracy"] == 0.5
    chosen = choose_threshold(shy, labels)
    assert chosen is not None
    t = chosen[0]
    assert 0.03 < t < 0.2 and classification_metrics(shy, labels, threshold=t)["accuracy"] == 1.0


@pytest.fixture(scope="module")
def one_slide_model(labelled_slides, tmp_path_factory):
    root = tmp_path_factory.mktemp("spatial")
    (root / "small.yaml").write_text(SMALL)
    res = run("train", labelled_slides["stores"][0], "--out", root / "m1", "--init", "scratch", "--config", root / "small.yaml")
    return {"root": root, "res": res, "config": root / "small.yaml"}


def test_train_from_one_annotated_slide_splits_spatially(one_slide_model):
    res, root = one_slide_model["res"], one_slide_model["root"]
    assert res.returncode == 0, res.stdout + res.stderr
    assert "split: spatial" in res.stdout and "optimistic" in res.stdout, res.stdout
    card = json.loads((root / "m1" / "card.json").read_text())
    assert card["split"]["by"] == "spatial" and "optimistic" in card["split"]["note"]
    for part in card["data"]["splits"].values():
        assert part["class_counts"]["Normal"] > 0 and part["class_counts"]["Tumor"] > 0, card["data"]["splits"]
    assert len(card["history"]) >= 2 and {"val_auc", "val_log_loss"} <= set(card["history"][0])
    assert 0.0 < card["threshold"] < 1.0 and card["threshold_selection"]["split"] == "val"
    assert card["test_metrics"]["threshold"] == card["threshold"]


def test_two_stores_train_by_default_and_split_option(labelled_slides, tmp_path):
    (tmp_path / "small.yaml").write_text(SMALL.replace("epochs: 2, min_epochs: 2", "epochs: 1, min_epochs: 1"))
    two = labelled_slides["stores"][1:]
    res = run("train", *two, "--out", tmp_path / "m2", "--split", "0.5,0.25,0.25", "--config", tmp_path / "small.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    card = json.loads((tmp_path / "m2" / "card.json").read_text())
    assert card["split"]["by"] == "spatial" and card["config"]["train"]["split"] == [0.5, 0.25, 0.25]
    assert all(len(p["groups"]) == 2 for p in card["data"]["splits"].values())  # regions of both slides
    res = run("train", *two, "--out", tmp_path / "m3", "--split-by", "slide", "--config", tmp_path / "small.yaml")
    assert res.returncode == 2 and "unexpected" not in res.stderr and len(error_lines(res)) == 1, res.stderr
    assert "split 'test' is empty: 2 source group(s)" in res.stderr, res.stderr
    res = run("train", *two, "--out", tmp_path / "m3", "--split", "0.6,0.2", "--config", tmp_path / "small.yaml")
    assert res.returncode == 2 and "unexpected" not in res.stderr and "train.split" in res.stderr, res.stderr


def test_too_few_tumor_patches_is_one_line_naming_the_class_counts(labelled_slides, tmp_path):
    store = tmp_path / "few.zarr"
    shutil.copytree(labelled_slides["stores"][0], store)
    from wsipipe.tiles import store as stores

    g = stores.open_store(store)
    coords = np.asarray(stores.array(g, stores.COORDS)[:])
    size = stores.meta(g)["tile"]["patch_size_l0"]
    x, y = (int(v) for v in coords[len(coords) // 2])
    tiny = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]}}]}
    (tmp_path / "tiny.geojson").write_text(json.dumps(tiny))
    res = run("patches", store, "--annotations", tmp_path / "tiny.geojson", "--classes", "Normal,Tumor")
    assert res.returncode == 0, res.stderr
    (tmp_path / "small.yaml").write_text(SMALL)
    res = run("train", store, "--out", tmp_path / "m", "--config", tmp_path / "small.yaml")
    assert res.returncode == 2 and "unexpected" not in res.stderr, res.stderr
    lines = error_lines(res)
    assert len(lines) == 1 and re.search(r"class counts: Normal \d+, Tumor 1\b", lines[0]), res.stderr


def test_run_stitches_at_the_card_threshold_unless_one_is_set(labelled_slides, one_slide_model):
    root, config = one_slide_model["root"], one_slide_model["config"]
    assert one_slide_model["res"].returncode == 0
    card_path, weights = root / "m1" / "card.json", root / "m1" / "model.safetensors"
    card = json.loads(card_path.read_text())
    slide = labelled_slides["slides"][1].path

    def summary(*extra):
        res = run("run", slide, "--out", root / "out", "--model", weights, *extra)
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(next((root / "out").glob("*/summary.json")).read_text())

    assert summary("--config", config)["threshold"] == pytest.approx(card["threshold"])
    card["threshold"] = 0.123  # a new card threshold for the same weights: the outputs are restitched
    card_path.write_text(json.dumps(card))
    assert summary("--config", config)["threshold"] == pytest.approx(0.123)
    pinned = root / "pinned.yaml"
    pinned.write_text(SMALL + "stitch: {threshold: 0.5}\n")  # a configured threshold wins over the card
    assert summary("--config", pinned)["threshold"] == pytest.approx(0.5)
    card["weights_sha256"] = "0" * 64  # a card of other weights is not theirs to follow
    card_path.write_text(json.dumps(card))
    assert summary("--config", config)["threshold"] == pytest.approx(0.5)


def test_registry_production_model_brings_its_card_threshold(tmp_path):
    from wsipipe.config import load_config
    from wsipipe.learn import registry
    from wsipipe.models.model import build_model, save_weights
    from wsipipe.run.names import run_model

    info = save_weights(build_model("shufflenet_v2_x0_5", 1), tmp_path / "m" / "model.safetensors", "shufflenet_v2_x0_5", 1)
    card = {"arch": "shufflenet_v2_x0_5", "num_classes": 1, "weights_sha256": info.sha256, "threshold": 0.37,
            "test_metrics": {"auc": 0.9}, "test_split_id": "x"}
    (tmp_path / "m" / "card.json").write_text(json.dumps(card))
    version = registry.register(tmp_path / "models", tmp_path / "m")
    registry.promote(tmp_path / "models", version)
    assert registry.entry(tmp_path / "models", version)["threshold"] == 0.37
    weights, cfg = run_model(None, load_config(None, {"train.registry": str(tmp_path / "models")}))
    assert weights == tmp_path / "models" / version / "model.safetensors" and cfg.stitch.threshold == 0.37
    _, pinned = run_model(None, load_config(None, {"train.registry": str(tmp_path / "models"), "stitch.threshold": 0.6}))
    assert pinned.stitch.threshold == 0.6
    _, plain = run_model(tmp_path / "m" / "model.safetensors", load_config(None))
    assert plain.stitch.threshold == 0.37 and plain.stitch.tumor_threshold == 0.37
    (tmp_path / "m" / "card.json").unlink()  # weights without a card: the configured default
    _, bare = run_model(tmp_path / "m" / "model.safetensors", load_config(None))
    assert bare.stitch.threshold is None and bare.stitch.tumor_threshold == 0.5
