"""Fast path for TIFF-family slides: read and decode the stored tiles ourselves.

OpenSlide's ``read_region`` costs several times the JPEG decode itself (it paints
every tile through cairo and converts ARGB). For Aperio SVS and generic tiled TIFF,
whose levels are plain tiled TIFF pages, we read the compressed tile bytes with
``os.pread`` (thread-safe, no shared file position) and decode them with tifffile's
codecs (imagecodecs: libjpeg-turbo, OpenJPEG), each tile once, through a small
shared cache. The pixels are the same as OpenSlide's (same decoders; checked
pixel for pixel in the tests on real JPEG and JPEG 2000 slides), and at levels > 0
they sit exactly on the level's pixel grid.

Reads can also come area-reduced by an integer factor (a 0.25 µm/px scan tiled at
0.5 µm/px): each tile is reduced once, right after its decode, and cached reduced, so a
patch is cut from tiles a quarter the size and no patch-sized resampling happens at all.

Anything else (other vendors, odd sample formats, a page that doesn't match the
level OpenSlide reports) returns None from :func:`open_level` and callers fall
back to OpenSlide.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict

import imagecodecs
import numpy as np
import tifffile

from wsipipe.errors import SlideReadError
from wsipipe.slides.resample import area_reduce

FAST_VENDORS = {"aperio", "generic-tiff"}
# Decoded-tile cache per level: this many full tile rows of the level, within these bounds.
# Patches are read in row-major order and a patch spans at most 3 tile rows (2x resampled,
# 448 level px over 256-px tiles; 2 at native size), so 4 rows keep the row a patch row
# shares with the next one cached however wide the tissue is: each tile is decoded once.
CACHE_TILE_ROWS = 4
CACHE_BYTES_MIN, CACHE_BYTES_MAX = 128 << 20, 512 << 20


class TiledLevel:
    """One pyramid level as a tiled TIFF page, readable from many threads."""

    def __init__(
        self, path: str, page: tifffile.TiffPage, background: tuple[int, int, int], cache_bytes: int | None = None
    ):
        self.path = path
        self.height, self.width = page.shape[:2]
        self.tile_h, self.tile_w = page.tilelength, page.tilewidth
        self.cols = -(-self.width // self.tile_w)
        self.offsets = np.asarray(page.dataoffsets)
        self.counts = np.asarray(page.databytecounts)
        self.jpegtables = getattr(page, "jpegtables", None)
        self._decode = page.decode
        # Plain 8-bit JPEG tiles (what Aperio and most tiled TIFFs hold) are decoded by
        # libjpeg-turbo straight into a recycled buffer with the colour spaces tifffile would
        # pick: fresh 192 KiB arrays cost page faults, 14 % of the decode on this VM.
        self._jpeg = None
        if page.compression == 7 and page.bitspersample == 8 and not page.extrasamples:
            self._jpeg = tifffile.tifffile.jpeg_decode_colorspace(
                page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
            )
        self._spare: list[np.ndarray] = []  # evicted tiles nobody else references, reused as decode targets
        self.background = np.asarray(background, np.uint8)
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int | tuple[int, int], np.ndarray] = OrderedDict()  # tile, or (tile, factor)
        tile_bytes = self.tile_h * self.tile_w * 3
        if cache_bytes is None:
            cache_bytes = min(max(CACHE_TILE_ROWS * self.cols * tile_bytes, CACHE_BYTES_MIN), CACHE_BYTES_MAX)
        self._cache_max = max(1, cache_bytes // tile_bytes)
        self.decoded = 0  # tiles decoded so far (benchmarks check each is decoded once)
        self.recycled = 0  # of which decoded into an evicted tile's buffer

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self.drop_cache()

    def drop_cache(self) -> None:
        """Free the decoded tiles (a reader still holding one keeps its own reference)."""
        with self._lock:
            self._cache.clear()
            self._spare.clear()

    def __del__(self) -> None:  # a reader dropped without close() (an evicted shared handle)
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def can_reduce(self, factor: int) -> bool:
        """Whether reads may be area-reduced by ``factor``: it must divide the tile edges."""
        return factor >= 1 and self.tile_h % factor == 0 and self.tile_w % factor == 0

    def tile(self, index: int, factor: int = 1) -> np.ndarray:
        """Decoded tile ``index`` (row-major), (tile_h, tile_w, 3) uint8, cached; at ``factor`` > 1
        area-reduced to (tile_h / factor, tile_w / factor, 3) and cached in that form only."""
        key = index if factor == 1 else (index, factor)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        count = int(self.counts[index])
        if count == 0:  # sparse tile: nothing was scanned here
            arr = np.broadcast_to(self.background, (self.tile_h // factor, self.tile_w // factor, 3))
        else:
            data = os.pread(self._fd, count, int(self.offsets[index]))
            with self._lock:
                spare = self._spare.pop() if self._spare else None
                self.recycled += spare is not None
            arr = self.decode(data, index, out=spare)
            if factor > 1:
                # An edge tile's padding is not image: blocks straddling the edge average the
                # image with the background, as a read past the edge would give them.
                inside_h = min(self.tile_h, self.height - (index // self.cols) * self.tile_h)
                inside_w = min(self.tile_w, self.width - (index % self.cols) * self.tile_w)
                if inside_h < self.tile_h or inside_w < self.tile_w:
                    arr = np.array(arr)  # a private copy: it may be a read-only decoder buffer
                    arr[inside_h:] = self.background
                    arr[:, inside_w:] = self.background
                full, arr = arr, area_reduce(arr, factor)
                with self._lock:  # the full-size tile is nobody's: its buffer serves the next decode
                    if full.flags.writeable and full.flags.c_contiguous and full.shape[:2] == (self.tile_h, self.tile_w) \
                            and len(self._spare) < 4:
                        self._spare.append(full)
        with self._lock:
            self.decoded += 1
            self._cache[key] = arr
            while len(self._cache) > self._cache_max:
                _, old = self._cache.popitem(last=False)
                # Recycle only what no reader still holds: once out of the cache nobody can
                # get it again, so "only `old` and getrefcount's argument refer to it" is final.
                if sys.getrefcount(old) == 2 and old.flags.writeable and old.shape[0] == self.tile_h and len(self._spare) < 4:
                    self._spare.append(old)
        return arr

    def decode(self, data: bytes, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tile ``index``'s compressed bytes -> (tile_h, tile_w, 3) uint8, into ``out`` when the codec allows."""
        if self._jpeg is not None:
            colorspace, outcolorspace = self._jpeg
            return imagecodecs.jpeg_decode(
                data, tables=self.jpegtables, colorspace=colorspace, outcolorspace=outcolorspace,
                shape=(self.tile_h, self.tile_w), out=out,
            ).reshape(self.tile_h, self.tile_w, 3)
        decoded, _, _ = self._decode(data, index, jpegtables=self.jpegtables)
        if decoded is None:  # tifffile's decoder gives None for bytes it cannot make a tile of
            raise SlideReadError(self.path, f"tile {index} did not decode")
        return decoded.reshape(self.tile_h, self.tile_w, -1)[..., :3]

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None, factor: int = 1) -> np.ndarray:
        """RGB (h, w, 3) at level pixel (x, y); outside the image reads as background.

        ``out`` (an (h, w, 3) uint8 array, e.g. a patch of the chunk being built) is filled
        in place, so pixels go from the decoded tile to their destination in one copy.
        ``factor`` > 1 (see :meth:`can_reduce`): the level area-reduced by ``factor``, and
        (x, y, w, h) are in its pixels (a block straddling the image edge averages the image
        with the background, exactly as reducing a read past the edge would)."""
        out = np.empty((h, w, 3), np.uint8) if out is None else out
        tile_h, tile_w = self.tile_h // factor, self.tile_w // factor
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, -(-self.width // factor)), min(y + h, -(-self.height // factor))
        if x0 > x or y0 > y or x1 < x + w or y1 < y + h:
            out[...] = self.background  # only requests past the image edge need it
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // tile_h, (y1 - 1) // tile_h + 1):
            for tx in range(x0 // tile_w, (x1 - 1) // tile_w + 1):
                tile = self.tile(ty * self.cols + tx, factor)
                # Intersection of this tile with the request, in image coordinates.
                ix0, iy0 = max(x0, tx * tile_w), max(y0, ty * tile_h)
                ix1, iy1 = min(x1, (tx + 1) * tile_w), min(y1, (ty + 1) * tile_h)
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[
                    iy0 - ty * tile_h : iy1 - ty * tile_h, ix0 - tx * tile_w : ix1 - tx * tile_w
                ]
        return out


def open_level(
    path: str, vendor: str | None, level_dims: tuple[int, int], background=(255, 255, 255), cache_bytes: int | None = None
) -> TiledLevel | None:
    """A fast reader for the TIFF page holding this level, or None when we can't match OpenSlide.
    ``cache_bytes`` bounds its decoded tiles (default: :data:`CACHE_TILE_ROWS` tile rows, 128–512 MiB)."""
    if vendor not in FAST_VENDORS:
        return None
    try:
        with tifffile.TiffFile(path) as tf:
            for page in tf.pages:
                if (
                    isinstance(page, tifffile.TiffPage)
                    and page.is_tiled
                    and page.shape[:2] == (level_dims[1], level_dims[0])
                    and page.dtype == np.uint8
                    and page.samplesperpixel == 3
                    and page.planarconfig == 1
                    and page.tiledepth == 1
                ):
                    return TiledLevel(str(path), page, tuple(background), cache_bytes)
    except Exception:  # anything odd about the file: OpenSlide remains the reader
        return None
    return None
