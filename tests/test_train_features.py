"""`wsipipe train --features`: a linear head on stored patch features, saved as a whole classifier."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wsipipe.models.embed import embed_store, read_features
from wsipipe.models.inference import predict_patches
from wsipipe.models.model import _head, build_model, load_model
from wsipipe.tiles import store

pytestmark = pytest.mark.slow
WSIPIPE = [sys.executable, "-m", "wsipipe.cli"]
ARCH = "resnet18"
# The keys `wsipipe train` writes into card.json (wsipipe.learn.train.train_model).
PIXEL_CARD_KEYS = {"format", "wsipipe_version", "created", "arch", "num_classes", "classes", "weights_sha256", "init",
                   "config", "config_hash", "data", "split", "test_split_id", "history", "best_epoch", "threshold",
                   "threshold_selection", "test_metrics", "stain_normalisation"}


def run(*args, timeout=300):
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*WSIPIPE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def copies(labelled_slides, tmp_path_factory):
    """The labelled stores copied (embedding writes into them) and a random encoder's weights."""
    root = tmp_path_factory.mktemp("features-head")
    stores = []
    for s in labelled_slides["stores"]:
        shutil.copytree(s, root / s.name)
        stores.append(root / s.name)
    torch.manual_seed(0)
    weights = root / "encoder.pt"
    torch.save(build_model(ARCH, 1).state_dict(), weights)
    config = root / "cfg.yaml"
    config.write_text(f"train:\n  device: cpu\n  registry: {root / 'registry'}\ninference:\n  device: cpu\n  precision: fp32\n")
    return {"stores": stores, "weights": weights, "root": root, "config": config}


def test_train_features_saves_a_classifier_equal_to_the_head_on_stored_features(copies, one_torch_thread):
    out = copies["root"] / "head"
    res = run("train", *copies["stores"], "--features", "--encoder", f"torchvision:{ARCH}", "--weights", copies["weights"],
              "--out", out, "--register", "--config", copies["config"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("embedded ") == 3 and "test: AUC" in res.stdout and "registered as v0001" in res.stdout
    card = json.loads((out / "card.json").read_text())
    assert set(card) >= PIXEL_CARD_KEYS
    assert card["head"] == "features" and card["arch"] == ARCH and card["num_classes"] == 1
    assert card["encoder"]["kind"] == "torchvision" and card["encoder"]["dim"] == 512 and card["encoder"]["sha256"]
    assert "linear head" in card["training_data"] and card["split"]["by"] == "slide"
    assert card["test_metrics"]["auc"] > 0.8 and card["threshold"] is not None  # random features still separate these
    assert (copies["root"] / "registry" / "v0001" / "model.safetensors").is_file()

    # The saved classifier on patches == the head (its last layer) on those patches' stored features.
    model, info = load_model(out / "model.safetensors")
    assert info.card is not None and info.card.threshold == card["threshold"] and info.card.classes == ["Normal", "Tumor"]
    g = store.open_store(copies["stores"][0])
    patches = np.asarray(g["patches"][:96])
    parent, name = _head(model)
    layer = getattr(parent, name)
    feats = torch.from_numpy(read_features(copies["stores"][0])[:96])
    with torch.no_grad():
        from_features = torch.sigmoid(layer(feats)[:, 0]).numpy()
    from_pixels = predict_patches(model, patches, torch.device("cpu"), card=info.card)
    np.testing.assert_allclose(from_pixels, from_features, atol=2e-3)  # float16 features against float32 ones

    # `wsipipe infer --model OUT` needs no extra step, and gives the same probabilities over the whole store.
    res = run("infer", copies["stores"][0], "--model", out / "model.safetensors", "--config", copies["config"])
    assert res.returncode == 0, res.stdout + res.stderr
    inferred = np.asarray(store.open_store(copies["stores"][0])["probabilities"][:])
    with torch.no_grad():
        want = torch.sigmoid(layer(torch.from_numpy(read_features(copies["stores"][0])))[:, 0]).numpy()
    np.testing.assert_allclose(inferred.reshape(-1), want, atol=2e-3)

    # Run again: the features are there, nothing is embedded; the fitted head is the same.
    again = run("train", *copies["stores"], "--features", "--encoder", f"torchvision:{ARCH}", "--weights", copies["weights"],
                "--out", copies["root"] / "head2", "--config", copies["config"])
    assert again.returncode == 0 and "embedded " not in again.stdout, again.stdout + again.stderr
    card2 = json.loads((copies["root"] / "head2" / "card.json").read_text())
    assert card2["test_split_id"] == card["test_split_id"] and card2["history"] == card["history"]


def test_train_features_option_errors_are_one_line(copies):
    res = run("train", *copies["stores"], "--features", "--out", copies["root"] / "x")
    assert res.returncode == 2 and "--encoder" in res.stderr and "Traceback" not in res.stderr
    res = run("train", *copies["stores"], "--features", "--encoder", f"torchvision:{ARCH}", "--weights", copies["weights"],
              "--arch", "resnet18", "--out", copies["root"] / "x")
    assert res.returncode == 2 and "--arch" in res.stderr


def test_a_folder_patch_set_can_be_embedded(copies, tmp_path, one_torch_thread):
    from wsipipe.learn.encoders import load_encoder_spec
    from wsipipe.learn.patchsets import folder_patch_set

    g = store.open_store(copies["stores"][0])
    for k, cls in enumerate(("ADI", "TUM")):
        (tmp_path / "kather" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(g["patches"][k * 5 + i]).save(tmp_path / "kather" / cls / f"{cls}-{i}.png")
    folder_patch_set(tmp_path / "kather", tmp_path / "kather.zarr", chunk_patches=4)
    encoder, identity = load_encoder_spec(f"torchvision:{ARCH}", copies["weights"])
    stats = embed_store(tmp_path / "kather.zarr", encoder, identity)
    assert stats["computed"] == 10 and read_features(tmp_path / "kather.zarr").shape == (10, 512)
