"""The fused tile -> infer path: patches go from the slide straight into the model.

A store tiled with ``tile.store_patches: false`` holds the plan (coords, grid, tissue fraction,
thumbnail, tissue mask) but no patches. Its infer stage reads each pending chunk from the slide
on a pool of reader threads (JPEG decoding in libjpeg-turbo and the tile reductions and QC in
OpenCV and numpy release the GIL, so the threads decode in parallel), writes the chunk's QC measures and corrupt
flags into the store (what the tiler writes when it stores patches) and hands the uint8
patches on, in chunk order, to :func:`wsipipe.models.inference.infer_store`'s batching. No
patch is compressed, written or read back: on a GPU box the CPUs only decode and assemble.

Resuming is the infer stage's: a chunk's QC and corrupt flags are written before its
probabilities, and its done flag after them, so a rerun reads again exactly the chunks not
flagged done.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Generator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import zarr

from wsipipe.errors import SlideReadError
from wsipipe.slides.slide import cached_slide, forget_cached_slide
from wsipipe.tiles import qc, store
from wsipipe.tiles.tiling import SlideSource, check_corrupt, corrupt_report, read_chunk


def chunk_patches(group: zarr.Group) -> int:
    """Patches per chunk of a store without stored patches: the chunking of its per-patch tile arrays."""
    return max(1, int(store.array(group, store.CORRUPT).chunks[0]))


def read_chunks(
    source: SlideSource, group: zarr.Group, slices: list[slice], chunks: list[int], readers: int | None = None,
    decode_device: torch.device | None = None,
) -> Generator[np.ndarray, None, None]:
    """The patches of ``chunks`` (indices into ``slices``), in that order, read from the slide on
    ``readers`` threads (default: one per core) with up to two chunks per thread in flight. Each
    chunk's QC measures and corrupt flags are in the store before its patches are yielded.
    Closing the iterator cancels the reads not started and waits for those running.

    ``decode_device`` (``tile.decode: device``): the chunk's JPEG tiles are decoded and assembled
    there in one batch (:mod:`wsipipe.models.gpudecode`), and the patches come back to the host
    once, for QC and the model's pinned batches; a chunk whose tiles do not decode is read again
    on the CPU, salvaging what reads."""
    workers = max(1, readers or os.cpu_count() or 1)
    grid_ij = np.asarray(store.array(group, store.GRID_IJ)[:]) if chunks else np.zeros((0, 2), np.int32)
    measures = store.optional_array(group, store.QC_MEASURES)
    corrupt = store.array(group, store.CORRUPT)

    def read(index: int) -> np.ndarray:
        sl = slices[index]
        patches = _read_on_device(source, grid_ij[sl], decode_device) if decode_device is not None else None
        bad = None
        if patches is None:
            patches, bad = read_chunk(source.path, source.mpp_override, source.spec, grid_ij[sl], source.fast)
        if bad is not None:  # like the tiler: flags only where a tile did not decode (the array starts all False)
            corrupt[sl] = bad
        qc.write_chunk(measures, sl, patches)
        return patches

    todo = iter(chunks)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsipipe-read")
    # Submitted in chunk order, so the threads go down the slide together and the tile rows one
    # chunk decodes are still in the reader's cache for the next.
    pending: collections.deque[Future[np.ndarray]] = collections.deque(
        pool.submit(read, i) for i in itertools.islice(todo, 2 * workers)
    )
    try:
        while pending:
            patches = pending.popleft().result()
            following = next(todo, None)
            if following is not None:
                pending.append(pool.submit(read, following))
            yield patches
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_on_device(source: SlideSource, grid_ij: np.ndarray, device: torch.device) -> np.ndarray | None:
    """One chunk through the device decoder, as (N, P, P, 3) uint8 on the host; None when a tile
    did not decode (the caller's CPU read then finds and flags the corrupt patches)."""
    from wsipipe.models.gpudecode import read_patches_on_device

    try:
        slide = cached_slide(source.path, source.mpp_override)
        on_device = read_patches_on_device(slide, source.spec, grid_ij, device)
    except (SlideReadError, RuntimeError, OSError):
        return None
    return on_device.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def finish(group: zarr.Group, source: SlideSource, n: int) -> None:
    """After every chunk is classified: apply ``tile.on_corrupt_tile`` to the corrupt patches found
    (a SlideReadError naming them in mode ``fail``), record them in the tile stage's entry as the
    tiler would have (summary.json lists them from there), and drop the slide's decoded tiles."""
    try:
        report = corrupt_report(group)
        check_corrupt(source.path, report, n, source.on_corrupt_tile)
        entry = dict(store.stage_entry(group, store.STAGE_TILE) or {})
        if entry and entry.get("corrupt_patches") != report:
            identity, complete = entry.pop("identity"), entry.pop("complete")
            store.set_stage(group, store.STAGE_TILE, identity, complete, **{**entry, "corrupt_patches": report})
    finally:
        forget_cached_slide(source.path, source.mpp_override)

