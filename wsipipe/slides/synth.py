"""Synthetic H&E-like whole-slide images with ground truth.

Writes real pyramidal tiled-JPEG files that OpenSlide opens (Aperio-style SVS or generic
tiled TIFF), with the tissue and tumor polygons beside them as QuPath GeoJSON.

How the pixels are made:

* The layout (tissue pieces, tumor regions, and lymphoid aggregates in the normal tissue)
  is pure geometry in level-0 pixels.
* Each pixel class (glass, normal stroma, tumor, lymphoid aggregate) has one seamless
  periodic texture of ``TEXTURE`` px, rendered once per (seed, mpp) with a Beer-Lambert
  H&E stain model: wavy eosin stroma with sparse spindle nuclei and lymphocytes; tumor
  with crowded, large, irregular, hyperchromatic nuclei; aggregates of small round dark
  lymphocytes (as dark as tumor on average, so mean colour alone does not find tumor).
  A pixel's colour is its class texture at ``(x mod TEXTURE, y mod TEXTURE)``, so a
  nucleus that crosses a tile border continues in the next tile: no seams.
* A pixel's class is decided by its centre against the polygons (the rule of
  :func:`wsipipe.geometry.rasterize`, done here by a scanline fill that is fast on tiles),
  so the image follows the ground truth exactly.
* Lower pyramid levels are rendered directly from box-filtered textures (the mean of the
  level-0 texture over each level pixel), not downsampled from level 0; so no level is
  ever held in memory or spilled to disk, and each level is the box-filtered level 0
  everywhere except at class boundaries (where the class is taken at the pixel centre).
* Most tiles lie wholly in one class. Such a tile depends only on its class and its
  offset in the periodic texture, so its JPEG bytes are encoded once and reused; only
  tiles crossing a boundary are composed and encoded. Tiles are handed to tifffile as
  pre-compressed bytes, one at a time: memory does not grow with the slide.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from collections.abc import Iterator

import imagecodecs
import numpy as np
import shapely
import tifffile
from scipy import fft as sfft
from shapely import affinity
from shapely.geometry import MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry

from wsipipe.geojson import write_geojson
from wsipipe.geometry import as_multipolygon

__all__ = [
    "SynthSlide", "make_layout", "write_synthetic_slide", "render_region", "make_textures",
    "pyramid_downsamples", "lymphoid_aggregates", "GLASS", "NORMAL", "TUMOR", "LYMPHOID", "TEXTURE",
]

TEXTURE = 2048  # texture period, level-0 px (1 mm at 0.5 µm/px); power of two so every 4**k level divides it
GLASS, NORMAL, TUMOR, LYMPHOID = 0, 1, 2, 3  # pixel classes; LYMPHOID is normal tissue
MAX_LEVELS = 6
# Encoded uniform tiles kept for reuse. With tiles that divide TEXTURE (the default 256)
# there are only 4 * (TEXTURE / tile)**2 distinct ones per level, ~10 MB; the cap only
# matters for odd tile sizes, whose offsets in the texture rarely repeat.
_CACHE_BYTES = 96 * 2**20

# Scanner illumination (bright, very slightly warm glass) and the stains' optical density
# per unit concentration, taken from target colours under that light: eosin alone at
# concentration 1 gives pink stroma (230, 160, 190); haematoxylin alone, purple-blue
# nuclei (80, 50, 140). Mixing stains by adding densities (Beer-Lambert) darkens the way
# real overlapping stains do, rather than averaging colours.
_LIGHT = np.array([242.0, 240.0, 242.0], np.float32)
_OD_EOSIN = np.log(_LIGHT / np.array([230.0, 160.0, 190.0], np.float32))
_OD_HAEM = np.log(_LIGHT / np.array([80.0, 50.0, 140.0], np.float32))


@dataclass(frozen=True)
class SynthSlide:
    """A generated slide and its ground truth (level-0 px)."""

    path: Path  # the slide file
    geojson_path: Path  # QuPath GeoJSON: "Tissue" and "Tumor" polygons
    width: int
    height: int
    mpp: float
    tissue: MultiPolygon
    tumor: MultiPolygon  # always inside tissue
    # Dense lymphocyte aggregates drawn in the normal tissue (see lymphoid_aggregates):
    # "Tissue", not "Tumor", in the ground truth; here for tests and inspection.
    lymphoid: MultiPolygon = field(default_factory=MultiPolygon)


# --------------------------------------------------------------------------- layout (pure)


def _blob(
    cx: float, cy: float, rx: float, ry: float, rng: np.random.Generator,
    wobble: float = 0.12, roughness: float = 0.02, n_vertices: int = 720,
) -> Polygon:
    """A star-shaped irregular outline around (cx, cy): an ellipse whose radius carries a few
    strong low harmonics (the overall shape) and many weak high ones (a ragged, cut edge).
    Star-shaped with a positive radius, so the polygon is always simple and valid."""
    theta = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += rng.uniform(0, 2 * wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    ks = np.arange(7, 90)
    amps = rng.uniform(0, 1, ks.size) * roughness * (7 / ks) ** 0.8
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    r += (amps[:, None] * np.cos(ks[:, None] * theta + phases[:, None])).sum(0)
    r = np.maximum(r, 0.35)
    rot = rng.uniform(0, np.pi)
    x, y = rx * r * np.cos(theta), ry * r * np.sin(theta)
    xr, yr = x * np.cos(rot) - y * np.sin(rot), x * np.sin(rot) + y * np.cos(rot)
    return Polygon(np.stack([cx + xr, cy + yr], 1))


def _fit_into(poly: Polygon, cell: tuple[float, float, float, float]) -> Polygon:
    """Shrink ``poly`` about the cell centre until it lies inside ``cell`` (scaling keeps the
    outline natural; clipping would cut straight edges into it)."""
    x0, y0, x1, y1 = cell
    bx0, by0, bx1, by1 = poly.bounds
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    s = min(1.0, *(
        (edge - c) / (b - c) for edge, b, c in ((x0, bx0, cx), (x1, bx1, cx), (y0, by0, cy), (y1, by1, cy)) if b != c
    ))
    return affinity.scale(poly, s, s, origin=(cx, cy)) if s < 1 else poly


def make_layout(
    width: int, height: int, mpp: float, seed: int = 0, n_tissue: int = 3, n_tumor: int = 2,
    tumor_radius_um: tuple[float, float] = (500.0, 900.0),
) -> tuple[MultiPolygon, MultiPolygon]:
    """Tissue pieces and tumor regions in level-0 px: ``(tissue, tumor)``. Pure, deterministic per seed.

    The slide is split into a grid of about-square cells; ``n_tissue`` of them (chosen at
    random) each get one irregular piece that stays inside the cell less a glass margin,
    so pieces never touch each other or the slide border. Each of ``n_tumor`` tumor blobs
    is centred inside a random piece; ``tumor = blobs ∩ tissue``. A tumor radius is drawn
    from ``tumor_radius_um`` but capped to 0.6x its host's equivalent radius, so on small
    slides a tumor stays smaller than the tissue around it. ``n_tissue=0`` gives an empty
    glass slide and ``n_tumor=0`` a normal one.
    """
    if width <= 0 or height <= 0 or mpp <= 0:
        raise ValueError(f"width, height and mpp must be positive, got {width}, {height}, {mpp}")
    if n_tissue < 0 or n_tumor < 0:
        raise ValueError(f"n_tissue and n_tumor must be >= 0, got {n_tissue}, {n_tumor}")
    rng = np.random.default_rng(seed)
    if n_tissue == 0:
        return MultiPolygon(), MultiPolygon()
    cols = max(1, round(math.sqrt(n_tissue * width / height)))
    rows = math.ceil(n_tissue / cols)
    cols = math.ceil(n_tissue / rows)
    cw, ch = width / cols, height / rows
    cells = sorted(rng.permutation(rows * cols)[:n_tissue].tolist())
    pieces: list[Polygon] = []
    for cell in cells:
        i, j = divmod(cell, cols)
        # Glass margin: 7% of the cell on every side (so >= 14% between neighbours).
        mx, my = 0.07 * cw, 0.07 * ch
        cell_box = (j * cw + mx, i * ch + my, (j + 1) * cw - mx, (i + 1) * ch - my)
        cx = (cell_box[0] + cell_box[2]) / 2 + rng.uniform(-0.06, 0.06) * cw
        cy = (cell_box[1] + cell_box[3]) / 2 + rng.uniform(-0.06, 0.06) * ch
        rx, ry = cw * rng.uniform(0.30, 0.40), ch * rng.uniform(0.30, 0.40)
        pieces.append(_fit_into(_blob(cx, cy, rx, ry, rng), cell_box))
    tissue = MultiPolygon(pieces)
    tumors: list[Polygon] = []
    lo, hi = (r_um / mpp for r_um in tumor_radius_um)
    for _ in range(n_tumor):
        host = pieces[int(rng.integers(len(pieces)))]
        host_r = math.sqrt(host.area / math.pi)
        radius = min(rng.uniform(lo, hi), 0.6 * host_r)
        room = host.buffer(-0.5 * radius)
        centre = _random_point_in(room, rng) if not room.is_empty else host.representative_point()
        blob = _blob(centre.x, centre.y, radius, radius * rng.uniform(0.7, 1.0), rng, wobble=0.18, roughness=0.03)
        tumors.append(blob)
    tumor = _clean(shapely.union_all(tumors).intersection(tissue)) if tumors else MultiPolygon()
    return tissue, tumor


def _clean(geom: BaseGeometry) -> MultiPolygon:
    """Polygonal parts only, without slivers a clip can leave (< 1 px²)."""
    return MultiPolygon([p for p in as_multipolygon(shapely.make_valid(geom)).geoms if p.area >= 1.0])


def _random_point_in(geom: BaseGeometry, rng: np.random.Generator) -> Point:
    minx, miny, maxx, maxy = geom.bounds
    for _ in range(1000):
        p = Point(rng.uniform(minx, maxx), rng.uniform(miny, maxy))
        if geom.contains(p):
            return p
    return geom.representative_point()


def lymphoid_aggregates(
    tissue: MultiPolygon, tumor: MultiPolygon, mpp: float, seed: int = 0, per_mm2: float = 2.0,
    radius_um: tuple[float, float] = (50.0, 100.0),
) -> MultiPolygon:
    """Small dense lymphocyte aggregates scattered in the normal tissue (level-0 px). Pure,
    deterministic per seed.

    They are normal tissue that is as dark as tumor on average but made of small, round,
    uniform nuclei, so tumor is not told from normal by mean colour alone. They are part
    of the layout rather than of the periodic normal texture so that they do not repeat
    on a grid, which shows at low magnification on large slides."""
    normal = as_multipolygon(tissue.difference(tumor)) if not tumor.is_empty else as_multipolygon(tissue)
    if normal.is_empty:
        return MultiPolygon()
    rng = np.random.default_rng([seed, 0xA66])
    n = int(rng.poisson(normal.area * mpp * mpp / 1e6 * per_mm2))
    lo, hi = (r / mpp for r in radius_um)
    room = normal.buffer(-lo)  # centres at least a small radius inside the normal tissue
    if n == 0 or room.is_empty:
        return MultiPolygon()
    shapely.prepare(room)
    minx, miny, maxx, maxy = room.bounds
    xs = rng.uniform(minx, maxx, 50 * n + 100)
    ys = rng.uniform(miny, maxy, xs.size)
    inside = shapely.contains_xy(room, xs, ys)
    xs, ys = xs[inside][:n], ys[inside][:n]
    radii = rng.uniform(lo, hi, xs.size)
    blobs = [_blob(x, y, r, r * rng.uniform(0.7, 1.0), rng, wobble=0.15, roughness=0.02, n_vertices=96)
             for x, y, r in zip(xs, ys, radii, strict=True)]
    return _clean(shapely.union_all(blobs).intersection(normal)) if blobs else MultiPolygon()


# --------------------------------------------------------------------------- textures


def _noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float, sigma_across: float | None = None,
           angle: float = 0.0) -> np.ndarray:
    """Periodic (seamless) smooth noise with zero mean and unit std, float32.

    Gaussian-filtered white noise, made directly in Fourier space: random complex
    coefficients shaped by the filter's transfer function (a Gaussian of ``sigma`` px).
    With ``sigma_across`` the kernel is anisotropic: correlated over ``sigma`` along
    ``angle`` (radians, from x towards y) and over ``sigma_across`` across it, which
    draws collagen fibres. Only the frequencies the filter passes get random numbers,
    so smooth fields cost one inverse FFT."""
    h, w = shape
    s_min = sigma if sigma_across is None else min(sigma, sigma_across)
    # exp(-2 pi^2 s^2 f^2) < 1e-4 beyond f = 0.97 / s cycles/px.
    ky = min(h // 2, int(math.ceil(0.97 / s_min * h)) + 1)
    kx = min(w // 2, int(math.ceil(0.97 / s_min * w)) + 1)
    fy = np.fft.fftfreq(h).astype(np.float32)
    fy = np.concatenate([fy[: ky + 1], fy[h - ky :]]) if 2 * ky + 1 < h else fy
    fx = np.fft.rfftfreq(w).astype(np.float32)[: kx + 1]
    fy, fx = fy[:, None], fx[None, :]
    if sigma_across is None:
        env = np.exp(-2 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    else:
        along = fx * np.cos(angle) + fy * np.sin(angle)
        across = -fx * np.sin(angle) + fy * np.cos(angle)
        env = np.exp(-2 * np.pi**2 * (sigma**2 * along**2 + sigma_across**2 * across**2))
    env[0, 0] = 0.0  # zero mean
    part = np.empty(env.shape, np.complex64)
    part.real = rng.standard_normal(env.shape, dtype=np.float32) * env
    part.imag = rng.standard_normal(env.shape, dtype=np.float32) * env
    spec = np.zeros((h, w // 2 + 1), np.complex64)
    if part.shape[0] == h:
        spec[:, : kx + 1] = part
    else:
        spec[: ky + 1, : kx + 1] = part[: ky + 1]
        spec[h - ky :, : kx + 1] = part[ky + 1 :]
    out = sfft.irfft2(spec, s=shape).astype(np.float32, copy=False)
    out /= max(float(np.sqrt(np.mean(out * out, dtype=np.float64))), 1e-20)
    return out


def _nuclei(
    size: int, ys: np.ndarray, xs: np.ndarray, semi_a: np.ndarray, semi_b: np.ndarray, angle: np.ndarray,
    rng: np.random.Generator, irregularity: float, dark: np.ndarray, rim: float = 0.0,
) -> np.ndarray:
    """Nuclear stain (0..1, float32) of nuclei drawn on a torus of ``size`` px.

    Each nucleus is an ellipse (semi-axes ``semi_a`` along ``angle``, ``semi_b`` across)
    with an irregular outline (harmonics 2..5 of relative amplitude ``irregularity``),
    a ~1 px soft edge, and with ``rim`` > 0 a darker nuclear membrane (vesicular
    chromatin). Stamps are computed in vectorised batches of similar size and
    max-composited into a padded canvas whose overhang is folded back, so nuclei wrap
    across the texture edge."""
    n = ys.size
    reach = np.maximum(semi_a, semi_b) * (1 + 2 * irregularity)
    max_pad = int(math.ceil(float(reach.max(initial=1)))) + 2
    canvas = np.zeros((size + 2 * max_pad + 1, size + 2 * max_pad + 1), np.float32)
    # Outline harmonics as a*cos(k t) + b*sin(k t), evaluated by the angle-addition
    # recurrence from cos t, sin t: no trigonometric calls per pixel.
    amp = rng.uniform(0, irregularity, (n, 4)).astype(np.float32) / (np.arange(2, 6, dtype=np.float32) / 2)
    phase = rng.uniform(0, 2 * np.pi, (n, 4)).astype(np.float32)
    hc, hs = amp * np.cos(phase), -amp * np.sin(phase)
    order = np.argsort(reach, kind="stable")
    for start in range(0, n, 256):
        idx = order[start : start + 256]
        pad = int(math.ceil(float(reach[idx].max()))) + 2
        s = 2 * pad + 1
        grid = np.arange(s, dtype=np.float32) - pad
        iy, ix = np.floor(ys[idx]).astype(np.int64), np.floor(xs[idx]).astype(np.int64)
        yy = grid[None, :, None] - (ys[idx] - iy).astype(np.float32)[:, None, None]
        xx = grid[None, None, :] - (xs[idx] - ix).astype(np.float32)[:, None, None]
        c = np.cos(angle[idx]).astype(np.float32)[:, None, None]
        sn = np.sin(angle[idx]).astype(np.float32)[:, None, None]
        a = semi_a[idx].astype(np.float32)[:, None, None]
        b = semi_b[idx].astype(np.float32)[:, None, None]
        u = (xx * c + yy * sn) / a
        v = (-xx * sn + yy * c) / b
        rho = np.sqrt(u * u + v * v)
        ct, st = u / np.maximum(rho, 1e-6), v / np.maximum(rho, 1e-6)
        ck, sk = ct, st
        edge = np.ones_like(rho)
        for h in range(4):
            ck, sk = ck * ct - sk * st, sk * ct + ck * st
            edge += hc[idx, h, None, None] * ck + hs[idx, h, None, None] * sk
        depth = (edge - rho) * np.minimum(a, b)  # ~ px inside the outline
        m = np.clip(depth / 1.2 + 0.5, 0, 1)
        if rim:
            m *= 1 - rim + rim * np.exp(-((depth / 1.8) ** 2))
        m *= dark[idx, None, None].astype(np.float32)
        # Top-left of each stamp on the canvas; canvas row r is texture row (r - max_pad) mod size.
        oy = (iy % size) + max_pad - pad
        ox = (ix % size) + max_pad - pad
        for k in range(idx.size):
            view = canvas[oy[k] : oy[k] + s, ox[k] : ox[k] + s]
            np.maximum(view, m[k], out=view)
    # Fold the overhang on both sides back onto the torus: rows, then columns (which
    # carries the corners).
    p = max_pad
    np.maximum(canvas[p : 2 * p], canvas[size + p : size + 2 * p], out=canvas[p : 2 * p])
    np.maximum(canvas[size : size + p], canvas[:p], out=canvas[size : size + p])
    np.maximum(canvas[:, p : 2 * p], canvas[:, size + p : size + 2 * p], out=canvas[:, p : 2 * p])
    np.maximum(canvas[:, size : size + p], canvas[:, :p], out=canvas[:, size : size + p])
    return np.ascontiguousarray(canvas[p : p + size, p : p + size])


def _shift_rows(values: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """``values`` sampled at (y + disp, x) with wrap-around and linear interpolation: a
    smooth displacement across near-horizontal structures makes them wavy."""
    size = values.shape[0]
    t = np.arange(size, dtype=np.float32)[:, None] + disp
    i0 = np.floor(t).astype(np.int32)
    t -= i0  # fractional part: the interpolation weight
    i0 %= size
    out = np.take_along_axis(values, i0, 0)
    i0 += 1
    i0 %= size
    out += (np.take_along_axis(values, i0, 0) - out) * t
    return out


def _warped_direction(disp: np.ndarray, ys: np.ndarray, xs: np.ndarray, theta: float) -> np.ndarray:
    """Local direction of lines of angle ``theta`` after :func:`_shift_rows` by ``disp``, at (ys, xs).
    The lines are level sets of F = (y + d) cos(theta) - x sin(theta); their direction is
    perpendicular to grad F."""
    size = disp.shape[0]
    iy, ix = ys.astype(np.int64) % size, xs.astype(np.int64) % size
    d_dx = (disp[iy, (ix + 1) % size] - disp[iy, (ix - 1) % size]) / 2
    d_dy = (disp[(iy + 1) % size, ix] - disp[(iy - 1) % size, ix]) / 2
    return np.arctan2(np.sin(theta) - d_dx * np.cos(theta), (1 + d_dy) * np.cos(theta))


def _hex_centres(size: int, spacing: float, jitter: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Jittered hexagonal lattice on the torus (dense, evenly packed cells, like an epithelial sheet).
    The lattice is stretched slightly so a whole number of rows and columns fits the period."""
    nx = max(1, round(size / spacing))
    ny = max(2, 2 * round(size / (spacing * math.sqrt(3))))  # even: odd rows are offset by half a cell
    dx, dy = size / nx, size / ny
    jj, ii = np.meshgrid(np.arange(nx), np.arange(ny))
    xs = (jj + 0.5 * (ii % 2)) * dx
    ys = ii * dy
    xs = xs.ravel() + rng.normal(0, jitter * dx, xs.size)
    ys = ys.ravel() + rng.normal(0, jitter * dy, ys.size)
    return ys % size, xs % size


def _stain(c_eosin: np.ndarray, c_haem: np.ndarray, out: np.ndarray) -> np.ndarray:
    """RGB uint8 into ``out`` from stain concentrations (Beer-Lambert: densities add,
    transmitted light decays exponentially)."""
    for ch in range(3):
        od = c_eosin * _OD_EOSIN[ch]
        od += c_haem * _OD_HAEM[ch]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= _LIGHT[ch]
        od += 0.5
        out[..., ch] = np.clip(od, 0, 255)
    return out


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0, 1)
    return t * t * (3 - 2 * t)


def make_textures(seed: int, size: int = TEXTURE, mpp: float = 0.5) -> np.ndarray:
    """Seamless periodic textures ``(4, size, size, 3)`` uint8 for GLASS, NORMAL, TUMOR and
    LYMPHOID (read-only, cached). Sizes are physical (µm), converted with ``mpp``; deterministic per seed."""
    return _textures(int(seed), int(size), float(mpp))


@lru_cache(maxsize=2)
def _textures(seed: int, size: int, mpp: float) -> np.ndarray:
    rng = np.random.default_rng([seed, 0x5EED])
    px = 1.0 / mpp  # px per µm
    shape = (size, size)

    # Glass: bright, unsaturated, a faint lamp gradient and sensor noise.
    shade = 1 + 0.004 * _noise(shape, rng, 60 * px)
    grain = 0.7 * rng.standard_normal(shape, dtype=np.float32) + 0.5
    textures = np.empty((4, size, size, 3), np.uint8)
    glass = textures[GLASS]
    for ch in range(3):
        glass[..., ch] = np.clip(_LIGHT[ch] * shade + grain, 0, 255)
    del shade, grain

    # Normal: collagen stroma. Fine fibrils and coarser bundles share one direction per
    # texture; a smooth displacement across that direction makes them wavy. Pale clefts
    # open between bundles; staining drifts slowly. Everything is drawn with the fibres
    # near-horizontal, then the texture is transposed half the time.
    theta = rng.uniform(-np.pi / 4, np.pi / 4)
    fibres = 0.55 * _noise(shape, rng, 12 * px, 1.0 * px, theta) + 0.85 * _noise(shape, rng, 40 * px, 5 * px, theta)
    disp = (12 * px) * _noise(shape, rng, 45 * px)  # px, along y
    fibres = _shift_rows(fibres, disp)
    fibres /= float(fibres.std())
    drift = _noise(shape, rng, 120 * px)
    c_e = 0.92 * (1 + 0.16 * fibres) * (1 + 0.07 * drift)
    c_e *= 1 - 0.7 * _smoothstep(-fibres, 1.5, 2.3)
    del drift
    # Sparse spindle-shaped fibroblast nuclei lying along the local fibre direction.
    area_um2 = (size / px) ** 2
    n_sp = rng.poisson(area_um2 / 700)
    ys, xs = rng.uniform(0, size, n_sp), rng.uniform(0, size, n_sp)
    along = _warped_direction(disp, ys, xs, theta) + rng.normal(0, 0.12, n_sp)
    spindle = _nuclei(size, ys, xs, rng.uniform(3.5, 6.0, n_sp) * px, rng.uniform(1.0, 1.7, n_sp) * px, along,
                      rng, 0.06, rng.uniform(0.75, 1.0, n_sp))
    del disp
    # A few scattered round, dark lymphocytes.
    n_ly = rng.poisson(area_um2 / 4000)
    ys, xs = rng.uniform(0, size, n_ly), rng.uniform(0, size, n_ly)
    r_ly = rng.uniform(2.5, 3.3, n_ly) * px
    lympho = _nuclei(size, ys, xs, r_ly, r_ly * rng.uniform(0.85, 1.0, n_ly), rng.uniform(0, np.pi, n_ly),
                     rng, 0.04, rng.uniform(1.05, 1.25, n_ly))
    nuc = np.maximum(spindle, lympho)
    del spindle, lympho
    grain = _noise(shape, rng, 0.8 * px)
    c_h = 0.04 + nuc * (0.95 + 0.12 * grain)
    c_e_nuc = c_e * (1 - 0.5 * nuc)
    transpose = rng.random() < 0.5
    _stain(c_e_nuc.T if transpose else c_e_nuc, c_h.T if transpose else c_h, textures[NORMAL])
    del c_h, c_e_nuc, nuc

    # Lymphoid aggregate: lymphocytes packed on a jittered lattice, little collagen between.
    ys, xs = _hex_centres(size, 7.5 * px, 0.2, rng)
    kept = rng.random(ys.size) < 0.88
    ys, xs = ys[kept], xs[kept]
    n_ly = ys.size
    r_ly = rng.uniform(2.5, 3.3, n_ly) * px
    nuc = _nuclei(size, ys, xs, r_ly, r_ly * rng.uniform(0.85, 1.0, n_ly), rng.uniform(0, np.pi, n_ly),
                  rng, 0.04, rng.uniform(1.0, 1.25, n_ly))
    c_h = 0.1 + nuc * (0.95 + 0.12 * grain)
    c_e *= 0.55 * (1 - 0.5 * nuc)
    _stain(c_e.T if transpose else c_e, c_h.T if transpose else c_h, textures[LYMPHOID])
    del c_e, c_h, nuc, fibres

    # Tumor: a sheet of cells with amphophilic (pink-purple) cytoplasm and large, crowded,
    # pleomorphic nuclei with coarse chromatin and a dark membrane. Crowding varies over
    # ~0.1 mm, so some fields show more cytoplasm than others.
    r_mean = 5.0 * px
    ys, xs = _hex_centres(size, 2.7 * r_mean, 0.16, rng)
    crowd = _noise(shape, rng, 50 * px)[ys.astype(int) % size, xs.astype(int) % size]
    kept = rng.random(ys.size) < np.clip(0.8 + 0.17 * crowd, 0.45, 0.97)
    ys, xs = ys[kept], xs[kept]
    n_t = ys.size
    r_t = r_mean * rng.lognormal(0, 0.18, n_t)
    tumor_nuc = _nuclei(size, ys, xs, r_t, r_t * rng.uniform(0.6, 0.95, n_t), rng.uniform(0, np.pi, n_t),
                        rng, 0.14, rng.uniform(0.8, 1.05, n_t), rim=0.3)
    cyto = _noise(shape, rng, 3.0 * px)
    c_e = 0.62 * (1 + 0.12 * cyto) * (1 - 0.55 * tumor_nuc)
    c_h = 0.12 + 0.03 * cyto + tumor_nuc * (1.1 + 0.25 * grain)
    _stain(c_e, c_h, textures[TUMOR])

    textures.setflags(write=False)
    return textures


@lru_cache(maxsize=8)
def _level_textures(seed: int, mpp: float, factor: int) -> np.ndarray:
    """Textures box-filtered by ``factor``: pixel i is the mean of level-0 pixels
    ``[i*factor, (i+1)*factor)``, so a level pixel at x samples ``x mod (TEXTURE/factor)``."""
    tex = make_textures(seed, TEXTURE, mpp)
    if factor == 1:
        return tex
    if TEXTURE % factor:
        raise ValueError(f"downsample {factor} must divide the texture period {TEXTURE}")
    p = TEXTURE // factor
    n = tex.shape[0]
    # Rows first, then columns: each sum runs over a contiguous axis, ~4x faster than
    # one sum over both strided axes.
    rows = tex.reshape(n, p, factor, TEXTURE * 3).sum(axis=2, dtype=np.uint32)
    sums = rows.reshape(n, p, p, factor, 3).sum(axis=3, dtype=np.uint32)
    out = ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------- rendering


def _window(tex: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    """``tex[(y + i) mod p, (x + j) mod p]`` for an (h, w) window; a view when it does not wrap."""
    p = tex.shape[0]
    y0, x0 = y % p, x % p
    if y0 + h <= p and x0 + w <= p:
        return tex[y0 : y0 + h, x0 : x0 + w]
    rows = (y0 + np.arange(h)) % p
    cols = (x0 + np.arange(w)) % p
    return np.ascontiguousarray(tex[rows][:, cols])


def _edges(geom: BaseGeometry) -> np.ndarray:
    """All ring edges of a (multi)polygon as an (E, 4) array of x0, y0, x1, y1."""
    parts = []
    for poly in as_multipolygon(geom).geoms:
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, np.float64)
            parts.append(np.concatenate([xy[:-1], xy[1:]], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 4))


def _fill(edges: np.ndarray, shape: tuple[int, int], scale: float, offset: tuple[float, float]) -> np.ndarray:
    """Boolean mask of ``shape``: a pixel is set when its centre is inside the rings (even-odd),
    the rule of :func:`wsipipe.geometry.rasterize` (pixel (i, j) has its centre at level-0
    ``offset + (j + 0.5, i + 0.5) * scale``). A vectorised scanline fill: cost grows with the
    rows an edge spans, not with rows x columns x vertices, so boundary tiles stay cheap."""
    h, w = shape
    ox, oy = offset
    x0 = (edges[:, 0] - ox) / scale - 0.5
    y0 = (edges[:, 1] - oy) / scale - 0.5
    x1 = (edges[:, 2] - ox) / scale - 0.5
    y1 = (edges[:, 3] - oy) / scale - 0.5
    # Rows i (pixel centres) that an edge crosses: min(y) <= i < max(y), half-open so a
    # vertex shared by two edges is counted once.
    lo = np.maximum(np.ceil(np.minimum(y0, y1)), 0).astype(np.int64)
    hi = np.minimum(np.ceil(np.maximum(y0, y1)), h).astype(np.int64)
    n = np.maximum(hi - lo, 0)
    keep = n > 0
    if not keep.any():
        return np.zeros(shape, bool)
    x0, y0, x1, y1, lo, n = x0[keep], y0[keep], x1[keep], y1[keep], lo[keep], n[keep]
    edge = np.repeat(np.arange(n.size), n)
    rows = lo[edge] + (np.arange(edge.size) - np.repeat(np.cumsum(n) - n, n))
    xc = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    # A crossing at xc flips the inside/outside state of every pixel centre to its right.
    start = np.clip(np.floor(xc).astype(np.int64) + 1, 0, w)
    flips = np.bincount(rows * (w + 1) + start, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(flips[:, :w], axis=1) & 1).astype(bool)


class _Scene:
    """The layout, prepared to say which class each pixel of a window has.

    Each region is a union of disjoint polygons. Painting order (later wins): tissue ->
    NORMAL, lymphoid aggregates -> LYMPHOID, tumor -> TUMOR; outside tissue is GLASS."""

    def __init__(self, tissue: MultiPolygon, tumor: MultiPolygon, lymphoid: MultiPolygon):
        self.regions = {NORMAL: tissue, LYMPHOID: lymphoid, TUMOR: tumor}
        for geom in self.regions.values():
            if not geom.is_empty:
                shapely.prepare(geom)
        edges = {c: _edges(g) for c, g in self.regions.items()}
        # Edges sorted by their top, with the running maximum of their bottoms, so the
        # edges that reach a band of rows are found by two binary searches.
        self._edges = {}
        for c, e in edges.items():
            top, bottom = np.minimum(e[:, 1], e[:, 3]), np.maximum(e[:, 1], e[:, 3])
            order = np.argsort(top, kind="stable")
            self._edges[c] = (e[order], top[order], bottom[order])
        self._band: tuple | None = None

    def classify(self, boxes: np.ndarray) -> np.ndarray:
        """Class of each level-0 box when every pixel in it has the same one, else -1."""
        tissue, lymphoid, tumor = self.regions[NORMAL], self.regions[LYMPHOID], self.regions[TUMOR]
        out = np.full(boxes.shape, -1, np.int8)
        if tissue.is_empty:
            out[:] = GLASS
            return out
        out[~shapely.intersects(tissue, boxes)] = GLASS
        plain = shapely.contains(tissue, boxes)
        for other in (lymphoid, tumor):
            if not other.is_empty:
                plain &= ~shapely.intersects(other, boxes)
                out[shapely.contains(other, boxes)] = LYMPHOID if other is lymphoid else TUMOR
        out[plain] = NORMAL
        return out

    def _band_edges(self, cls: int, y0: float, y1: float) -> np.ndarray:
        """Edges of region ``cls`` that may cross level-0 rows [y0, y1]. Tiles come row by row,
        so the last band is kept: boundary tiles in one row share one search."""
        if self._band is None or self._band[0] != (y0, y1):
            self._band = ((y0, y1), {})
        found = self._band[1]
        if cls not in found:
            e, top, bottom = self._edges[cls]
            stop = np.searchsorted(top, y1, side="right")
            sel = e[:stop][bottom[:stop] >= y0]
            found[cls] = sel
        return found[cls]

    def class_map(self, x0: float, y0: float, h: int, w: int, factor: int) -> np.ndarray:
        """Per-pixel class of an (h, w) window at ``factor`` whose top-left is level-0 (x0, y0):
        a pixel takes the class of its centre."""
        cls = np.zeros((h, w), np.uint8)
        for value in (NORMAL, LYMPHOID, TUMOR):
            edges = self._band_edges(value, y0, y0 + h * factor)
            if edges.size:
                cls[_fill(edges, (h, w), factor, (x0, y0))] = value
        return cls


def _render(tex: np.ndarray, scene: _Scene, factor: int, x: int, y: int, w: int, h: int, cls: int = -1) -> np.ndarray:
    """RGB (h, w, 3) of the window at level coordinates (x, y) of the level ``factor``.
    ``cls`` >= 0 says the whole window is that class (known from :meth:`_Scene.classify`)."""
    if cls < 0:
        window = shapely.box(x * factor, y * factor, (x + w) * factor, (y + h) * factor)
        cls = int(scene.classify(np.array([window]))[0])
    if cls >= 0:
        return np.array(_window(tex[cls], y, x, h, w), order="C")
    cmap = scene.class_map(x * factor, y * factor, h, w, factor)
    out = np.array(_window(tex[GLASS], y, x, h, w), order="C")
    for c in (NORMAL, LYMPHOID, TUMOR):
        where = cmap == c
        if where.any():
            np.copyto(out, _window(tex[c], y, x, h, w), where=where[..., None])
    return out


def render_region(
    tissue: MultiPolygon, tumor: MultiPolygon, location: tuple[int, int], size: tuple[int, int], *,
    seed: int = 0, mpp: float = 0.5, downsample: int = 1,
) -> np.ndarray:
    """The exact RGB pixels (before JPEG) that :func:`write_synthetic_slide` encodes for a
    region of the slide with this layout, seed and mpp: ``location`` is the level-0
    top-left (x, y) and must be a multiple of ``downsample``; ``size`` is (w, h) in pixels
    of the level at ``downsample``."""
    if location[0] % downsample or location[1] % downsample:
        raise ValueError(f"location {location} must be a multiple of downsample {downsample}")
    tex = _level_textures(seed, mpp, downsample)
    tissue, tumor = as_multipolygon(tissue), as_multipolygon(tumor)
    scene = _Scene(tissue, tumor, lymphoid_aggregates(tissue, tumor, mpp, seed))
    return _render(tex, scene, downsample, location[0] // downsample, location[1] // downsample, size[0], size[1])


def _encode(tile: np.ndarray, quality: int) -> bytes:
    # YCbCr with 4:2:0 chroma subsampling, like scanners write; the TIFF says so with
    # PhotometricInterpretation=YCbCr + YCbCrSubSampling (set by tifffile), which is
    # how OpenSlide knows to convert back (Photometric=RGB on these bytes gives wrong colours).
    data = imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))
    return bytes(data) if isinstance(data, bytearray) else data  # bytes in practice; the stubs allow either


def _level_tiles(
    tex: np.ndarray, scene: _Scene, factor: int, width: int, height: int, tile: int, quality: int
) -> Iterator[bytes]:
    """JPEG bytes of every tile of a level, row by row (TIFF tile order)."""
    p = tex.shape[1]
    cache: dict[tuple[int, int, int], bytes] = {}
    cached = 0
    xs = np.arange(0, width, tile)
    for y in range(0, height, tile):
        boxes = shapely.box(xs * factor, y * factor, (xs + tile) * factor, (y + tile) * factor)
        for x, cls in zip(xs.tolist(), scene.classify(boxes).tolist(), strict=True):
            if cls < 0:
                yield _encode(_render(tex, scene, factor, x, y, tile, tile), quality)
                continue
            key = (cls, y % p, x % p)
            data = cache.get(key)
            if data is None:
                data = _encode(_render(tex, scene, factor, x, y, tile, tile, cls), quality)
                if cached + len(data) <= _CACHE_BYTES:
                    cache[key] = data
                    cached += len(data)
            yield data


# --------------------------------------------------------------------------- writing


def pyramid_downsamples(width: int, height: int) -> list[int]:
    """Level downsamples: 1, 4, 16, ... while the next level keeps >= 1000 px on its long side
    (as Aperio scanners do), at most ``MAX_LEVELS``."""
    factors = [1]
    while max(width, height) / (factors[-1] * 4) >= 1000 and len(factors) < MAX_LEVELS:
        factors.append(factors[-1] * 4)
    return factors


def _aperio_description(width: int, height: int, tile: int, mpp: float, quality: int) -> str:
    # OpenSlide's Aperio driver recognises the file by the "Aperio Image Library" prefix of
    # the first IFD's ImageDescription and turns each "|key = value" field after the first
    # into an "aperio.key" property; MPP and AppMag become openslide.mpp-x/-y and
    # objective-power. ("JPEG/RGB" is what Aperio writes for its YCbCr JPEG tiles too.)
    return (
        f"Aperio Image Library v12.0.5 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
        f"JPEG/RGB Q={quality}|AppMag = {20 if mpp >= 0.375 else 40}|MPP = {mpp}|Filename = synthetic"
        f"|wsipipe synthetic = 1"
    )


def _thumbnail(seed: int, mpp: float, scene: _Scene, width: int, height: int) -> np.ndarray:
    """Whole slide at a power-of-two downsample, long side <= 1024 px (the SVS thumbnail)."""
    f = 1
    while max(width, height) / f > 1024 and f < TEXTURE:
        f *= 2
    tex = _level_textures(seed, mpp, f)
    return _render(tex, scene, f, 0, 0, max(1, width // f), max(1, height // f))


def _check_slide_args(fmt: str, tile_size: int, jpeg_quality: int, width: int, height: int, mpp: float) -> None:
    if fmt not in ("svs", "tiff"):
        raise ValueError(f"fmt must be 'svs' or 'tiff', not {fmt!r}")
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 (JPEG 4:2:0 blocks), got {tile_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if width <= 0 or height <= 0 or mpp <= 0:
        raise ValueError(f"width, height and mpp must be positive, got {width}, {height}, {mpp}")


@dataclass(frozen=True)
class _LevelTags:
    """The TIFF tags of one pyramid level beyond the tiles (tifffile's defaults where None)."""

    description: str | None = None
    resolution: tuple[float, float] | None = None
    resolutionunit: str | None = None
    subfiletype: int | None = None

    @classmethod
    def of(cls, fmt: str, k: int, f: int, width: int, height: int, tile_size: int, mpp: float, quality: int) -> _LevelTags:
        """SVS: the Aperio description on level 0 only. Generic TIFF: the resolution tags (px/cm)
        on every level, reduced-resolution levels marked, a plain description on level 0."""
        if fmt == "svs":
            return cls(description=_aperio_description(width, height, tile_size, mpp, quality) if k == 0 else None)
        return cls(
            description="wsipipe synthetic slide" if k == 0 else None,
            resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)),
            resolutionunit="CENTIMETER",
            subfiletype=1 if k else 0,  # reduced-resolution image
        )


def _write_svs_thumbnail(
    tw: tifffile.TiffWriter, thumb: np.ndarray, width: int, height: int, mpp: float, quality: int
) -> None:
    """OpenSlide's Aperio driver reads a stripped second IFD as the "thumbnail" associated
    image (tiled IFDs are levels, whatever their position)."""
    tw.write(
        thumb, compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
        subsampling=(1, 1), rowsperstrip=thumb.shape[0], metadata=None,
        description=(
            f"Aperio Image Library v12.0.5 \r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - "
            f"|AppMag = {20 if mpp >= 0.375 else 40}|MPP = {mpp}"
        ),
    )


def write_synthetic_slide(
    path: str | Path, width: int = 12000, height: int = 9000, mpp: float = 0.5, seed: int = 0, fmt: str = "svs",
    tile_size: int = 256, n_tissue: int = 3, n_tumor: int = 2, jpeg_quality: int = 90,
    layout: tuple[MultiPolygon, MultiPolygon] | None = None,
) -> SynthSlide:
    """Write a synthetic pyramidal slide and its ground truth; return what was written.

    ``fmt="svs"``: Aperio-style SVS (OpenSlide vendor "aperio"): tiled level 0 with the
    Aperio ImageDescription, a stripped thumbnail as the second IFD, then tiled levels at
    downsample 4, 16, ... ``fmt="tiff"``: generic tiled TIFF (vendor "generic-tiff") with
    the resolution in the TIFF resolution tags (px/cm). Tiles are JPEG (YCbCr 4:2:0).
    ``layout=(tissue, tumor)`` overrides :func:`make_layout` (tumor is clipped to tissue).
    The file is written under a temporary name and renamed into place; the ground truth
    goes to ``<stem>.geojson`` beside it.
    """
    _check_slide_args(fmt, tile_size, jpeg_quality, width, height, mpp)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout is None:
        tissue, tumor = make_layout(width, height, mpp, seed, n_tissue, n_tumor)
    else:
        tissue = as_multipolygon(layout[0])
        tumor = _clean(as_multipolygon(layout[1]).intersection(tissue))
    lymphoid = lymphoid_aggregates(tissue, tumor, mpp, seed)
    scene = _Scene(tissue, tumor, lymphoid)
    factors = pyramid_downsamples(width, height)
    # Classic TIFF offsets are 32-bit; JPEG at these qualities stays well under 1 B/px,
    # so BigTIFF is only needed past ~1.2 Gpx (and then used, as scanners do).
    bigtiff = width * height > 1_200_000_000
    # A fresh temporary name beside the target (same file system, so the rename is atomic),
    # created by tifffile with the usual permissions.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for k, f in enumerate(factors):
                lw, lh = width // f, height // f
                level = _LevelTags.of(fmt, k, f, width, height, tile_size, mpp, jpeg_quality)
                tw.write(
                    _level_tiles(_level_textures(seed, mpp, f), scene, f, lw, lh, tile_size, jpeg_quality),
                    shape=(lh, lw, 3), dtype=np.uint8, tile=(tile_size, tile_size), compression="jpeg",
                    photometric="rgb", subsampling=(2, 2), metadata=None, description=level.description,
                    resolution=level.resolution, resolutionunit=level.resolutionunit, subfiletype=level.subfiletype,
                )
                if fmt == "svs" and k == 0:
                    _write_svs_thumbnail(tw, _thumbnail(seed, mpp, scene, width, height), width, height, mpp, jpeg_quality)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    geojson = write_geojson(path.with_suffix(".geojson"), {"Tissue": tissue, "Tumor": tumor})
    return SynthSlide(path, geojson, width, height, mpp, tissue, tumor, lymphoid)


def _main(argv: list[str]) -> None:
    """``python -m wsipipe.slides.synth [SIZE [OUT]]``: write a SIZE x SIZE slide and print the speed."""
    import resource
    import tempfile
    import time

    size = int(argv[0]) if argv else 20000
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(argv[1]) if len(argv) > 1 else Path(tmp) / f"synth-{size}.svs"
        t0 = time.perf_counter()
        s = write_synthetic_slide(out, size, size, mpp=0.5, seed=0)
        dt = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{size}x{size}: {dt:.2f} s, {size * size / dt / 1e6:.0f} Mpx/s (level-0 px, textures included), "
              f"peak RSS {peak:.0f} MiB, {s.path.stat().st_size / 2**20:.0f} MiB file")


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
