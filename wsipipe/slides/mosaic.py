"""Benchmark slides made of real H&E: a pyramidal Aperio SVS tiled with real tissue.

Flat synthetic texture compresses and decodes unrealistically well, so speed and memory
figures are measured on slides whose tiles are real scanned tissue. A pool of tiles is
cut from a real slide at random places, each turned by one of the 8 symmetries of the
square (rotations and flips), re-encoded the way scanners write them (JPEG, YCbCr 4:2:0),
and laid on a generated layout of tissue pieces (:func:`wsipipe.slides.synth.make_layout`):
a level-0 tile whose centre is in tissue gets a pool tile, the others glass.

Level 0 reuses the pool's JPEG bytes; lower levels (downsample 4, 16, ...) are built from
the pool tiles box-filtered once per level, so no level is ever held in memory: the file
is streamed to tifffile tile by tile, and memory is the pool plus one row of choices.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import shapely
import shapely.affinity
import tifffile
from shapely.geometry import MultiPolygon

from wsipipe.geometry import as_multipolygon
from wsipipe.slides.synth import _aperio_description, _encode, make_layout, pyramid_downsamples

GLASS_RGB = (242, 241, 243)


@dataclass(frozen=True)
class TilePool:
    """Real tissue tiles and where each came from in the source image."""

    tiles: np.ndarray  # (n, t, t, 3) uint8, before JPEG
    origins: np.ndarray  # (n, 2) int: source level-0 (x, y) of the crop
    turns: np.ndarray  # (n, 2) int: (quarter turns, flipped) applied after the crop


@dataclass(frozen=True)
class MosaicSlide:
    path: Path
    width: int
    height: int
    mpp: float
    tile_size: int
    tissue: MultiPolygon
    choice: np.ndarray  # (tile rows, tile cols) int16: pool index of each level-0 tile, -1 = glass
    pool: TilePool


def orient(tile: np.ndarray, quarter_turns: int, flipped: bool) -> np.ndarray:
    """One of the 8 symmetries of the square: ``quarter_turns`` x 90° then a left-right flip."""
    out = np.rot90(tile, quarter_turns)
    return np.ascontiguousarray(out[:, ::-1] if flipped else out)


def read_source(source: str | Path) -> np.ndarray:
    """Level 0 of a (small) real slide, RGB uint8, through OpenSlide."""
    from wsipipe.slides.slide import open_slide

    with open_slide(source) as slide:
        w, h = slide.dimensions
        return np.ascontiguousarray(slide.read_region(0, 0, 0, w, h))


def tissue_pool(image: np.ndarray, tile: int, n: int, seed: int = 0, min_saturation: float = 0.2) -> TilePool:
    """``n`` tile x tile crops of ``image`` that are mostly tissue, at random places and
    orientations. Tissue = a colour saturation above ``min_saturation`` on average."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    if h < tile or w < tile:
        raise ValueError(f"source image {w}x{h} is smaller than one {tile}-px tile")
    tiles = np.empty((n, tile, tile, 3), np.uint8)
    origins, turns = np.zeros((n, 2), np.int64), np.zeros((n, 2), np.int64)
    k = tries = 0
    while k < n:
        tries += 1
        if tries > 50 * n:
            raise ValueError(f"too little tissue in the source image to cut {n} tiles")
        x, y = int(rng.integers(0, w - tile + 1)), int(rng.integers(0, h - tile + 1))
        crop = image[y : y + tile, x : x + tile].astype(np.float32)
        mx, mn = crop.max(axis=2), crop.min(axis=2)
        if float(((mx - mn) / np.maximum(mx, 1.0)).mean()) < min_saturation:
            continue
        q, f = int(rng.integers(4)), int(rng.integers(2))
        tiles[k] = orient(image[y : y + tile, x : x + tile], q, bool(f))
        origins[k], turns[k] = (x, y), (q, f)
        k += 1
    return TilePool(tiles, origins, turns)


def tile_choices(tissue: MultiPolygon, width: int, height: int, tile: int, pool_size: int, seed: int) -> np.ndarray:
    """Pool index per level-0 tile (-1 = glass): tiles whose centre lies in tissue get a random one."""
    rows, cols = -(-height // tile), -(-width // tile)
    rng = np.random.default_rng(seed + 1)
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) * tile, (np.arange(cols) + 0.5) * tile, indexing="ij")
    inside = shapely.contains_xy(tissue, xs.ravel(), ys.ravel()).reshape(rows, cols) if not tissue.is_empty else (
        np.zeros((rows, cols), bool)
    )
    choice = rng.integers(0, pool_size, (rows, cols)).astype(np.int16)
    choice[~inside] = -1
    return choice


def _box_filtered(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Each tile's mean over factor x factor blocks, rounded: (n, t/f, t/f, 3) uint8."""
    n, t = tiles.shape[:2]
    s = t // factor
    out = np.empty((n, s, s, 3), np.uint8)
    for i in range(n):  # one tile at a time keeps the float temporary small
        blocks = tiles[i].reshape(s, factor, s, factor, 3).astype(np.float32)
        out[i] = np.rint(blocks.mean(axis=(1, 3)))
    return out


def _level_tiles(choice: np.ndarray, pool: np.ndarray, glass: np.ndarray, factor: int, width: int, height: int,
                 tile: int, quality: int, pool_jpeg: list[bytes] | None) -> Iterator[bytes]:
    """JPEG bytes of every tile of the level at ``factor``, in TIFF order."""
    rows, cols = -(-(height // factor) // tile), -(-(width // factor) // tile)
    glass_jpeg = _encode(np.broadcast_to(glass, (tile, tile, 3)).copy(), quality)
    s = tile // factor  # px of one level-0 tile at this level
    for r in range(rows):
        for c in range(cols):
            block = choice[r * factor : (r + 1) * factor, c * factor : (c + 1) * factor]
            if pool_jpeg is not None:  # level 0: one pool tile, reused as encoded
                k = int(block[0, 0]) if block.size else -1
                yield pool_jpeg[k] if k >= 0 else glass_jpeg
                continue
            if block.size == 0 or (block < 0).all():
                yield glass_jpeg
                continue
            full = np.full((factor, factor), -1, np.int16)
            full[: block.shape[0], : block.shape[1]] = block
            parts = np.where((full >= 0)[..., None, None, None], pool[np.maximum(full, 0)], glass[:s, :s])
            yield _encode(np.ascontiguousarray(parts.transpose(0, 2, 1, 3, 4).reshape(tile, tile, 3)), quality)


def write_mosaic_slide(
    path: str | Path, width: int, height: int, source: str | Path | np.ndarray, mpp: float = 0.5, seed: int = 0,
    tile_size: int = 256, pool_size: int = 256, n_tissue: int = 4, jpeg_quality: int = 90, tissue_scale: float = 1.0,
) -> MosaicSlide:
    """Write an Aperio-style pyramidal SVS of real tissue tiles (see the module doc).

    ``source`` is a real slide file (its level 0 is read whole: use a small one such as
    cmu-1-small-region.svs) or an RGB array. ``tissue_scale`` grows (or shrinks) every tissue
    piece of the layout about its centroid, clipped to the slide: the layout alone covers at
    most about 40 % of the slide, a scale of 1.7 gives dense slides (60-90 %) whose pieces touch.
    Written under a temporary name, renamed into place."""
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 (JPEG 4:2:0 blocks), got {tile_size}")
    image = source if isinstance(source, np.ndarray) else read_source(source)
    pool = tissue_pool(image, tile_size, pool_size, seed)
    tissue, _ = make_layout(width, height, mpp, seed, n_tissue, 0)
    if tissue_scale != 1.0 and not tissue.is_empty:
        grown = [shapely.affinity.scale(p, tissue_scale, tissue_scale, origin="centroid") for p in tissue.geoms]
        tissue = as_multipolygon(shapely.union_all(grown).intersection(shapely.box(0, 0, width, height)))
    choice = tile_choices(tissue, width, height, tile_size, pool_size, seed)
    glass_tile = np.full((tile_size, tile_size, 3), GLASS_RGB, np.uint8)
    # Levels whose tile still holds whole level-0 tiles (factor <= tile): 1, 4, 16, 64 for 256-px tiles.
    factors = [f for f in pyramid_downsamples(width, height) if f <= tile_size]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with tifffile.TiffWriter(tmp, bigtiff=width * height > 1_200_000_000) as tw:
            for k, f in enumerate(factors):
                pool_jpeg = [_encode(t, jpeg_quality) for t in pool.tiles] if f == 1 else None
                level_pool = pool.tiles if f == 1 else _box_filtered(pool.tiles, f)
                description = _aperio_description(width, height, tile_size, mpp, jpeg_quality) if k == 0 else None
                tw.write(
                    _level_tiles(choice, level_pool, glass_tile, f, width, height, tile_size, jpeg_quality, pool_jpeg),
                    shape=(height // f, width // f, 3), dtype=np.uint8, tile=(tile_size, tile_size),
                    compression="jpeg", photometric="rgb", subsampling=(2, 2), metadata=None, description=description,
                )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return MosaicSlide(path, width, height, mpp, tile_size, tissue, choice, pool)


def _main(argv: list[str]) -> None:
    """``python -m wsipipe.slides.mosaic SIZE OUT.svs [SOURCE]``: write a SIZE x SIZE mosaic slide."""
    import time

    size, out = int(argv[0]), Path(argv[1])
    source = argv[2] if len(argv) > 2 else Path(__file__).resolve().parents[2] / "shared/data/slides/cmu-1-small-region.svs"
    t0 = time.perf_counter()
    write_mosaic_slide(out, size, size, source)
    print(f"{out}: {size}x{size} in {time.perf_counter() - t0:.1f} s, {out.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
