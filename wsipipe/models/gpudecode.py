"""Patches decoded and assembled on the inference device, straight from a slide's JPEG tiles.

The two-stage path decodes tiles on the CPU (libjpeg-turbo through imagecodecs), stores
patches and reads them back. Here the compressed tile bytes of a chunk of patches are read
with ``os.pread`` and decoded in one batched ``torchvision.io.decode_jpeg`` call on the
device (CUDA: nvJPEG); the patches are cut from the decoded tiles there and, where the grid
reads a finer level than the target by an integer factor f, reduced by an f x f area average.
The result is an (N, 3, P, P) uint8 tensor on the device, ready to normalise.

TIFF-JPEG tiles are often abbreviated streams whose Huffman and quantisation tables sit in
the TIFF's JPEGTables tag, so each tile becomes a complete stream first: the tables without
their EOI, then the tile without its SOI. Colour space: Aperio writes RGB-encoded JPEG
without a JFIF or Adobe marker (component ids 0, 1, 2), which a JPEG decoder takes for
YCbCr; we insert an Adobe APP14 marker saying what the TIFF says (transform 0 = RGB,
1 = YCbCr), the choice tifffile's ``jpeg_decode_colorspace`` makes for the CPU reader.
A stream with a JFIF marker (YCbCr) is decoded as it is.

Anything else falls back, never silently giving other pixels: levels whose tiles are not
8-bit JPEG (JPEG 2000 SVS, for one) have their tiles decoded on the CPU by
:class:`~wsipipe.slides.tiffread.TiledLevel` and assembled on the device; slides without a
direct tile reader, and grids that resample by a non-integer factor, are read by
:func:`wsipipe.tiles.tiling.read_patches` and moved to the device. Before a level's tiles are
first decoded on a device, one tile is decoded both ways and compared: a decoder that gets
the colour space wrong (a mean difference of tens of levels) sends that level to the CPU
decoder too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import warnings
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from wsipipe.errors import SlideReadError
from wsipipe.slides.slide import Slide
from wsipipe.slides.tiffread import TiledLevel
from wsipipe.tiles.tiling import GridSpec, area_factor, read_patches, row_runs

log = logging.getLogger(__name__)

# libjpeg colour-space codes in tifffile's jpeg_decode_colorspace -> Adobe APP14 transform flag.
_ADOBE_TRANSFORM = {2: 0, 3: 1}  # JCS_RGB: no transform; JCS_YCbCr: YCbCr
# A device decoder whose mean difference from the CPU decoder on a probe tile exceeds this
# has the colour space wrong (that costs tens of levels); decoders that agree differ by < 2.
COLOUR_CHECK_MEAN = 2.0


def adobe_marker(transform: int) -> bytes:
    """An Adobe APP14 segment: version 100, no flags, the colour ``transform`` (0 RGB, 1 YCbCr)."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def device_decode_problem(level: TiledLevel) -> str | None:
    """Why this level's tiles cannot go to ``decode_jpeg``, or None when they can."""
    # TiledLevel keeps tifffile's colour-space pair only for plain 8-bit JPEG tiles; it is
    # the same decision the CPU reader decodes with, so both paths agree on what is JPEG.
    if getattr(level, "_jpeg", None) is not None:
        return None
    first = next((i for i, c in enumerate(level.counts) if c > 0), None)
    head = b"" if first is None else os.pread(level_fd(level), 12, int(level.offsets[first]))
    if head.startswith(b"\xff\x4f\xff\x51") or head[4:8] == b"jP  ":
        kind = "JPEG 2000"
    elif first is None:
        kind = "empty (no stored tile)"
    else:
        kind = "not 8-bit JPEG"
    return f"tiles are {kind}: torchvision.io.decode_jpeg decodes only JPEG (read_patches_on_device decodes them on the CPU)"


def level_fd(level: TiledLevel) -> int:
    """The level's open file descriptor (pread is position-free, so sharing it is safe)."""
    return level._fd


def jpeg_stream(level: TiledLevel, data: bytes) -> bytes:
    """A tile's bytes as a complete JPEG stream the device decoder reads with the right colours."""
    if level.jpegtables is not None:
        tables = bytes(level.jpegtables)
        data = tables[:-2] + data[2:]  # tables without EOI, tile without SOI
    colorspace = level._jpeg[0] if level._jpeg is not None else None
    transform = _ADOBE_TRANSFORM.get(colorspace) if colorspace is not None else None
    if transform is not None and b"JFIF\x00" not in data[:64]:
        data = data[:2] + adobe_marker(transform) + data[2:]
    return data


def decode_tiles(level: TiledLevel, indices: list[int], device: torch.device | str) -> torch.Tensor:
    """Tiles ``indices`` (row-major) of ``level`` decoded in one batched call on ``device``.

    Returns (len(indices), 3, tile_h, tile_w) uint8 on the device; sparse tiles (no stored
    bytes) are the background colour. Raises :class:`SlideReadError` naming the file when the
    level's tiles are not JPEG, or a tile does not decode to the level's tile size."""
    problem = device_decode_problem(level)
    if problem is not None:
        raise SlideReadError(level.path, problem)
    device = torch.device(device)
    stored = [k for k, i in enumerate(indices) if int(level.counts[i]) > 0]
    fd = level_fd(level)
    streams = [
        torch.frombuffer(bytearray(jpeg_stream(level, os.pread(fd, int(level.counts[indices[k]]), int(level.offsets[indices[k]])))),
                         dtype=torch.uint8)
        for k in stored
    ]
    if not streams:
        return _background(level, len(indices), device)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 flags its image codecs as deprecated (for torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        raise SlideReadError(level.path, f"device JPEG decode of {len(streams)} tiles failed: {exc}") from None
    for k, tile in zip(stored, decoded, strict=True):
        if tile.shape != (3, level.tile_h, level.tile_w):
            raise SlideReadError(
                level.path, f"tile {indices[k]} decoded to {tuple(tile.shape)}, not (3, {level.tile_h}, {level.tile_w})"
            )
    if len(stored) == len(indices):  # the usual case: one copy of the batch, not one per tile
        return torch.stack(decoded)
    out = _background(level, len(indices), device)
    out[torch.as_tensor(stored, device=device)] = torch.stack(decoded)
    return out


def _background(level: TiledLevel, n: int, device: torch.device) -> torch.Tensor:
    bg = torch.as_tensor(level.background, dtype=torch.uint8, device=device)
    return bg.view(1, 3, 1, 1).expand(n, 3, level.tile_h, level.tile_w).clone()


def decode_tiles_cpu(level: TiledLevel, indices: list[int], device: torch.device | str) -> torch.Tensor:
    """The same tiles decoded on the CPU by the level's own reader (cached), then moved to ``device``."""
    tiles = np.stack([level.tile(i) for i in indices]) if indices else np.empty((0, level.tile_h, level.tile_w, 3), np.uint8)
    return torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2)


_told: weakref.WeakSet[TiledLevel] = weakref.WeakSet()  # levels whose CPU fallback was logged
_colour_ok: weakref.WeakKeyDictionary[TiledLevel, dict[str, bool]] = weakref.WeakKeyDictionary()
_colour_lock = threading.Lock()


def device_decode_agrees(level: TiledLevel, device: torch.device | str) -> bool:
    """True when the device decoder gives this level's colours: one probe tile decoded on the
    device and on the CPU differs by at most :data:`COLOUR_CHECK_MEAN` on average. Checked once
    per level and device."""
    key = str(torch.device(device))
    with _colour_lock:
        known = _colour_ok.setdefault(level, {}).get(key)
    if known is not None:
        return known
    ok = device_decode_problem(level) is None
    probe = next((i for i, c in enumerate(level.counts) if c > 0), None) if ok else None
    if probe is not None:
        try:
            on_device = decode_tiles(level, [probe], device)[0].permute(1, 2, 0).cpu().numpy()
        except SlideReadError as exc:  # a stream this decoder refuses: the CPU decoder reads the level
            log.warning("%s; decoding this level's tiles on the CPU", exc)
            on_device = None
        mean = np.inf if on_device is None else float(np.abs(on_device.astype(np.int16) - level.tile(probe).astype(np.int16)).mean())
        ok = mean <= COLOUR_CHECK_MEAN
        if not ok and on_device is not None:
            log.warning("%s: %s decodes this level's JPEG tiles %.1f levels off the CPU decoder on average "
                        "(colour space); decoding them on the CPU", level.path, key, mean)
    with _colour_lock:
        _colour_ok.setdefault(level, {})[key] = ok
    return ok


def integer_factor(spec: GridSpec) -> int | None:
    """f when the grid's patches are f x f blocks of whole pixels of the level it reads (1 at an
    exact level), else None (a fractional resample, which the CPU reader does). The tiler's
    area factor, whatever ``spec.resample`` says: the device path always averages areas."""
    return 1 if not spec.needs_resize else area_factor(dataclasses.replace(spec, resample="area"))


def read_patches_on_device(
    slide: Slide, spec: GridSpec, grid_ij: np.ndarray, device: torch.device | str, decode: str = "device"
) -> torch.Tensor:
    """Patches (N, 3, P, P) uint8 on ``device`` for the grid cells ``grid_ij`` ((row, col), row-major).

    ``decode="device"`` decodes the JPEG tiles on the device (falling back to the CPU decoder
    for levels it cannot decode, see the module doc); ``"cpu"`` decodes them on the CPU and only
    assembles on the device. At an exact level the pixels are the tiles' (the CPU reader's within
    the decoders' difference); at an integer factor f they are f x f area averages, rounded half
    up (``tile.resample: area``'s pixels, whatever ``spec.resample`` says)."""
    if decode not in ("cpu", "device"):
        raise ValueError(f"decode={decode!r}: use 'cpu' or 'device' (tile.decode)")
    device = torch.device(device)
    grid_ij = np.asarray(grid_ij, dtype=np.int64).reshape(-1, 2)
    p = spec.patch_size
    level = slide.fast_reader(spec.level)
    f = integer_factor(spec)
    if level is None or f is None or len(grid_ij) == 0:
        patches = read_patches(slide, spec, grid_ij)
        return torch.from_numpy(patches).to(device).permute(0, 3, 1, 2).contiguous()
    problem = device_decode_problem(level) if decode == "device" else None
    on_device = decode == "device" and problem is None and device_decode_agrees(level, device)
    if problem is not None and level not in _told:  # once per level: every chunk of the slide would say it again
        _told.add(level)
        log.info("%s level %d: %s", slide.path, spec.level, problem)
    size, step = p * f, spec.stride * f  # level px of one patch and of one grid step
    runs = row_runs(grid_ij, spec)
    # Every tile any run touches, decoded once in one batch; one extra slot is the background.
    grids: list[tuple[np.ndarray, int, int]] = []
    for a, b in runs:
        x0, y0 = int(grid_ij[a, 1]) * step, int(grid_ij[a, 0]) * step
        x1, y1 = int(grid_ij[b - 1, 1]) * step + size, y0 + size
        tr = np.arange(y0 // level.tile_h, (y1 - 1) // level.tile_h + 1)
        tc = np.arange(x0 // level.tile_w, (x1 - 1) // level.tile_w + 1)
        rows_in = -(-level.height // level.tile_h)
        inside = (tr[:, None] < rows_in) & (tc[None, :] < level.cols)
        index = np.where(inside, tr[:, None] * level.cols + tc[None, :], -1)
        grids.append((index, int(tc[0]) * level.tile_w, int(tr[0]) * level.tile_h))
    wanted = sorted({int(i) for index, _, _ in grids for i in index.ravel() if i >= 0})
    tiles = decode_tiles(level, wanted, device) if on_device else decode_tiles_cpu(level, wanted, device)
    tiles = torch.cat([tiles, _background(level, 1, device)])
    slot = np.full(int(level.counts.size) + 1, len(wanted), np.int64)  # -1 (outside) -> background
    slot[wanted] = np.arange(len(wanted))
    bg = torch.as_tensor(level.background, dtype=torch.uint8, device=device).view(3, 1, 1)
    out = torch.empty((len(grid_ij), 3, p, p), dtype=torch.uint8, device=device)
    for (a, b), (index, ox, oy) in zip(runs, grids, strict=True):
        r, c = index.shape
        picked = tiles[torch.from_numpy(slot[index.ravel()]).to(device)]
        canvas = picked.view(r, c, 3, level.tile_h, level.tile_w).permute(2, 0, 3, 1, 4).reshape(3, r * level.tile_h, c * level.tile_w)
        # Partial tiles at the level's right and bottom edges hold padding: background there.
        if ox + canvas.shape[2] > level.width:
            canvas[:, :, level.width - ox :] = bg
        if oy + canvas.shape[1] > level.height:
            canvas[:, level.height - oy :, :] = bg
        x0, y0 = int(grid_ij[a, 1]) * step, int(grid_ij[a, 0]) * step
        strip = canvas[:, y0 - oy : y0 - oy + size, x0 - ox :]
        windows = strip.unfold(2, size, step)  # (3, size, windows, size): one window per grid step
        cols = torch.from_numpy(grid_ij[a:b, 1] - grid_ij[a, 1]).to(device)
        run = windows[:, :, cols].permute(2, 0, 1, 3)  # (n, 3, size, size)
        out[a:b] = run if f == 1 else area_reduce(run, f)
    return out


def area_reduce(patches: torch.Tensor, f: int) -> torch.Tensor:
    """(N, 3, f*P, f*P) uint8 -> (N, 3, P, P) uint8: the mean of each f x f block, rounded half up."""
    mean = F.avg_pool2d(patches.float(), kernel_size=f)
    return torch.floor(mean + 0.5).clamp_(0, 255).to(torch.uint8)
