"""Pure geometry shared by tissue detection and stitching: masks <-> polygons.

A mask pixel (row i, column j) covers the level-0 rectangle
``[offset_x + j*scale, offset_x + (j+1)*scale) x [offset_y + i*scale, ...)``,
so converting a mask to polygons and back is exact up to the pixel grid.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry


def mask_to_polygons(
    mask: np.ndarray, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0), simplify: float = 0.0
) -> MultiPolygon:
    """Union of the mask's pixels as a MultiPolygon in level-0 (x, y) coordinates.

    Built from horizontal runs of set pixels, so holes and separate pieces come out
    right without contour tracing. ``simplify`` is a tolerance in level-0 pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_start, cols_start = np.nonzero(edges == 1)
    _, cols_end = np.nonzero(edges == -1)
    if rows_start.size == 0:
        return MultiPolygon()
    ox, oy = offset
    boxes = shapely.box(
        ox + cols_start * scale, oy + rows_start * scale, ox + cols_end * scale, oy + (rows_start + 1) * scale
    )
    merged = shapely.union_all(boxes)
    if simplify > 0:
        merged = merged.simplify(simplify, preserve_topology=True)
    return as_multipolygon(merged)


def as_multipolygon(geom: BaseGeometry) -> MultiPolygon:
    """Keep only the polygonal parts of ``geom`` as one MultiPolygon."""
    if geom.is_empty:
        return MultiPolygon()
    if isinstance(geom, Polygon):
        return MultiPolygon([geom])
    if isinstance(geom, MultiPolygon):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    polys: list[Polygon] = []
    for p in parts:
        polys.extend(p.geoms if isinstance(p, MultiPolygon) else [p])
    return MultiPolygon(polys)


def rasterize(
    geom: BaseGeometry, shape: tuple[int, int], scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Boolean mask of ``shape`` (rows, cols): a pixel is set when its centre lies inside ``geom``.

    Each polygon is drawn in the window of its bounding box only, so the cost follows the
    polygons' size, not the mask's (a slide-sized mask with many small regions stays cheap)."""
    from skimage.draw import polygon as draw_polygon  # here: tiling never rasterises, and skimage costs 0.5 s to import

    out = np.zeros(shape, dtype=bool)
    ox, oy = offset
    rows_n, cols_n = int(shape[0]), int(shape[1])
    for poly in as_multipolygon(geom).geoms:
        if poly.is_empty:
            continue
        x0, y0, x1, y1 = poly.bounds
        # Pixels whose centre can fall inside the box, clipped to the mask.
        c0 = max(0, int(np.floor((x0 - ox) / scale - 0.5)))
        r0 = max(0, int(np.floor((y0 - oy) / scale - 0.5)))
        c1 = min(cols_n, int(np.ceil((x1 - ox) / scale + 0.5)) + 1)
        r1 = min(rows_n, int(np.ceil((y1 - oy) / scale + 0.5)) + 1)
        if r0 >= r1 or c0 >= c1:
            continue
        window = (r1 - r0, c1 - c0)
        filled = None
        for ring in [poly.exterior, *poly.interiors]:
            xy = np.asarray(ring.coords)
            # pixel centre (j + 0.5) * scale + ox  ->  fractional column index of the vertex
            cols = (xy[:, 0] - ox) / scale - 0.5 - c0
            rows = (xy[:, 1] - oy) / scale - 0.5 - r0
            m = np.zeros(window, dtype=bool)
            rr, cc = draw_polygon(rows, cols, window)
            m[rr, cc] = True
            if filled is None:
                filled = m
            else:
                filled &= ~m
        out[r0:r1, c0:c1] |= filled
    return out


def dice(a: BaseGeometry, b: BaseGeometry) -> float:
    """Dice coefficient of two areas (1.0 when both are empty)."""
    total = a.area + b.area
    if total == 0:
        return 1.0
    return 2.0 * a.intersection(b).area / total


def rect(x: float, y: float, w: float, h: float) -> Polygon:
    """Axis-aligned rectangle from a level-0 top-left and size."""
    return box(x, y, x + w, y + h)


def overlap_fraction(coords: np.ndarray, patch_size_l0: float, region: BaseGeometry) -> np.ndarray:
    """Fraction (0..1) of each level-0 square ``[x, x+size) x [y, y+size)`` inside ``region``."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if region is None or region.is_empty or len(coords) == 0:
        return np.zeros(len(coords))
    x, y = coords[:, 0], coords[:, 1]
    squares = shapely.box(x, y, x + patch_size_l0, y + patch_size_l0)
    shapely.prepare(region)
    # Only squares crossing the region's border need an exact intersection: on a slide most
    # patches are clear of it or deep inside it, and the prepared predicates are cheap.
    touching = shapely.intersects(region, squares)
    inside = touching & shapely.contains_properly(region, squares)
    border = np.flatnonzero(touching & ~inside)
    overlap = inside.astype(np.float64)
    overlap[border] = shapely.area(shapely.intersection(squares[border], region)) / float(patch_size_l0) ** 2
    return overlap

