"""Tiling a slide into a Zarr store of patches, in parallel with Dask.

The grid is pure arithmetic (:func:`plan_grid`); the I/O is one Dask task per
Zarr chunk of ``chunk_patches`` patches. Each task reads the patches of its chunk
with one ``read_region`` per horizontal run of neighbouring patches (not one call
per patch, which is what dominates peers' extraction time), writes its chunk while it
measures the chunk's QC, then sets the chunk's done flag. Memory is bounded by
(workers x chunk), never by the slide. A rerun skips finished chunks; the stage is
marked complete last.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any
from pathlib import Path
from collections.abc import Callable

import dask
import dask.threaded
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from dask.callbacks import Callback
from openslide import OpenSlideError
from PIL import Image

from wsipipe import __version__

from wsipipe.tiles import qc, store
from wsipipe.config import PipelineConfig, TileConfig
from wsipipe.errors import NoTissueError, SlideOpenError, SlideReadError, StoreError
from wsipipe.locks import remove_stale_temps
from wsipipe.slides.resample import integer_factor
from wsipipe.slides.slide import Slide, cached_slide, forget_cached_slide, open_slide, open_slide_for
from wsipipe.slides.tissue import detect_tissue, patch_tissue_fraction
from wsipipe.tiles.zarrjpeg import JpegPatchCodec

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (patches done, patches total)


@dataclass(frozen=True)
class GridSpec:
    """Where the patches are. All ``*_l0`` values are level-0 pixels."""

    slide_width: int
    slide_height: int
    slide_mpp: float
    mpp: float  # actual patch resolution (µm/px) after snapping to a level
    patch_size: int  # px at ``mpp``
    stride: int  # px at ``mpp``
    scale: float  # level-0 px per patch px
    level: int  # pyramid level read from
    level_downsample: float
    rows: int
    cols: int
    resample: str = "area"  # filter when needs_resize: area or lanczos (see TileConfig.resample)

    @property
    def patch_size_l0(self) -> float:
        return self.patch_size * self.scale

    @property
    def stride_l0(self) -> float:
        return self.stride * self.scale

    @property
    def upsample(self) -> float:
        """How many times the patches are enlarged from the slide's pixels (1.0: not at all).
        Above 1 the slide is coarser than the target mpp and the patches are blurred by it."""
        return 1.0 / self.scale if self.scale < 1.0 else 1.0

    @property
    def needs_resize(self) -> bool:
        return self.scale != self.level_downsample

    def cell_xy(self, grid_ij: np.ndarray) -> np.ndarray:
        """Level-0 (x, y) top-left of grid cells given as (row, col)."""
        grid_ij = np.asarray(grid_ij, dtype=np.int64).reshape(-1, 2)
        return np.rint(grid_ij[:, ::-1] * self.stride_l0).astype(np.int64)

    def attrs(self) -> dict:
        d = asdict(self)
        d.update(
            patch_size_l0=self.patch_size_l0,
            stride_l0=self.stride_l0,
            grid_shape=[self.rows, self.cols],
            upsample=round(self.upsample, 4),
            origin_l0=[0, 0],
        )
        return d


def plan_grid(
    width: int,
    height: int,
    slide_mpp: float,
    level_downsamples: tuple[float, ...],
    mpp: float,
    patch_size: int,
    stride: int,
    tolerance: float = 0.05,
    resample: str = "area",
) -> GridSpec:
    """Grid of patches at ``mpp`` over a ``width x height`` level-0 slide.

    If a pyramid level is within ``tolerance`` of the asked resolution we use it as is
    (no resampling; the reported ``mpp`` is that level's true resolution). Otherwise we
    read the coarsest level that is still finer than asked, and resample. The grid covers the whole slide: the last row/column may run
    past the edge and is padded with background, so no tissue at the edge is lost."""
    want = mpp / slide_mpp
    scale, level = want, 0
    for lvl, ds in enumerate(level_downsamples):
        if abs(ds / want - 1.0) <= tolerance:
            scale, level = float(ds), lvl
            break
        if ds <= want:
            level = lvl
    if want < 1.0 and abs(want - 1.0) > tolerance:
        log.warning("asked for %.4g µm/px, finer than the slide's %.4g: upsampling", mpp, slide_mpp)
    patch_l0, stride_l0 = patch_size * scale, stride * scale

    def count(extent: int) -> int:
        return 1 if extent <= patch_l0 else math.ceil((extent - patch_l0) / stride_l0) + 1

    return GridSpec(
        slide_width=width,
        slide_height=height,
        slide_mpp=slide_mpp,
        mpp=slide_mpp * scale,
        patch_size=patch_size,
        stride=stride,
        scale=scale,
        level=level,
        level_downsample=float(level_downsamples[level]),
        rows=count(height),
        cols=count(width),
        resample=resample,
    )


def select_patches(
    spec: GridSpec, tissue_mask: np.ndarray, mask_downsample: float, min_tissue: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid cells whose tissue fraction is at least ``min_tissue``, in row-major order.

    Returns (grid_ij (N,2) int32, coords (N,2) int64 level-0 x,y, tissue_fraction (N,) float32)."""
    ii, jj = np.meshgrid(np.arange(spec.rows), np.arange(spec.cols), indexing="ij")
    grid_ij = np.stack([ii.ravel(), jj.ravel()], axis=1)
    xy = spec.cell_xy(grid_ij)
    frac = patch_tissue_fraction(tissue_mask, mask_downsample, xy, spec.patch_size_l0)
    keep = frac >= min_tissue  # min_tissue = 0 keeps every cell (whole-slide grid)
    return grid_ij[keep].astype(np.int32), xy[keep], frac[keep]


def read_patches(
    slide: Slide, spec: GridSpec, grid_ij: np.ndarray, fast: bool = True, out: np.ndarray | None = None
) -> np.ndarray:
    """Patches (N, P, P, 3) uint8 for the given grid cells (row-major order expected).

    Neighbouring cells of one grid row are read with a single region read and cut
    apart, which is pixel-identical to one ``read_region`` per patch at level 0.
    ``fast`` decodes TIFF tiles directly where possible (same pixels, see tiffread).
    ``out`` (an (N, P, P, 3) uint8 array) is filled instead of a new array."""
    p = spec.patch_size
    if out is None:
        out = np.empty((len(grid_ij), p, p, 3), dtype=np.uint8)
    for start, end in row_runs(grid_ij, spec):
        _read_run(slide, spec, grid_ij[start:end], out[start:end], fast)
    return out


def row_runs(grid_ij: np.ndarray, spec: GridSpec) -> list[tuple[int, int]]:
    """[start, end) index ranges of neighbouring cells of one grid row (cells that still share
    pixels or touch): each is read with one region read."""
    gap = max(1, math.ceil(spec.patch_size / spec.stride))
    runs, start = [], 0
    while start < len(grid_ij):
        end = start + 1
        while end < len(grid_ij) and grid_ij[end, 0] == grid_ij[start, 0] and grid_ij[end, 1] - grid_ij[end - 1, 1] <= gap:
            end += 1
        runs.append((start, end))
        start = end
    return runs


def _read_run(slide: Slide, spec: GridSpec, cells: np.ndarray, out: np.ndarray, fast: bool = True) -> None:
    """One row run of patches: one read at the chosen level, then slicing (exact level) or
    resampling. Reads are in the level's own pixel grid."""
    p = spec.patch_size
    row, c0, c1 = int(cells[0, 0]), int(cells[0, 1]), int(cells[-1, 1])
    factor = area_factor(spec)
    if not spec.needs_resize or factor:
        # Patches are integer offsets inside the level's pixel grid, area-reduced by ``factor``
        # (1: the level as is): the tile reader reduces each tile once, right after decoding.
        step = spec.stride if not factor else round(spec.stride_l0 / spec.level_downsample) // factor
        factor = factor or 1
        lx, ly = c0 * step, row * step
        if fast and slide.fast_reader(spec.level) is not None:  # decoded tiles straight into each patch
            for k, col in enumerate(cells[:, 1]):
                slide.read_level(spec.level, int(col) * step, ly, p, p, out=out[k], factor=factor)
            return
        region = slide.read_level(spec.level, lx, ly, (c1 - c0) * step + p, p, fast=fast, factor=factor)
        for k, col in enumerate(cells[:, 1]):
            off = (int(col) - c0) * step
            out[k] = region[:, off : off + p]
        return
    # Resampled by a factor that is not an integer on the level's grid (or with Lanczos):
    # read the covering region once at the chosen level, crop each patch with a fractional
    # box (from the patch's stored integer level-0 coords) and resize with an antialiasing
    # filter: Lanczos, or an area average (PIL's box filter: exact pixel-area weights).
    ds = spec.level_downsample
    xy = spec.cell_xy(cells)
    edge_l0 = spec.patch_size_l0
    lx0, ly0 = math.floor(xy[0, 0] / ds), math.floor(xy[0, 1] / ds)
    lx1, ly1 = math.ceil((xy[-1, 0] + edge_l0) / ds), math.ceil((xy[0, 1] + edge_l0) / ds)
    region = slide.read_level(spec.level, lx0, ly0, lx1 - lx0, ly1 - ly0, fast=fast)
    img = Image.fromarray(np.ascontiguousarray(region))
    resample = Image.Resampling.BOX if spec.resample == "area" else Image.Resampling.LANCZOS
    top, edge = xy[0, 1] / ds - ly0, edge_l0 / ds
    for k in range(len(cells)):
        left = xy[k, 0] / ds - lx0
        out[k] = np.asarray(img.resize((p, p), resample, box=(left, top, left + edge, top + edge)))


def area_factor(spec: GridSpec) -> int | None:
    """The integer reduction from the read level to the patches when area resampling is an
    exact block average on the level's pixel grid: the level's downsample is a whole number,
    the patch/level ratio an integer >= 2, and every patch corner (a multiple of the level-0
    stride) falls on a block boundary. None otherwise (then patches are resampled one by one)."""
    if spec.resample != "area" or not spec.needs_resize:
        return None
    ds = spec.level_downsample
    factor = integer_factor(spec.scale / ds)
    if factor is None or ds != round(ds):
        return None
    block_l0 = round(ds) * factor
    stride_l0, size_l0 = spec.stride_l0, spec.patch_size_l0
    if stride_l0 != round(stride_l0) or round(stride_l0) % block_l0 or size_l0 != round(size_l0):
        return None
    return factor


def _tile_chunk(
    slide_path: str, slide_mpp: float | None, spec: GridSpec, store_path: str, store_token: str, index: int,
    sl: slice, grid_ij: np.ndarray, fast: bool,
) -> int:
    """Dask task: read one chunk of patches and write it. Runs on any worker."""
    arrays = _chunk_arrays(store_path, store_token)
    patches, corrupt = read_chunk(slide_path, slide_mpp, spec, grid_ij, fast, out=_chunk_buffer(len(grid_ij), spec.patch_size))
    if corrupt is not None:
        arrays.corrupt[sl] = corrupt
    # The patch write (compression and file I/O, on zarr's threads) runs while this thread
    # measures QC on the same pixels, instead of one waiting for the other.
    written = _writer().submit(arrays.patches.__setitem__, sl, patches)
    try:
        qc.write_chunk(arrays.qc, sl, patches)  # per-patch QC measures from the pixels already in memory
    finally:
        written.result()  # before returning: this thread's next chunk reuses the buffer
    # The flag goes after the data: a chunk is never marked done before it is on disk.
    arrays.flags[index] = True
    return sl.stop - sl.start


def read_chunk(
    slide_path: str | Path, slide_mpp: float | None, spec: GridSpec, grid_ij: np.ndarray, fast: bool,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One chunk's patches (N, P, P, 3) uint8 from the slide, through this process's shared handle,
    and the mask of patches whose tile data did not decode (None when every patch read). Both the
    tiler and the fused inference path (``tile.store_patches: false``) read chunks with this.

    ``slide_mpp``: the level-0 mpp the grid was planned at (``spec.slide_mpp``). Read handles open
    with it as their resolution: pixels never depend on it, and a slide whose resolution came
    from ``mpp_default`` (or none at all) still opens for reading."""
    slide = cached_slide(slide_path, slide_mpp)
    try:
        return read_patches(slide, spec, grid_ij, fast, out=out), None
    except (SlideReadError, OpenSlideError):  # the latter: a handle another task's error left unusable
        # Some tile in this chunk does not decode: read patch by patch and keep what reads.
        forget_cached_slide(slide_path, slide_mpp)  # an OpenSlide error leaves the handle unusable
        return read_patches_salvaging(str(slide_path), slide_mpp, spec, grid_ij, fast, out=out)


_writer_pool: ThreadPoolExecutor | None = None
# A forked child inherits the pool object but none of its threads: it makes its own.
os.register_at_fork(after_in_child=lambda: globals().update(_writer_pool=None))


def _writer() -> ThreadPoolExecutor:
    """This process's pool for chunk writes: each tiling task has at most one write in it at a
    time, so one thread per core serves local tiling (threads = cores) without queueing."""
    global _writer_pool
    with _arrays_lock:
        if _writer_pool is None:
            _writer_pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="wsipipe-write")
        return _writer_pool


@dataclass(frozen=True)
class _ChunkArrays:
    patches: zarr.Array
    qc: zarr.Array | None
    corrupt: zarr.Array
    flags: zarr.Array


_arrays_cache: dict[tuple[str, str], _ChunkArrays] = {}
_arrays_lock = threading.Lock()


def _chunk_arrays(store_path: str, store_token: str) -> _ChunkArrays:
    """The arrays a chunk task writes, opened once per process and tiling run: opening a group
    and an array reads their metadata files, milliseconds a chunk otherwise. The token names
    the slide and config identity, so an entry can only serve a store of identical layout."""
    key = (store_path, store_token)
    with _arrays_lock:
        hit = _arrays_cache.get(key)
        if hit is not None:
            return hit
    group = zarr.open_group(store_path, mode="r+")
    arrays = _ChunkArrays(
        # No "is this chunk all fill value?" scan before writing: patches never are, and zarr's
        # check costs as much as zstd itself (writes 1.56x faster without it, measured on CMU-1 tiles).
        patches=store.array(group, store.PATCHES).with_config({"write_empty_chunks": True}),
        qc=store.optional_array(group, store.QC_MEASURES),
        corrupt=store.array(group, store.CORRUPT),
        flags=store.array(group, store.progress_name(STAGE)),
    )
    with _arrays_lock:
        if len(_arrays_cache) >= 8:  # a long-lived worker tiles many slides
            _arrays_cache.pop(next(iter(_arrays_cache)))
        _arrays_cache[key] = arrays
    return arrays


_buffers = threading.local()


def _chunk_buffer(n: int, p: int) -> np.ndarray:
    """This thread's reusable (n, p, p, 3) patch buffer. Chunks are written (encoded) before the
    task returns, so the next chunk may overwrite it; a fresh 9.6 MiB array per chunk costs its
    page faults again on every chunk (a quarter of the read time on this VM)."""
    buf = getattr(_buffers, "patches", None)
    if buf is None or buf.shape[1] != p or len(buf) < n:
        buf = _buffers.patches = np.empty((n, p, p, 3), dtype=np.uint8)
    return buf[:n]


STAGE = store.STAGE_TILE


def read_patches_salvaging(
    slide_path: str, slide_mpp: float | None, spec: GridSpec, grid_ij: np.ndarray, fast: bool,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One read per patch after a failed run read: (patches, corrupt mask). Unreadable patches
    are filled with the background colour. OpenSlide errors are sticky (every later read on
    that handle fails too), so a failure is followed by a fresh handle. ``out`` as in :func:`read_patches`."""
    if out is None:
        out = np.empty((len(grid_ij), spec.patch_size, spec.patch_size, 3), dtype=np.uint8)
    corrupt = np.zeros(len(grid_ij), dtype=bool)
    slide = open_slide(slide_path, slide_mpp)
    background = slide.background  # read now: an errored handle fails even on properties
    try:
        for k in range(len(grid_ij)):
            try:
                _read_run(slide, spec, grid_ij[k : k + 1], out[k : k + 1], fast)
            except (SlideReadError, OpenSlideError):
                corrupt[k] = True
                out[k] = background
                slide.close()
                slide = open_slide(slide_path, slide_mpp)
    finally:
        slide.close()
    return out, corrupt


def corrupt_report(group: zarr.Group, limit: int = 20) -> dict | None:
    """``{"count", "coords_l0"}`` of patches with undecodable tile data (first ``limit`` coords), or None."""
    flags = store.optional_array(group, store.CORRUPT)
    if flags is None or flags.nchunks_initialized == 0:  # only chunks with a corrupt patch are ever stored
        return None
    idx = np.flatnonzero(np.asarray(flags[:], dtype=bool))
    if not len(idx):
        return None
    xy = np.asarray(store.array(group, store.COORDS).get_orthogonal_selection((idx[:limit],)))
    return {"count": int(len(idx)), "coords_l0": [[int(x), int(y)] for x, y in xy]}


# --------------------------------------------------------------------------- patches read from the slide
# With tile.store_patches false the store has no patches array: inference reads each chunk from the
# slide (wsipipe.models.fused), and the few patches a report shows are read the same way.


def source_attrs(cfg: PipelineConfig) -> dict[str, Any]:
    """The tile attrs that reading a store's patches from its slide needs besides the grid."""
    return {
        "store_patches": cfg.tile.store_patches, "mpp_override": cfg.mpp_override, "mpp_default": cfg.mpp_default,
        "mpp_tolerance": cfg.tile.mpp_tolerance, "fast_read": cfg.tile.reader == "auto",
        "on_corrupt_tile": cfg.tile.on_corrupt_tile, "decode": cfg.tile.decode,
    }


@dataclass(frozen=True)
class SlideSource:
    """Where a store's patches come from when they are not stored: the slide file, the grid and the
    read settings tiling planned them with."""

    path: Path
    mpp_override: float | None  # the resolution its read handles open with: the grid's slide_mpp (see read_chunk)
    spec: GridSpec
    fast: bool
    on_corrupt_tile: str
    decode: str = "cpu"  # tile.decode: where the fused path decodes JPEG tiles ("cpu" or "device")


def stored_grid(group: zarr.Group) -> GridSpec:
    """The grid a store was tiled on, from its tile attrs."""
    tile = store.meta(group).get(store.META_TILE) or {}
    return GridSpec(**{k: v for k, v in tile.items() if k in GridSpec.__annotations__})


def reads_from_slide(group: zarr.Group) -> bool:
    """True for a store tiled with ``tile.store_patches: false``: no patches array, readers go to the slide."""
    tile = store.meta(group).get(store.META_TILE) or {}
    return store.PATCHES not in group and tile.get("store_patches") is False


def slide_source(group: zarr.Group, store_path: str | Path, slide_path: str | Path | None = None) -> SlideSource:
    """The slide a store without stored patches reads them from: ``slide_path``, else the path its
    slide attrs recorded at tiling. The file must be the very slide tiled (same identity), or the
    patches would not match the coords, tissue fractions and grid in the store."""
    meta = store.meta(group)
    tile, slide = meta.get(store.META_TILE) or {}, meta.get(store.META_SLIDE) or {}
    path = Path(slide_path if slide_path is not None else slide.get("path") or "")
    why = f"the store {store_path} has no stored patches (tiled with tile.store_patches: false) and reads them from this slide"
    if not str(path) or not path.exists():
        raise SlideOpenError(path, f"slide not found: {why}; give the slide's path")
    spec = stored_grid(group)
    opened = cached_slide(path, spec.slide_mpp)  # read at the grid's resolution, whatever the file states
    if slide.get("identity") and opened.identity != slide["identity"]:
        raise SlideReadError(path, f"not the slide that was tiled (its identity differs: replaced or re-scanned?); {why}")
    return SlideSource(path, spec.slide_mpp, spec, bool(tile.get("fast_read", True)),
                       str(tile.get("on_corrupt_tile", "fail")), str(tile.get("decode", "cpu")))


def read_store_patches(
    group: zarr.Group, indices: np.ndarray, store_path: str | Path, slide_path: str | Path | None = None
) -> np.ndarray:
    """Patches (K, P, P, 3) uint8 at increasing ``indices`` of a store: the stored ones, or, for a store
    tiled with ``tile.store_patches: false``, read from its slide (undecodable ones as background).

    From the slide, every chunk holding a wanted patch is read whole, as the infer stage read it:
    resampled patches read alone differ at their edges by a grey level or so from patches read in a
    row, and these must be the pixels the model saw."""
    idx = np.asarray(indices, dtype=np.int64)
    stored = store.optional_array(group, store.PATCHES)
    if stored is not None or not reads_from_slide(group):
        return np.asarray(stored_patches(group, store_path).get_orthogonal_selection((idx,)))
    source = slide_source(group, store_path, slide_path)
    chunk = max(1, int(store.array(group, store.CORRUPT).chunks[0]))
    grid_ij = store.array(group, store.GRID_IJ)
    p = source.spec.patch_size
    out = np.empty((len(idx), p, p, 3), dtype=np.uint8)
    try:
        for c in np.unique(idx // chunk):
            start = int(c) * chunk
            cells = np.asarray(grid_ij[start : start + chunk])
            patches, _ = read_chunk(source.path, source.mpp_override, source.spec, cells, source.fast)
            here = (idx // chunk) == c
            out[here] = patches[idx[here] - start]
    finally:
        forget_cached_slide(source.path, source.mpp_override)  # a report's few patches: no tiles worth keeping
    return out


def stored_patches(group: zarr.Group, store_path: str | Path) -> zarr.Array:
    """The store's patches array. A store tiled with ``tile.store_patches: false`` has none: a
    StoreError saying so (training needs stored patches)."""
    arr = store.optional_array(group, store.PATCHES)
    if arr is None and reads_from_slide(group):
        raise StoreError(
            store_path, "no stored patches: the slide was tiled with tile.store_patches: false (inference read them "
            "from the slide); tile it again with tile.store_patches: true to train on its patches",
        )
    return arr if arr is not None else store.array(group, store.PATCHES)


class _DaskProgress(Callback):
    """Feeds a progress callback from Dask's local scheduler."""

    def __init__(self, progress: Progress, total: int, done: int):
        super().__init__()
        self.progress, self.total, self.done = progress, total, done

    def _posttask(self, key, result, dsk, state, id):
        if isinstance(result, int) and not isinstance(result, bool):
            self.done += result
            self.progress(self.done, self.total)


def tile_identity(slide: Slide, cfg: PipelineConfig) -> dict:
    """What a store's patches depend on: the slide, the tissue and tile settings, the override,
    and the mpp_default only where it was used (a slide whose file states its resolution is
    tiled the same with or without one)."""
    identity: dict[str, Any] = {"slide": slide.identity, "config": cfg.section_hash("tissue", "tile", "mpp_override")}
    if slide.mpp_source == "default":
        identity["mpp_default"] = slide.mpp
    return identity


def tile_slide(
    slide_path: str | Path,
    store_path: str | Path,
    cfg: PipelineConfig | None = None,
    client=None,
    progress: Progress | None = None,
) -> dict:
    """Tile one slide into ``store_path`` (a Zarr v3 group). Returns stats.

    Idempotent: a complete store with the same slide and config identity is left as is;
    an interrupted one resumes at the first unfinished chunk; one made from another slide
    or config is rebuilt. Raises NoTissueError (after writing the store with its
    thumbnail and zero patches) when no tissue is found."""
    cfg = cfg or PipelineConfig()
    t0 = time.perf_counter()
    slide_path, store_path = Path(slide_path), Path(store_path)
    # Closed on the way out: an unclosed handle is one open file per call in a long-lived process.
    with open_slide_for(slide_path, cfg) as slide:
        identity = tile_identity(slide, cfg)
        group = store.open_store(store_path, mode="a")
        entry = store.stage_entry(group, STAGE)
        if entry and entry.get("identity") == identity and entry.get("complete"):
            return _already_tiled(group, entry, slide_path, cfg)
        plan = _open_plan(group, entry, slide, cfg, identity, store_path)
    # tile.store_patches false: the plan is the whole stage; inference reads the patches from the slide.
    tasks = _run_chunks(plan, slide_path, store_path, cfg, identity, client, progress) if cfg.tile.store_patches else []
    local = client is None
    # Tasks ran in this process: free the shared handle's decoded tiles now, not after inference.
    decoded = forget_cached_slide(slide_path, plan.spec.slide_mpp) if local and tasks else None
    _finish(plan, slide_path, store_path, cfg, identity, bool(tasks), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    return {"skipped": False, "n_patches": plan.n, "seconds": seconds, "resumed": plan.resume, "tiles_decoded": decoded}


@dataclass
class _Plan:
    """The store a tiling run writes: its group, grid and patch count, and whether it resumes."""

    group: zarr.Group
    spec: GridSpec
    n: int
    resume: bool


def _already_tiled(group: zarr.Group, entry: dict[str, Any], slide_path: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Stats of a store tiling already completed with the same identity (nothing is rewritten)."""
    n_done = int(store.array(group, store.COORDS).shape[0])
    check_corrupt(slide_path, entry.get("corrupt_patches"), n_done, cfg.tile.on_corrupt_tile)
    stats = {"skipped": True, "n_patches": n_done, **_stage_stats(entry)}
    if stats["n_patches"] == 0:
        raise NoTissueError(slide_path, "no tissue found (tissue detection found nothing to tile)")
    return stats


def _open_plan(
    group: zarr.Group, entry: dict[str, Any] | None, slide: Slide, cfg: PipelineConfig, identity: dict[str, Any],
    store_path: Path,
) -> _Plan:
    """The interrupted run's grid when it had the same identity; otherwise a clean store, planned anew."""
    resume = bool(entry and entry.get("identity") == identity and store.PATCHES in group)
    if resume:
        spec = stored_grid(group)
        return _Plan(group, spec, int(store.array(group, store.COORDS).shape[0]), True)
    group = zarr.open_group(str(store_path), mode="w")  # stale or new: start clean
    spec, n = _plan_store(group, slide, cfg, identity)
    return _Plan(group, spec, n, False)


def _run_chunks(
    plan: _Plan, slide_path: Path, store_path: Path, cfg: PipelineConfig, identity: dict[str, Any], client,
    progress: Progress | None,
) -> list:
    """Tile every chunk not flagged done (Dask tasks, on ``client`` or local threads); the tasks run."""
    group, spec, n = plan.group, plan.spec, plan.n
    slices = store.chunk_slices(n, cfg.tile.chunk_patches)
    flags = store.progress_array(group, STAGE, len(slices))
    todo = store.pending_chunks(flags) if n else []
    done = n - sum(slices[i].stop - slices[i].start for i in todo)
    if progress:
        progress(done, n)

    run_token = dask.base.tokenize(str(store_path), identity)  # unique per store on a shared cluster
    # Tasks get their cells, not a read each.
    grid_ij = np.asarray(store.array(group, store.GRID_IJ)[:]) if todo else np.zeros((0, 2), np.int32)
    tasks = [
        dask.delayed(_tile_chunk)(
            str(slide_path), spec.slide_mpp, spec, str(store_path), run_token, i, slices[i], grid_ij[slices[i]],
            cfg.tile.reader == "auto",
            # Ordered names: Dask runs independent tasks in key order, so chunks go top to bottom
            # and each tile row is still in the reader's cache when the next patch row needs it.
            dask_key_name=f"wsipipe-tile-{run_token}-{i:09d}",
        )
        for i in todo
    ]
    _run_tasks(tasks, cfg, client, progress, done, n)
    return tasks


def _finish(
    plan: _Plan, slide_path: Path, store_path: Path, cfg: PipelineConfig, identity: dict[str, Any], ran: bool,
    seconds: float,
) -> None:
    """Check every chunk landed, clean up after killed workers, report corrupt tiles, mark the stage complete."""
    group, n = plan.group, plan.n
    if n and cfg.tile.store_patches and store.pending_chunks(store.array(group, store.progress_name(STAGE))):
        raise StoreError(store_path, "some chunks were not written; rerun to resume")
    # Every chunk is written, so a Zarr *.partial file left in the store is a killed worker's
    # (its task ran again elsewhere): nothing will ever rename it. Same caveat as locks.py.
    if ran and remove_stale_temps(store_path):
        log.info("%s: removed temporary files of killed tiling tasks", store_path)
    corrupt = corrupt_report(group)
    check_corrupt(slide_path, corrupt, n, cfg.tile.on_corrupt_tile)
    store.set_stage(
        group, STAGE, identity, True, seconds=round(seconds, 3), n_patches=n, resumed=plan.resume, corrupt_patches=corrupt,
    )
    if n == 0:
        raise NoTissueError(slide_path, "no tissue found (tissue detection found nothing to tile)")


def check_corrupt(slide_path: Path, corrupt: dict | None, n: int, mode: str) -> None:
    """Fail the slide (mode "fail", or every patch corrupt) naming the corrupt patches."""
    if not corrupt:
        return
    where = ", ".join(f"({x}, {y})" for x, y in corrupt["coords_l0"][:5])
    more = " ..." if corrupt["count"] > 5 else ""
    what = f"{corrupt['count']} of {n} patches have corrupt tile data (level-0 x, y: {where}{more})"
    if mode == "fail":
        raise SlideReadError(slide_path, f"{what}; set tile.on_corrupt_tile: skip to leave them out")
    if corrupt["count"] == n:
        raise SlideReadError(slide_path, f"{what}: nothing readable left")
    log.warning("%s: %s; skipped", slide_path, what)


def _stage_stats(entry: dict) -> dict:
    return {"seconds": entry.get("seconds"), "resumed": entry.get("resumed", False)}


def _plan_store(group: zarr.Group, slide: Slide, cfg: PipelineConfig, identity: dict) -> tuple[GridSpec, int]:
    """Thumbnail, tissue, grid; create the arrays. Everything a resume needs is saved here."""
    thumb, thumb_ds = slide.thumbnail(cfg.tissue.thumb_mpp, cfg.tissue.max_thumb_px)
    tissue = detect_tissue(thumb, thumb_ds, slide.mpp, cfg.tissue)
    w, h = slide.dimensions
    spec = plan_grid(
        w, h, slide.mpp, slide.level_downsamples, cfg.tile.mpp, cfg.tile.patch_size, cfg.tile.step,
        cfg.tile.mpp_tolerance, cfg.tile.resample,
    )
    grid_ij, coords, frac = select_patches(spec, tissue.mask, tissue.downsample, cfg.tile.min_tissue)
    if not tissue.found:  # even a whole-slide grid (min_tissue=0) is empty without tissue
        grid_ij, coords, frac = grid_ij[:0], coords[:0], frac[:0]
    n, p, chunk = len(coords), spec.patch_size, cfg.tile.chunk_patches
    group.create_array(store.THUMBNAIL, data=thumb, chunks=thumb.shape)
    group.create_array(store.TISSUE_MASK, data=tissue.mask, chunks=tissue.mask.shape)
    rows = max(1, min(n, 1 << 16))  # readers stream these in slices; keep chunks modest
    group.create_array(store.COORDS, data=coords.reshape(n, 2), chunks=(rows, 2))
    group.create_array(store.GRID_IJ, data=grid_ij.reshape(n, 2), chunks=(rows, 2))
    group.create_array(store.TISSUE_FRACTION, data=frac, chunks=(rows,))
    # Chunked like patches, so each tiling task writes its own flags.
    group.create_array(store.CORRUPT, shape=(n,), chunks=(max(1, chunk),), dtype="bool", fill_value=False)
    if cfg.tile.store_patches:
        group.create_array(
            store.PATCHES, shape=(n, p, p, 3), chunks=(chunk, p, p, 3), dtype="uint8", fill_value=0,
            dimension_names=["patch", "y", "x", "channel"], **patch_codecs(cfg.tile),
        )
    qc.create_arrays(group, n, chunk)
    store.update_meta(
        group,
        version=__version__,
        slide=slide.info(),
        tile={
            **spec.attrs(), "thumb_downsample": thumb_ds, "min_tissue": cfg.tile.min_tissue,
            "reader": "tiff-direct" if cfg.tile.reader == "auto" and slide.fast_reader(spec.level) else "openslide",
            **source_attrs(cfg),
        },
        tissue={
            "found": tissue.found,
            "area_mm2": tissue.area_um2 / 1e6,
            "saturation_threshold": tissue.saturation_threshold,
            "polygon_wkt": tissue.polygon.wkt,
            "params": cfg.tissue.model_dump(mode="json"),
        },
    )
    store.set_stage(group, STAGE, identity, False)
    return spec, n


def patch_codecs(tile: TileConfig) -> dict:
    """Zarr codec arguments for the patches array."""
    if tile.codec == "jpeg":
        return {"serializer": JpegPatchCodec(level=tile.jpeg_quality), "compressors": None}
    if tile.codec == "none":
        return {"compressors": None}
    # Real H&E barely compresses losslessly: a fast negative level keeps most of the
    # little there is to gain (1.11x vs 1.14x at level 1) at a fraction of the CPU.
    return {"compressors": [ZstdCodec(level=tile.zstd_level)]}


def _run_tasks(tasks: list, cfg: PipelineConfig, client, progress: Progress | None, done: int, total: int) -> None:
    if not tasks:
        return
    if client is not None:
        from distributed import as_completed

        futures = client.compute(tasks)
        for fut in as_completed(futures):
            done += fut.result()
            if progress:
                progress(done, total)
        return
    workers = cfg.dask.num_workers or os.cpu_count() or 1
    with _DaskProgress(progress, total, done) if progress else contextlib.nullcontext():
        # The threaded scheduler as a function, not by name: naming it makes dask import
        # distributed (0.3 s) to look for a default client first.
        dask.compute(*tasks, scheduler=dask.threaded.get, num_workers=workers)
