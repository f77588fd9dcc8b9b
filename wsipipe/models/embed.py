"""Patch embeddings into the store: ``features`` (N, D) float16, one row per patch.

The embed stage is inference with the classification layer taken off: the same background
reading and batching (:func:`wsipipe.models.inference._host_batches` and ``_prefetch``), the
same out-of-memory back-off and autocast, the same per-chunk done flags. So it resumes the
way inference does: a killed run recomputes only the chunks it had not flagged, and ends with
the features an uninterrupted run writes (eval mode: a patch's features do not depend on its
batch). An encoder is named by its identity (kind, arch, weights sha256, feature dim), which
the stage entry records; features of another encoder, or of re-tiled patches, are recomputed.

Which encoder to load from a ``--encoder`` spec is decided above this layer
(:mod:`wsipipe.learn.encoders`): this module takes any module mapping (B, 3, H, W) to (B, D).

    encoder, encoder_id = load_encoder_spec("runs/simclr")
    embed_store("slide.zarr", encoder, encoder_id, cfg.inference)
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Generator
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from wsipipe.config import InferenceConfig
from wsipipe.errors import StoreError
from wsipipe.models import fused
from wsipipe.models.inference import (
    BatchLimit, Progress, _autocast, _host_batches, _prefetch, _stored_units, _units, device_batch,
    forward_with_backoff, prepare_model, resolve_device, resolve_precision,
)
from wsipipe.tiles import store
from wsipipe.tiles.tiling import reads_from_slide, slide_source

STAGE = store.STAGE_EMBED
# What an encoder identity must name: features of two encoders agreeing on these are interchangeable.
IDENTITY_KEYS = ("kind", "arch", "sha256", "dim")


def embed_identity(group: zarr.Group, encoder_id: dict[str, Any]) -> dict[str, Any]:
    """What a store's features depend on: its tiled patches and the encoder."""
    tile = store.stage_entry(group, store.STAGE_TILE) or {}
    return {"tile": tile.get("identity"), "encoder": {k: encoder_id.get(k) for k in IDENTITY_KEYS}}


def has_features(store_path, encoder_id: dict[str, Any]) -> bool:
    """True when the store holds complete features of this encoder over its current patches."""
    group = store.open_store(store_path, mode="r")
    return store.is_complete(group, STAGE, embed_identity(group, encoder_id))


def stored_encoder(group: zarr.Group) -> dict[str, Any] | None:
    """The encoder identity of a store's complete features (with where it was loaded from), or None."""
    entry = store.stage_entry(group, STAGE) or {}
    if not entry.get("complete") or store.FEATURES not in group:
        return None
    return {**(entry.get("identity") or {}).get("encoder", {}), **(entry.get("source") or {})}


def _features(out: torch.Tensor) -> torch.Tensor:
    # Encoders may keep spatial or token axes (B, D, 1, 1); a feature vector per patch.
    return out.float().flatten(1)


def embed_store(
    store_path, encoder: nn.Module, encoder_id: dict[str, Any], cfg: InferenceConfig | None = None,
    progress: Progress | None = None, slide_path=None, readers: int | None = None,
) -> dict:
    """Write ``features`` (N, D) float16 for every patch of a tiled store.

    ``encoder_id``: ``kind``, ``arch``, ``sha256`` and ``dim`` (the feature dimension); any other
    keys (``spec``, ``weights``: where it was loaded from) are recorded beside them, not compared.
    Complete features of the same encoder over the same patches are left as they are; an
    interrupted run resumes; another encoder recomputes. A store without stored patches reads
    them from the slide (``slide_path``, else the path recorded at tiling), as inference does.
    Returns ``{"skipped", "n", "computed", "dim", "seconds", "images_per_s"}``."""
    cfg = cfg or InferenceConfig()
    t0 = time.perf_counter()
    missing = [k for k in IDENTITY_KEYS if encoder_id.get(k) in (None, "")]
    if missing:
        raise ValueError(f"encoder identity lacks {missing}")
    dim = int(encoder_id["dim"])
    group = store.open_store(store_path, mode="r+")
    store.require_complete(group, store.STAGE_TILE, store_path)
    identity = embed_identity(group, encoder_id)
    from_slide = reads_from_slide(group)
    patches = None if from_slide else store.array(group, store.PATCHES)
    n = int(store.array(group, store.COORDS).shape[0] if patches is None else patches.shape[0])
    if store.is_complete(group, STAGE, identity):
        return {"skipped": True, "n": n, "computed": 0, "dim": dim, "seconds": 0.0, "images_per_s": None}

    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    source = slide_source(group, store_path, slide_path) if from_slide else None
    net = prepare_model(encoder, device)
    chunk = fused.chunk_patches(group) if patches is None else max(1, int(patches.chunks[0]))
    slices = store.chunk_slices(n, chunk)
    feats, flags = _outputs(group, identity, n, dim, chunk, len(slices))
    todo = [i for i in store.pending_chunks(flags) if i < len(slices)]
    units = _units(todo, slices, per_unit=-(-cfg.batch_size // chunk))
    computed = sum(u.stop - u.start for u in units)
    done = n - computed
    if progress:
        progress(done, n)

    limit = BatchLimit(cfg.batch_size)
    waiting = collections.deque(units)
    outs: list[torch.Tensor] = []
    buffered = 0
    stream: Generator[np.ndarray, None, None]
    if source is not None:
        pending = [i for u in units for i in range(u.first, u.last)]
        stream = fused.read_chunks(source, group, slices, pending, readers)
    else:
        stream = _stored_units(store.array(group, store.PATCHES), units, store_path)
    batches = _prefetch(_host_batches(stream, cfg.batch_size, device), cfg.prefetch_batches)
    with contextlib.closing(stream), contextlib.closing(batches), torch.inference_mode(), _autocast(device, dtype):
        for host in batches:
            out = forward_with_backoff(net, device_batch(host, device), limit, output=_features)
            if out.shape[1] != dim:
                raise StoreError(store_path, f"the encoder gives {out.shape[1]} features per patch, its identity says {dim}")
            outs.append(out)
            buffered += len(out)
            while waiting and buffered >= waiting[0].stop - waiting[0].start:
                unit = waiting.popleft()
                size = unit.stop - unit.start
                flat = torch.cat(outs)
                feats[unit.start : unit.stop] = flat[:size].cpu().numpy().astype(np.float16)
                flags[unit.first : unit.last] = True  # after the data: a flagged chunk is on disk
                outs, buffered = ([flat[size:]] if len(flat) > size else []), len(flat) - size
                done += size
                if progress:
                    progress(done, n)

    if waiting or any(i < len(slices) for i in store.pending_chunks(flags)):
        raise StoreError(store_path, "embedding left chunks unwritten; rerun to resume")
    if source is not None:
        fused.finish(group, source, n)  # as inference: the corrupt-tile policy, and the slide's tiles let go
    seconds = time.perf_counter() - t0
    extra = {k: v for k, v in encoder_id.items() if k not in IDENTITY_KEYS}
    store.set_stage(
        group, STAGE, identity, True, seconds=round(seconds, 3), n_patches=n, computed=computed, device=str(device),
        precision=str(dtype).removeprefix("torch.") if dtype else "fp32", batch_size=limit.size,
        oom_backoffs=limit.backoffs, patches_from="store" if source is None else "slide", source=extra,
    )
    return {"skipped": False, "n": n, "computed": computed, "dim": dim, "seconds": seconds,
            "images_per_s": computed / seconds if computed and seconds else None}


def _outputs(
    group: zarr.Group, identity: dict[str, Any], n: int, dim: int, chunk: int, n_chunks: int
) -> tuple[zarr.Array, zarr.Array]:
    """The features array and its per-chunk done flags: the previous run's to resume, or fresh."""
    entry = store.stage_entry(group, STAGE) or {}
    old = store.optional_array(group, store.FEATURES)
    if entry.get("identity") == identity and old is not None and old.shape == (n, dim) and old.chunks[0] == chunk:
        return old, store.progress_array(group, STAGE, n_chunks)
    # As in inference: forget the old flags, claim the stage with the new identity, then replace the array.
    flags = store.progress_array(group, STAGE, n_chunks, reset=True)
    store.set_stage(group, STAGE, identity, False)
    feats = group.create_array(
        store.FEATURES, shape=(n, dim), chunks=(chunk, dim), dtype="float16", fill_value=float("nan"),
        overwrite=True, dimension_names=["patch", "feature"], attributes={"encoder": identity["encoder"]},
    )
    return feats, flags


def read_features(store_path, encoder_id: dict[str, Any] | None = None) -> np.ndarray:
    """A store's complete features as float32 (N, D); with ``encoder_id``, only this encoder's."""
    group = store.open_store(store_path, mode="r")
    found = stored_encoder(group)
    if found is None:
        raise StoreError(store_path, "no complete patch features in this store; run `wsipipe embed` first")
    if encoder_id is not None and not store.is_complete(group, STAGE, embed_identity(group, encoder_id)):
        raise StoreError(store_path, f"its features come from another encoder ({found.get('arch')}, "
                         f"{str(found.get('sha256'))[:12]}); rerun `wsipipe embed` with the model's encoder")
    return np.asarray(store.array(group, store.FEATURES)[:], dtype=np.float32)
