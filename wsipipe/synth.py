"""Synthetic H&E-like whole-slide images with ground truth, written as real pyramidal
tiled-JPEG files that OpenSlide opens (Aperio-style SVS or generic tiled TIFF).

The layout (tissue pieces, tumor regions) is pure geometry in level-0 pixels. Pixels
are composed tile by tile from seamless periodic textures (stroma with sparse small
nuclei; tumor with dense, large, dark, irregular nuclei; glass), chosen per pixel from
a class map rasterised strip by strip. Lower pyramid levels are built from level-0
strips through a temporary raw file, so a 100k x 100k slide is written in bounded
memory. Ground truth is written beside the slide as QuPath GeoJSON.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import shapely
import tifffile
from scipy import ndimage
from shapely.geometry import MultiPolygon, Point, Polygon

from wsipipe.export import write_geojson
from wsipipe.geometry import as_multipolygon, rasterize

TEXTURE = 2048  # period of the textures, px; a multiple of every tile size we write
CLASS_SCALE = 8  # class map resolution: one class pixel per 8x8 level-0 px (4 µm at 0.5 mpp)
GLASS, NORMAL, TUMOR = 0, 1, 2


@dataclass(frozen=True)
class SynthSlide:
    path: Path
    geojson_path: Path
    width: int
    height: int
    mpp: float
    tissue: MultiPolygon
    tumor: MultiPolygon


# --------------------------------------------------------------------------- layout (pure)


def _blob(cx: float, cy: float, rx: float, ry: float, rng: np.random.Generator, wobble: float = 0.12) -> Polygon:
    """An irregular closed shape: an ellipse whose radius wobbles with a few harmonics."""
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += rng.uniform(0, wobble / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rot = rng.uniform(0, np.pi)
    x, y = rx * r * np.cos(theta), ry * r * np.sin(theta)
    xr, yr = x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)
    return shapely.make_valid(Polygon(np.stack([cx + xr, cy + yr], 1)))


def make_layout(
    width: int, height: int, mpp: float, seed: int = 0, n_tissue: int = 3, n_tumor: int = 2,
    tumor_radius_um: tuple[float, float] = (500.0, 900.0),
) -> tuple[MultiPolygon, MultiPolygon]:
    """Separate tissue pieces (never touching each other or the border) and tumor regions
    inside them, in level-0 px. Deterministic per seed."""
    rng = np.random.default_rng(seed)
    if n_tissue == 0:
        return MultiPolygon(), MultiPolygon()
    cols = math.ceil(math.sqrt(n_tissue * width / height))
    rows = math.ceil(n_tissue / cols)
    cw, ch = width / cols, height / rows
    margin = 0.08
    pieces: list[Polygon] = []
    for k in range(n_tissue):
        i, j = divmod(k, cols)
        cx = (j + 0.5 + rng.uniform(-0.05, 0.05)) * cw
        cy = (i + 0.5 + rng.uniform(-0.05, 0.05)) * ch
        rx = cw * rng.uniform(0.24, 0.30)
        ry = ch * rng.uniform(0.24, 0.30)
        blob = _blob(cx, cy, rx, ry, rng)
        cell = shapely.box(j * cw + margin * cw, i * ch + margin * ch, (j + 1) * cw - margin * cw, (i + 1) * ch - margin * ch)
        pieces.extend(as_multipolygon(blob.intersection(cell)).geoms)
    tissue = as_multipolygon(shapely.union_all(pieces))
    tumors: list[Polygon] = []
    lo, hi = (r / mpp for r in tumor_radius_um)
    for _ in range(n_tumor):
        host = tissue.geoms[int(rng.integers(len(tissue.geoms)))]
        radius = rng.uniform(lo, hi)
        inner = host.buffer(-radius * 0.6)
        if inner.is_empty:
            inner = host.buffer(-min(host.bounds[2] - host.bounds[0], host.bounds[3] - host.bounds[1]) * 0.25)
        if inner.is_empty:
            continue
        centre = _random_point_in(inner, rng)
        tumors.append(_blob(centre.x, centre.y, radius, radius * rng.uniform(0.7, 1.0), rng, wobble=0.2))
    tumor = as_multipolygon(shapely.union_all(tumors).intersection(tissue)) if tumors else MultiPolygon()
    return tissue, tumor


def _random_point_in(geom, rng: np.random.Generator) -> Point:
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(1000):
        p = Point(rng.uniform(minx, maxx), rng.uniform(miny, maxy))
        if geom.contains(p):
            return p
    return geom.representative_point()


# --------------------------------------------------------------------------- textures


def _periodic_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise that wraps around (Gaussian-filtered white noise in Fourier space), scaled to [-1, 1]."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    spectrum = np.fft.rfft2(white) * np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(spectrum, s=shape)
    return out / max(np.abs(out).max(), 1e-9)


def _nuclei_map(size: int, density: float, radius: tuple[float, float], elong: float, rng: np.random.Generator) -> np.ndarray:
    """Float map of nuclear stain (0..1) with nuclei drawn on a torus (seamless)."""
    from skimage.draw import ellipse

    out = np.zeros((size, size), np.float32)
    n = rng.poisson(density * size * size)
    ys, xs = rng.uniform(0, size, n), rng.uniform(0, size, n)
    rs = rng.uniform(*radius, n)
    ratio = rng.uniform(1.0, elong, n)
    rot = rng.uniform(-np.pi, np.pi, n)
    dark = rng.uniform(0.65, 1.0, n)
    for y, x, r, q, a, d in zip(ys, xs, rs, ratio, rot, dark):
        rr, cc = ellipse(y, x, r, r / q, rotation=a)
        np.maximum.at(out, (rr % size, cc % size), d)
    # Soften edges and give chromatin some texture.
    out = ndimage.gaussian_filter(out, 0.8, mode="wrap")
    grain = 1.0 - 0.25 * rng.random((size, size), dtype=np.float32)
    return np.clip(out * grain, 0, 1)


def _stain(base_rgb, hema_rgb, nuclei: np.ndarray, modulation: np.ndarray) -> np.ndarray:
    base = np.asarray(base_rgb, np.float32) * (1 + 0.06 * modulation[..., None])
    hema = np.asarray(hema_rgb, np.float32)
    img = base * (1 - nuclei[..., None]) + hema * nuclei[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


@lru_cache(maxsize=2)
def make_textures(seed: int, size: int = TEXTURE) -> np.ndarray:
    """(3, size, size, 3) uint8 periodic textures for glass, normal tissue and tumor (read-only, cached)."""
    rng = np.random.default_rng(seed + 1_000_003)
    glass = np.clip(239 + 2.0 * rng.standard_normal((size, size, 1)) + 2 * _periodic_noise((size, size), 40, rng)[..., None], 0, 255)
    glass = np.repeat(glass, 3, axis=2).astype(np.uint8)
    glass[..., 1] -= 2  # a faint warm cast, like real glass under a scanner lamp
    fibres = _periodic_noise((size, size), 6, rng) * 0.6 + _periodic_noise((size, size), 60, rng) * 0.4
    stroma_nuc = _nuclei_map(size, 0.0007, (3.5, 6.0), 2.5, rng)
    normal = _stain((236, 160, 196), (95, 55, 150), stroma_nuc, fibres)
    cyto = _periodic_noise((size, size), 20, rng)
    tumor_nuc = _nuclei_map(size, 0.0042, (6.5, 11.0), 1.6, rng)
    tumor = _stain((208, 140, 190), (62, 32, 118), tumor_nuc, cyto)
    textures = np.stack([glass, normal, tumor])
    textures.setflags(write=False)
    return textures


# --------------------------------------------------------------------------- writing


def _class_strip(tissue: MultiPolygon, tumor: MultiPolygon, y0: int, rows: int, width: int) -> np.ndarray:
    """Class map (GLASS/NORMAL/TUMOR) of level-0 rows [y0, y0+rows) at 1/CLASS_SCALE resolution."""
    shape = (math.ceil(rows / CLASS_SCALE), math.ceil(width / CLASS_SCALE))
    band = shapely.box(0, y0, width, y0 + rows)
    cls = rasterize(tissue.intersection(band), shape, scale=CLASS_SCALE, offset=(0, y0)).astype(np.uint8)
    if not tumor.is_empty:
        cls[rasterize(tumor.intersection(band), shape, scale=CLASS_SCALE, offset=(0, y0))] = TUMOR
    return cls


def _level0_strips(tissue, tumor, textures, width, height, tile) -> Iterator[np.ndarray]:
    """Level-0 strips of ``tile`` rows (full width, padded to whole tiles with glass)."""
    padded_w = math.ceil(width / tile) * tile
    for y0 in range(0, height, tile):
        cls = _class_strip(tissue, tumor, y0, tile, padded_w)
        cls = np.repeat(np.repeat(cls, CLASS_SCALE, 0), CLASS_SCALE, 1)[:tile, :padded_w]
        ty = y0 % TEXTURE
        strip = np.empty((tile, padded_w, 3), np.uint8)
        for x0 in range(0, padded_w, TEXTURE):
            w = min(TEXTURE, padded_w - x0)
            c = cls[:, x0 : x0 + w, None]
            src = textures[:, ty : ty + tile, :w]
            strip[:, x0 : x0 + w] = np.where(c == TUMOR, src[TUMOR], np.where(c == NORMAL, src[NORMAL], src[GLASS]))
        yield strip


def _tiles(strips: Iterator[np.ndarray], tile: int, sink=None) -> Iterator[np.ndarray]:
    for strip in strips:
        if sink is not None:
            sink(strip)
        for x0 in range(0, strip.shape[1], tile):
            yield strip[:, x0 : x0 + tile]


def _downsample(strip: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter reduction by an integer factor (PIL's reduce: a C loop, exact block means)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(strip)).reduce(factor))


def _strips_from_file(path: Path, width: int, height: int, tile: int) -> Iterator[np.ndarray]:
    """Re-read a raw RGB level written row by row, as strips of ``tile`` rows padded to whole tiles."""
    padded_w = math.ceil(width / tile) * tile
    row_bytes = width * 3
    with path.open("rb") as fh:
        for y0 in range(0, height, tile):
            rows = min(tile, height - y0)
            data = np.frombuffer(fh.read(rows * row_bytes), np.uint8).reshape(rows, width, 3)
            strip = np.full((tile, padded_w, 3), 240, np.uint8)
            strip[:rows, :width] = data
            yield strip


def write_synthetic_slide(
    path: str | Path, width: int = 12000, height: int = 9000, mpp: float = 0.5, seed: int = 0, fmt: str = "svs",
    tile_size: int = 256, n_tissue: int = 3, n_tumor: int = 2, jpeg_quality: int = 90,
    layout: tuple[MultiPolygon, MultiPolygon] | None = None,
) -> SynthSlide:
    """Write a synthetic slide (``fmt`` "svs" = Aperio-style, "tiff" = generic tiled TIFF)."""
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', not {fmt!r}")
    if TEXTURE % tile_size:
        raise ValueError(f"tile_size must divide {TEXTURE}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue, tumor = layout or make_layout(width, height, mpp, seed, n_tissue, n_tumor)
    textures = make_textures(seed)
    # Pyramid: level-0, then every 4x down to under ~1000 px on the long side.
    factors = [1]
    while max(width, height) / (factors[-1] * 4) >= 1000 and len(factors) < 6:
        factors.append(factors[-1] * 4)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    scratch = Path(tempfile.mkdtemp(prefix="wsipipe-synth-", dir=path.parent))
    try:
        with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 3_500_000_000) as tw:
            src_strips = _level0_strips(tissue, tumor, textures, width, height, tile_size)
            level_w, level_h = width, height
            for k, factor in enumerate(factors):
                nxt = factors[k + 1] // factor if k + 1 < len(factors) else None
                raw = scratch / f"level{k + 1}.raw"
                fh = raw.open("wb") if nxt else None

                def sink(strip, fh=fh, nxt=nxt, lw=level_w):
                    if fh is not None:
                        small = _downsample(strip[:, : (lw // nxt) * nxt], nxt)
                        fh.write(np.ascontiguousarray(small).tobytes())

                tw.write(
                    _tiles(src_strips, tile_size, sink),
                    shape=(level_h, level_w, 3), dtype=np.uint8, tile=(tile_size, tile_size),
                    compression="jpeg", compressionargs={"level": jpeg_quality}, photometric="rgb",
                    description=_description(fmt, width, height, level_w, level_h, tile_size, mpp, jpeg_quality) if k == 0 else None,
                    resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)) if fmt == "tiff" else None,
                    resolutionunit="CENTIMETER" if fmt == "tiff" else None,
                    subfiletype=0 if k == 0 else 1 if fmt == "tiff" else 0, metadata=None,
                )
                if fh is not None:
                    fh.close()
                    # The sink wrote whole strips: rows of the next level are exact 1/nxt block means.
                    level_w, level_h = level_w // nxt, (math.ceil(level_h / tile_size) * tile_size) // nxt
                    level_h = min(level_h, (height // factors[k + 1]))
                    src_strips = _strips_from_file(raw, level_w, level_h, tile_size)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        for f in scratch.glob("*"):
            f.unlink()
        scratch.rmdir()
    geojson = write_geojson(path.with_suffix(".geojson"), {"Tissue": tissue, "Tumor": tumor})
    return SynthSlide(path, geojson, width, height, mpp, tissue, tumor)


def _description(fmt, width, height, lw, lh, tile, mpp, quality) -> str:
    if fmt == "svs":
        # OpenSlide recognises Aperio files by this prefix and parses the |key = value| fields.
        return (
            f"Aperio Image Library v12.0.5 \r\n{width}x{height} [0,0 {lw}x{lh}] ({tile}x{tile}) "
            f"JPEG/RGB Q={quality}|AppMag = {20 if mpp >= 0.375 else 40}|MPP = {mpp}|wsipipe synthetic = 1"
        )
    return "wsipipe synthetic slide"
