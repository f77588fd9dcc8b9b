"""Inference into real Zarr stores on disk, built by hand the way `wsipipe tile` lays them out."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from wsipipe.tiles import store
from wsipipe.config import InferenceConfig
from wsipipe.errors import ConfigError, StoreError
from wsipipe.models.inference import _prefetch, infer_store, predict_patches, resolve_device, resolve_precision
from wsipipe.models.model import build_model, save_weights

N, SIZE, CHUNK = 44, 32, 8  # 6 chunks, the last one partial
CPU = torch.device("cpu")
FP32 = InferenceConfig(batch_size=5, precision="fp32", device="cpu", prefetch_batches=2)  # batches straddle chunks


def make_store(path, n=N, chunk=CHUNK, seed=0):
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("patches", data=rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
                       chunks=(chunk, SIZE, SIZE, 3))
    group.create_array("coords", data=np.arange(2 * n, dtype=np.int64).reshape(n, 2), chunks=(max(n, 1), 2))
    store.set_stage(group, "tile", {"slide": "hand-built", "config": str(seed)}, True, n_patches=n)
    return path


def small_model(tmp_path, seed, num_classes=1):
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes).eval()
    info = save_weights(model, tmp_path / f"m{seed}-{num_classes}.safetensors", "resnet18", num_classes)
    return model, info


def expected(path, model):
    return predict_patches(model, store.open_store(path)["patches"][:], CPU, None)


def mtimes(path):
    return {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_probabilities_match_direct_prediction_and_rerun_is_noop(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 0)
    seen = []
    stats = infer_store(path, model, info, FP32, progress=lambda d, n: seen.append((d, n)))
    assert (stats["skipped"], stats["n"], stats["computed"]) == (False, N, N)
    assert seen[0] == (0, N) and seen[-1] == (N, N) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    group = store.open_store(path)
    probs = group["probabilities"]
    assert probs.shape == (N,) and probs.dtype == np.float32 and probs.chunks == (CHUNK,)
    np.testing.assert_allclose(probs[:], expected(path, model), atol=1e-6)
    assert probs.attrs["model_sha256"] == info.sha256 and probs.attrs["arch"] == "resnet18"
    entry = store.stage_entry(group, "infer")
    assert entry["complete"] and entry["identity"] == {
        "tile": store.stage_entry(group, "tile")["identity"], "model_sha256": info.sha256, "num_classes": 1,
        "arch": "resnet18",
    }
    assert entry["model"]["sha256"] == info.sha256 and entry["precision"] == "fp32"

    before = mtimes(path)
    again = infer_store(path, model, info, FP32, progress=lambda d, n: seen.append("called"))
    assert again["skipped"] and again["computed"] == 0 and seen[-1] != "called"
    assert mtimes(path) == before  # not one chunk, flag or attribute rewritten


def test_multiclass_shape_and_changed_model_recomputes(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    first, info1 = small_model(tmp_path, 1)
    infer_store(path, first, info1, FP32)
    model, info = small_model(tmp_path, 2, num_classes=3)
    stats = infer_store(path, model, info, FP32)
    assert not stats["skipped"] and stats["computed"] == N
    group = store.open_store(path)
    probs = group["probabilities"][:]
    assert probs.shape == (N, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, expected(path, model), atol=1e-6)
    assert group["probabilities"].attrs["model_sha256"] == info.sha256
    assert store.stage_entry(group, "infer")["identity"]["model_sha256"] == info.sha256


def test_retiled_patches_recompute(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 0)
    infer_store(path, model, info, FP32)
    make_store(path, seed=1)  # new pixels, new tile identity, same model
    assert infer_store(path, model, info, FP32)["computed"] == N
    np.testing.assert_allclose(store.open_store(path)["probabilities"][:], expected(path, model), atol=1e-6)


class FailsAfter(nn.Module):
    """A real model that dies on its ``n``-th batch, like a killed or crashed run."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return self.model(x)


def test_interrupted_run_resumes_only_missing_chunks(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 3)
    cfg = InferenceConfig(batch_size=8, precision="fp32", device="cpu")  # one chunk per batch
    with pytest.raises(RuntimeError, match="simulated crash") as crash:
        infer_store(path, FailsAfter(model, 3), info, cfg)
    # The reader thread stopped with the error, though the traceback still holds its generator.
    assert crash.tb is not None and not any(t.name == "wsipipe-prefetch" for t in threading.enumerate())
    group = store.open_store(path, mode="r+")
    assert not store.is_complete(group, "infer")
    assert group["_progress/infer"][:].tolist() == [True, True, False, False, False, False]
    # Mark what the first run wrote: if the resume recomputed chunk 0, this would vanish.
    group["probabilities"][0:CHUNK] = 0.25
    seen = []
    stats = infer_store(path, model, info, cfg, progress=lambda d, n: seen.append(d))
    assert stats["computed"] == N - 2 * CHUNK and seen[0] == 2 * CHUNK
    probs, want = store.open_store(path)["probabilities"][:], expected(path, model)
    assert (probs[:CHUNK] == 0.25).all()
    np.testing.assert_allclose(probs[CHUNK:], want[CHUNK:], atol=1e-6)
    assert store.is_complete(store.open_store(path), "infer")


def test_resume_from_manually_cleared_flags(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 4)
    infer_store(path, model, info, FP32)
    group = store.open_store(path, mode="r+")
    want = group["probabilities"][:]
    group["probabilities"][2 * CHUNK : 4 * CHUNK] = np.nan
    group["_progress/infer"][2:4] = False
    store.set_stage(group, "infer", store.stage_entry(group, "infer")["identity"], False)
    assert infer_store(path, model, info, FP32)["computed"] == 2 * CHUNK
    np.testing.assert_allclose(store.open_store(path)["probabilities"][:], want, atol=1e-6)


def test_damaged_chunk_is_a_store_error_and_earlier_chunks_stay_done(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 5)
    chunk_file = path / "patches" / "c" / "3" / "0" / "0" / "0"
    chunk_file.write_bytes(b"not zstd at all")
    with pytest.raises(StoreError, match=r"patches\[24:32\]"):
        infer_store(path, model, info, InferenceConfig(batch_size=8, precision="fp32", device="cpu"))
    assert store.open_store(path)["_progress/infer"][:].tolist()[:3] == [True, True, True]


def test_empty_store_completes(tmp_path):
    path = make_store(tmp_path / "empty.zarr", n=0)
    model, info = small_model(tmp_path, 6)
    seen = []
    stats = infer_store(path, model, info, FP32, progress=lambda d, n: seen.append((d, n)))
    assert (stats["n"], stats["computed"], seen) == (0, 0, [(0, 0)])
    group = store.open_store(path)
    assert group["probabilities"].shape == (0,) and store.is_complete(group, "infer")
    assert infer_store(path, model, info, FP32)["skipped"]
    assert predict_patches(model, np.zeros((0, SIZE, SIZE, 3), np.uint8), CPU).shape == (0,)


def test_untiled_or_missing_store_is_refused(tmp_path):
    model, info = small_model(tmp_path, 7)
    group = zarr.open_group(str(tmp_path / "untiled.zarr"), mode="w")
    store.set_stage(group, "tile", {"slide": "x"}, False)  # tiling started, never finished
    with pytest.raises(StoreError, match="tile"):
        infer_store(tmp_path / "untiled.zarr", model, info)
    with pytest.raises(StoreError, match="not a wsipipe Zarr store"):
        infer_store(tmp_path / "nothing.zarr", model, info)


def test_device_and_precision_resolution():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="inference.device='gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA device"):
            resolve_device("cuda:0")
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", CPU) is (torch.bfloat16 if native else None)


def test_bf16_autocast_stays_close_to_fp32(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 8)
    infer_store(path, model, info, InferenceConfig(batch_size=16, precision="bf16", device="cpu"))
    group = store.open_store(path)
    assert store.stage_entry(group, "infer")["precision"] == "bfloat16"
    np.testing.assert_allclose(group["probabilities"][:], expected(path, model), atol=0.05)


def test_compiled_model_gives_the_same_probabilities_from_one_graph(tmp_path):
    """inference.compile: 44 patches in batches of 16 (the last one partial, padded) compile one
    graph, and the probabilities equal the eager model's."""
    import torch._dynamo

    path = make_store(tmp_path / "s.zarr")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    info = save_weights(model, tmp_path / "tiny.safetensors", "tiny", 1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    infer_store(path, model, info, InferenceConfig(batch_size=16, precision="fp32", device="cpu", compile=True))
    group = store.open_store(path)
    assert store.stage_entry(group, "infer")["compiled"] is True
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    np.testing.assert_allclose(group["probabilities"][:], expected(path, model), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 9)
    want = expected(path, model)
    infer_store(path, model, info, InferenceConfig(batch_size=16, precision="fp32", device="cuda"))
    np.testing.assert_allclose(store.open_store(path)["probabilities"][:], want, atol=1e-3)


def test_prefetch_is_bounded_and_passes_errors_through():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    it = _prefetch(items(), depth=3)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(produced) <= 1 + 3 + 1  # consumed + queued + one in the producer's hand
    it.close()  # a consumer stopping early stops the producer
    assert not any(t.name == "wsipipe-prefetch" for t in threading.enumerate())

    def broken():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in _prefetch(broken(), depth=2):
            got.append(item)
    assert got == [1]


def test_bad_device_fails_before_touching_the_store(tmp_path):
    path = make_store(tmp_path / "s.zarr")
    model, info = small_model(tmp_path, 10)
    infer_store(path, model, info, FP32)
    before = mtimes(path)
    other, other_info = small_model(tmp_path, 11)
    with pytest.raises(ConfigError):
        infer_store(path, other, other_info, InferenceConfig(device="gpu"))
    assert mtimes(path) == before
