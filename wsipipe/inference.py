"""Batched patch classification from a slide's Zarr store.

A background thread reads Zarr chunks, converts them to normalised float tensors and
queues them, so the model never waits on I/O or decode; the main thread only runs
the model. The same code serves CPU and CUDA: on CUDA the batches are pinned and
copied asynchronously, and both use channels_last and autocast where it helps.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from wsipipe import store
from wsipipe.config import InferenceConfig
from wsipipe.errors import StoreError
from wsipipe.model import IMAGENET_MEAN, IMAGENET_STD, ModelInfo

STAGE = "infer"
Progress = Callable[[int, int], None]


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32.

    'auto' picks bf16 on CUDA GPUs that support it and on CPUs with native bf16
    (AVX512-BF16 / AMX), where ResNet18 runs ~4x faster than fp32; elsewhere fp32."""
    if spec == "fp32":
        return None
    if spec == "bf16":
        return torch.bfloat16
    if spec == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def to_tensor(patches: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float32, channels_last, on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)
    if device.type == "cuda":
        # Copy the uint8 batch (4x smaller than float) and normalise on the GPU.
        t = t.pin_memory().to(device, non_blocking=True)
    t = t.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=t.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=t.device).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous(memory_format=torch.channels_last)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    return model.eval().to(device).to(memory_format=torch.channels_last)


@torch.inference_mode()
def predict_patches(
    model: nn.Module, patches: np.ndarray, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> np.ndarray:
    """Probabilities for in-memory patches: (N,) for a 1-logit model, (N, C) otherwise."""
    device = device or next(model.parameters()).device
    x = to_tensor(patches, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return _probabilities(model(x)).cpu().numpy().astype(np.float32)


def _prefetch(batches: Iterator, depth: int) -> Iterator:
    """Run ``batches`` in a background thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, name="wsipipe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def infer_identity(group, info: ModelInfo) -> dict:
    tile = store.stage_entry(group, "tile") or {}
    return {"tile": tile.get("identity"), "model_sha256": info.sha256, "arch": info.arch, "num_classes": info.num_classes}


def infer_store(
    store_path, model: nn.Module, info: ModelInfo, cfg: InferenceConfig | None = None, progress: Progress | None = None
) -> dict:
    """Classify every patch in the store; writes ``probabilities`` and marks the stage complete.

    Skips a store already classified by the same model; resumes an interrupted run
    chunk by chunk; recomputes everything when the model or the patches changed."""
    cfg = cfg or InferenceConfig()
    t0 = time.perf_counter()
    group = store.open_store(store_path, mode="r+")
    store.require_complete(group, "tile", store_path)
    identity = infer_identity(group, info)
    patches = group["patches"]
    n = patches.shape[0]
    if store.is_complete(group, STAGE, identity):
        return {"skipped": True, "n": n, "seconds": 0.0, "images_per_s": None}

    chunk = patches.chunks[0]
    slices = store.chunk_slices(n, chunk)
    previous = store.stage_entry(group, STAGE)
    fresh = previous is None or previous.get("identity") != identity or "probabilities" not in group
    shape = (n,) if info.num_classes == 1 else (n, info.num_classes)
    if fresh:
        probs = group.create_array(
            "probabilities", shape=shape, chunks=(chunk,) + shape[1:], dtype="float32",
            fill_value=float("nan"), overwrite=True,
            attributes={"model_sha256": info.sha256, "arch": info.arch, "num_classes": info.num_classes},
        )
        store.set_stage(group, STAGE, identity, False)
    else:
        probs = group["probabilities"]
    flags = store.progress_array(group, STAGE, len(slices), reset=fresh)
    todo = store.pending_chunks(flags) if n else []

    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    net = prepare_model(model, device)
    done = n - sum(slices[i].stop - slices[i].start for i in todo)
    if progress:
        progress(done, n)

    def batches() -> Iterator:
        # One Zarr chunk at a time (decoded in this thread), split into model batches.
        for i in todo:
            data = patches[slices[i]]
            for b in range(0, len(data), cfg.batch_size):
                part = data[b : b + cfg.batch_size]
                yield i, b, len(data), to_tensor(part, torch.device("cpu")) if device.type == "cpu" else part

    pending: dict[int, list] = {}
    for i, b, length, batch in _prefetch(batches(), cfg.prefetch_batches):
        x = batch if isinstance(batch, torch.Tensor) else to_tensor(batch, device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = _probabilities(net(x)).cpu().numpy().astype(np.float32)
        parts = pending.setdefault(i, [])
        parts.append((b, out))
        if b + len(out) >= length:
            sl = slices[i]
            probs[sl] = np.concatenate([p for _, p in sorted(parts, key=lambda t: t[0])])
            flags[i] = True  # after the data: a flagged chunk is always on disk
            del pending[i]
            done += sl.stop - sl.start
            if progress:
                progress(done, n)

    if n and store.pending_chunks(flags):
        raise StoreError(store_path, "inference left chunks unwritten; rerun to resume")
    seconds = time.perf_counter() - t0
    store.set_stage(
        group, STAGE, identity, True, seconds=round(seconds, 3), n_patches=n,
        device=str(device), precision=str(dtype).replace("torch.", "") if dtype else "fp32",
        model={"sha256": info.sha256, "arch": info.arch, "path": str(info.path) if info.path else None},
    )
    return {"skipped": False, "n": n, "seconds": seconds, "images_per_s": (n / seconds) if seconds else None}
