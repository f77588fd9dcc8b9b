"""Inference into a real Zarr store tiled from a real slide."""

from __future__ import annotations

import numpy as np
import pytest

from wsipipe import store
from wsipipe.config import InferenceConfig, load_config
from wsipipe.errors import StoreError
from wsipipe.inference import infer_store, predict_patches, resolve_device, resolve_precision
from wsipipe.model import build_model, save_weights
from wsipipe.tiling import tile_slide


@pytest.fixture(scope="module")
def tiled(slides_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inf") / "cmu.zarr"
    tile_slide(slides_dir / "cmu-1-small-region.svs", out, load_config(None, {"tile.patch_size": 64, "tile.chunk_patches": 32}))
    return out


def small_model(tmp_path, seed, num_classes=1):
    import torch

    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes).eval()
    info = save_weights(model, tmp_path / f"m{seed}-{num_classes}.safetensors", "resnet18", num_classes)
    return model, info


def test_probabilities_match_direct_prediction_and_rerun_is_noop(tiled, tmp_path):
    model, info = small_model(tmp_path, 0)
    cfg = InferenceConfig(batch_size=24, precision="fp32")
    seen = []
    stats = infer_store(tiled, model, info, cfg, progress=lambda d, n: seen.append((d, n)))
    g = store.open_store(tiled)
    n = g["patches"].shape[0]
    assert stats["n"] == n and seen[-1] == (n, n)
    probs = g["probabilities"][:]
    direct = predict_patches(model, g["patches"][:], resolve_device("cpu"), None)
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    assert ((probs >= 0) & (probs <= 1)).all()
    entry = store.stage_entry(g, "infer")
    assert entry["complete"] and entry["identity"]["model_sha256"] == info.sha256
    again = infer_store(tiled, model, info, cfg)
    assert again["skipped"] and store.stage_entry(store.open_store(tiled), "infer") == entry


def test_changed_model_recomputes_and_multiclass_shape(tiled, tmp_path):
    model, info = small_model(tmp_path, 1, num_classes=3)
    stats = infer_store(tiled, model, info, InferenceConfig(precision="fp32"))
    assert not stats["skipped"]
    probs = store.open_store(tiled)["probabilities"][:]
    assert probs.shape[1] == 3
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_interrupted_run_resumes_only_missing_chunks(tiled, tmp_path):
    model, info = small_model(tmp_path, 2)
    cfg = InferenceConfig(precision="fp32")
    infer_store(tiled, model, info, cfg)
    g = store.open_store(tiled, mode="r+")
    full = g["probabilities"][:]
    # Simulate a kill after chunk 0: later chunks lost, stage not complete.
    n_chunks = g["_progress/infer"].shape[0]
    assert n_chunks >= 2
    g["probabilities"][32:] = np.nan
    g["_progress/infer"][1:] = False
    entry = store.stage_entry(g, "infer")
    store.set_stage(g, "infer", entry["identity"], False)
    stats = infer_store(tiled, model, info, cfg)
    assert not stats["skipped"]
    np.testing.assert_allclose(store.open_store(tiled)["probabilities"][:], full, atol=1e-6)


def test_untiled_store_is_refused(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    model, info = small_model(tmp_path, 3)
    with pytest.raises(StoreError, match="tile"):
        infer_store(tmp_path / "empty.zarr", model, info)


def test_precision_resolution():
    import torch

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
