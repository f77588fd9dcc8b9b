"""The per-slide Zarr v3 group: the only hand-off between stages.

Every name a stage writes or reads is a constant below; :data:`LAYOUT` lists the
arrays in the order of the table in docs/store-layout.md. Layout of one slide's
group (``<name>.zarr``)::

    patches            (N, H, W, 3) uint8   chunked (chunk_patches, H, W, 3)         PATCHES
    coords             (N, 2) int64          level-0 (x, y) of each patch's top-left  COORDS
    grid_ij            (N, 2) int32          (row, col) in the tiling grid           GRID_IJ
    tissue_fraction    (N,) float32          tissue share of each patch              TISSUE_FRACTION
    probabilities      (N,) or (N, C) float32   written by inference                 PROBABILITIES
    features           (N, D) float16        patch embeddings, written by `wsipipe embed`  FEATURES
    ood_distance       (N,) float32          distance from the model's training domain, by inference  OOD_DISTANCE
    thumbnail          (h, w, 3) uint8       slide overview at tile["thumb_downsample"]  THUMBNAIL
    tissue_mask        (h', w') bool         tissue detection mask                   TISSUE_MASK
    corrupt            (N,) bool             tile data did not decode (on_corrupt_tile: skip)  CORRUPT
    qc/measures        (N, 4) float32        focus, pen_fraction, background_fraction, saturation
                                             (columns named in its attrs)            QC_MEASURES
    labels             (N,) int8             labelled patch sets (-1: unlabelled)    LABELS
    groups             (N,) int32            labelled patch sets: index into the group names  GROUPS
    _progress/<stage>  (n_chunks,) bool      chunks a stage has finished (resume)    progress_name(stage)

    attrs["wsipipe"] = {                     ATTRS_KEY
        "version": package version,          META_VERSION
        "slide": {...}                       META_SLIDE: path, identity, dimensions, mpp, vendor
        "tile": {...}                        META_TILE: grid geometry: mpp, patch_size, stride, *_l0, level,
                                             grid_shape, origin_l0, thumb_downsample
        "tissue": {...}                      META_TISSUE: tissue polygon (WKT) and its statistics
        "labels": {...}                      META_LABELS: class and group names of a labelled patch set
        "stages": {stage: {"identity": {...}, "complete": bool, "seconds": float, ...}}   META_STAGES
    }

Stages (keys of ``stages``): ``tile`` (STAGE_TILE), ``infer`` (STAGE_INFER),
``stitch`` (STAGE_STITCH), and the optional ``embed`` (STAGE_EMBED: patch embeddings). A stage is complete only when its entry says so with the
same identity; the marker is written last, after every chunk of the stage is on disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from wsipipe.tiles import zarrjpeg  # noqa: F401  registers the lossy patch codec, so any stage can read such stores
from wsipipe.errors import StoreError

# ----------------------------------------------------------------- array names
PATCHES = "patches"
COORDS = "coords"
GRID_IJ = "grid_ij"
TISSUE_FRACTION = "tissue_fraction"
PROBABILITIES = "probabilities"
FEATURES = "features"
OOD_DISTANCE = "ood_distance"
THUMBNAIL = "thumbnail"
TISSUE_MASK = "tissue_mask"
CORRUPT = "corrupt"
QC_GROUP = "qc"
QC_MEASURES = f"{QC_GROUP}/measures"
LABELS = "labels"
GROUPS = "groups"
PROGRESS_GROUP = "_progress"

# Every array of a slide's group, in the order of docs/store-layout.md; ``_progress/<stage>`` stands for one per stage.
LAYOUT: tuple[str, ...] = (
    PATCHES, COORDS, GRID_IJ, TISSUE_FRACTION, PROBABILITIES, FEATURES, OOD_DISTANCE, THUMBNAIL, TISSUE_MASK, CORRUPT,
    QC_MEASURES, LABELS, GROUPS, f"{PROGRESS_GROUP}/<stage>",
)

# ----------------------------------------------------------------- attrs
ATTRS_KEY = "wsipipe"
META_VERSION = "version"
META_SLIDE = "slide"
META_TILE = "tile"
META_TISSUE = "tissue"
META_LABELS = "labels"
META_STAGES = "stages"

# ----------------------------------------------------------------- stages
STAGE_TILE = "tile"
STAGE_INFER = "infer"
STAGE_STITCH = "stitch"
STAGES: tuple[str, ...] = (STAGE_TILE, STAGE_INFER, STAGE_STITCH)
# Optional, outside the slide job's chain: patch embeddings for slide-level (MIL) models.
STAGE_EMBED = "embed"


def progress_name(stage: str) -> str:
    """The name of a stage's per-chunk done flags, ``_progress/<stage>``."""
    return f"{PROGRESS_GROUP}/{stage}"


OpenMode = Literal["r", "r+", "a", "w", "w-"]


def open_store(path: str | Path, mode: OpenMode = "r") -> zarr.Group:
    """Open a slide's group; ``mode="r"``/``"r+"`` require it to exist."""
    path = Path(path)
    if mode in ("r", "r+") and not (path / "zarr.json").is_file():
        raise StoreError(path, "not a wsipipe Zarr store (no zarr.json); run `wsipipe tile` first")
    try:
        return zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for a damaged group
        raise StoreError(path, f"cannot open Zarr group: {exc}") from exc


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of a slide's group; a missing one, or a group in its place, is a StoreError."""
    node = group.get(name)
    if not isinstance(node, zarr.Array):
        problem = f"no array '{name}' in this store" if node is None else f"'{name}' is not an array"
        raise StoreError(str(group.store_path).removeprefix("file:"), problem)
    return node


def optional_array(group: zarr.Group, name: str) -> zarr.Array | None:
    """The array ``name`` when the group has it (None when absent); a group in its place is a StoreError."""
    return array(group, name) if name in group else None


def meta(group: zarr.Group) -> dict[str, Any]:
    """The wsipipe attrs of a group ({} for a fresh one)."""
    data = group.attrs.get(ATTRS_KEY)
    return dict(data) if isinstance(data, Mapping) else {}


def update_meta(group: zarr.Group, **sections: Any) -> None:
    """Replace top-level sections of the wsipipe attrs (read-modify-write by the driver only)."""
    data = meta(group)
    data.update(sections)
    group.attrs[ATTRS_KEY] = data


def stage_entry(group: zarr.Group, stage: str) -> dict[str, Any] | None:
    return meta(group).get(META_STAGES, {}).get(stage)


def is_complete(group: zarr.Group, stage: str, identity: dict[str, Any] | None = None) -> bool:
    """True when ``stage`` finished, and (if given) with this exact input identity."""
    entry = stage_entry(group, stage)
    if not entry or not entry.get("complete"):
        return False
    return identity is None or entry.get("identity") == identity


def set_stage(group: zarr.Group, stage: str, identity: dict[str, Any], complete: bool, **extra: Any) -> None:
    data = meta(group)
    stages = dict(data.get(META_STAGES, {}))
    stages[stage] = {"identity": identity, "complete": complete, **extra}
    data[META_STAGES] = stages
    group.attrs[ATTRS_KEY] = data


def require_complete(group: zarr.Group, stage: str, path: str | Path) -> None:
    if not is_complete(group, stage):
        raise StoreError(path, f"stage '{stage}' has not completed in this store; run it first")


def progress_array(group: zarr.Group, stage: str, n_chunks: int, reset: bool = False) -> zarr.Array:
    """Per-chunk done flags for a stage (one file per flag, so a flag write is independent)."""
    name = progress_name(stage)
    arr = None if reset else optional_array(group, name)
    if arr is not None and arr.shape == (n_chunks,):
        return arr
    return group.create_array(
        name, shape=(max(n_chunks, 1),), chunks=(1,), dtype="bool", fill_value=False, overwrite=True
    )


def pending_chunks(progress: zarr.Array) -> list[int]:
    """Indices of the chunks whose done flag is not set.

    A flag is a chunk of its own and only True is ever stored (False is the fill value, which
    Zarr does not write), so counting the stored chunks, one directory listing, settles the
    common cases (nothing or everything done) without reading a file per chunk: 0.4 CPU-s
    for the 1 200 chunks of a 100k-px slide at 0.25 µm/px."""
    n = int(progress.shape[0])
    if tuple(progress.chunks) == (1,):
        stored = progress.nchunks_initialized
        if stored == 0:
            return list(range(n))
        if stored == n:
            return []
    return [int(i) for i in np.flatnonzero(~np.asarray(progress[:], dtype=bool))]


def chunk_slices(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
