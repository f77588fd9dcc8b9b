"""The per-slide Zarr v3 group: the only hand-off between stages.

Layout of one slide's group (``<name>.zarr``)::

    patches          (N, H, W, 3) uint8   chunked (chunk_patches, H, W, 3)
    coords           (N, 2) int64          level-0 (x, y) of each patch's top-left
    grid_ij          (N, 2) int32          (row, col) of each patch in the tiling grid
    tissue_fraction  (N,) float32
    probabilities    (N,) or (N, C) float32   written by inference
    _progress/<stage>  (n_chunks,) bool     which chunks a stage has finished (resume)

    attrs["wsipipe"] = {
        "version": package version,
        "slide": {...}            # path, identity, dimensions, mpp, vendor
        "tile": {...}             # grid geometry: mpp, patch_size, stride, *_l0, level, grid_shape
        "stages": {stage: {"identity": {...}, "complete": bool, ...}}
    }

A stage is complete only when its entry says so with the same identity; the
marker is written last, after every chunk of the stage is on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsipipe.tiles import zarrjpeg  # noqa: F401  registers the lossy patch codec, so any stage can read such stores
from wsipipe.errors import StoreError

ATTRS_KEY = "wsipipe"


def open_store(path: str | Path, mode: str = "r") -> zarr.Group:
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


def meta(group: zarr.Group) -> dict[str, Any]:
    """The wsipipe attrs of a group ({} for a fresh one)."""
    return dict(group.attrs.get(ATTRS_KEY, {}))


def update_meta(group: zarr.Group, **sections: Any) -> None:
    """Replace top-level sections of the wsipipe attrs (read-modify-write by the driver only)."""
    data = meta(group)
    data.update(sections)
    group.attrs[ATTRS_KEY] = data


def stage_entry(group: zarr.Group, stage: str) -> dict[str, Any] | None:
    return meta(group).get("stages", {}).get(stage)


def is_complete(group: zarr.Group, stage: str, identity: dict[str, Any] | None = None) -> bool:
    """True when ``stage`` finished, and (if given) with this exact input identity."""
    entry = stage_entry(group, stage)
    if not entry or not entry.get("complete"):
        return False
    return identity is None or entry.get("identity") == identity


def set_stage(group: zarr.Group, stage: str, identity: dict[str, Any], complete: bool, **extra: Any) -> None:
    data = meta(group)
    stages = dict(data.get("stages", {}))
    stages[stage] = {"identity": identity, "complete": complete, **extra}
    data["stages"] = stages
    group.attrs[ATTRS_KEY] = data


def require_complete(group: zarr.Group, stage: str, path: str | Path) -> None:
    if not is_complete(group, stage):
        raise StoreError(path, f"stage '{stage}' has not completed in this store; run it first")


def progress_array(group: zarr.Group, stage: str, n_chunks: int, reset: bool = False) -> zarr.Array:
    """Per-chunk done flags for a stage (one file per flag, so a flag write is independent)."""
    name = f"_progress/{stage}"
    if not reset and name in group:
        arr = group[name]
        if arr.shape == (n_chunks,):
            return arr
    return group.create_array(
        name, shape=(max(n_chunks, 1),), chunks=(1,), dtype="bool", fill_value=False, overwrite=True
    )


def pending_chunks(progress: zarr.Array) -> list[int]:
    return [int(i) for i in np.flatnonzero(~progress[:])]


def chunk_slices(n: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
