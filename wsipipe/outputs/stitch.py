"""Stitching patch probabilities back into slide space: heatmap, tumor mask, polygons, score.

The heatmap lives on the tiling grid: cell (row i, col j) is the level-0 square
``[ox + j*s, ox + (j+1)*s) x [oy + i*s, oy + (i+1)*s)`` with ``s = stride_l0`` and
``(ox, oy) = origin_l0``. A patch whose top-left cell is (i, j) covers the
``r x r`` cells from (i, j), with ``r = cells_per_patch = round(patch_size / stride)``,
so with overlapping patches (stride < patch) a cell's value is the mean of every
patch that covers it. The heatmap therefore has ``r - 1`` more rows and columns than
the tiling grid: the last patches' far edges are real tissue, not to be dropped.
When ``patch_size / stride`` is not an integer the footprint is rounded to whole cells.

Everything except :func:`stitch_store` is pure (arrays in, arrays/polygons out).
:func:`stitch_store` reads the store chunk by chunk, so its memory is bounded by the
grid and one chunk, never by the number of patches.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import shapely
import zarr
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry
from skimage import morphology

from wsipipe import __version__

from wsipipe.tiles import qc, store
from wsipipe.config import ExportConfig, QCConfig, StitchConfig
from wsipipe.errors import ConfigError, NoTissueError, StoreError
from wsipipe.models.expected import OVERRIDE_KEY
from wsipipe.geojson import write_geojson
from wsipipe.files import write_atomic
from wsipipe.geometry import as_multipolygon, mask_to_polygons, rasterize
from wsipipe.outputs.figures import Background, HeatmapGrid, figure_png, heatmap_figure, read_background
from wsipipe.outputs.figures import DISPLAY_MAX_PX as DISPLAY_MAX_PX, display_image as display_image
from wsipipe.outputs.summary import (
    FileScale, HeatmapInfo, ModelRef, Provenance, QCFlag, QCSection, SlideScore, SlideSummary, SummaryError, SummarySlide, load_summary,
    summary_json,
)
from wsipipe.outputs.summary import domain_section
from wsipipe.models.domain import DISTANCE_ARRAY
from wsipipe.outputs.summary import SUMMARY_NAME

log = logging.getLogger(__name__)

STAGE = store.STAGE_STITCH
Progress = Callable[[int, int], None]  # (patches done, patches total)

# Patches read per step: ~1 MiB of grid_ij + probabilities, far below the grid itself.
CHUNK_PATCHES = 1 << 16

OUTPUT_FILES = {
    "heatmap": "heatmap.npy",
    "heatmap_png": "heatmap.png",
    "tumor_mask_png": "tumor_mask.png",
    "tumor_geojson": "tumor.geojson",
    "summary": SUMMARY_NAME,
}


# --------------------------------------------------------------------------- heatmap


def cells_per_patch(patch_size: float, stride: float) -> int:
    """Grid cells a patch spans along each axis: 1 without overlap, 2 at half stride."""
    return max(1, int(round(patch_size / stride)))


def heatmap_shape(grid_shape: tuple[int, int], cells_per_patch: int = 1) -> tuple[int, int]:
    """Heatmap (rows, cols): the tiling grid plus the cells the last patches reach into."""
    rows, cols = (int(v) for v in grid_shape)
    return rows + cells_per_patch - 1, cols + cells_per_patch - 1


@dataclass
class HeatmapAccumulator:
    """Running sum and count per heatmap cell; feed it patches chunk by chunk.

    Its memory is two grid-sized arrays whatever the number of patches.
    """

    grid_shape: tuple[int, int]
    cells_per_patch: int = 1
    total: np.ndarray = field(init=False, repr=False)
    count: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        r = int(self.cells_per_patch)
        # uint16 counts hold up to r*r covering patches per cell; refuse footprints that could wrap.
        if not 1 <= r <= 255:
            raise ValueError(f"cells_per_patch must be 1..255, got {self.cells_per_patch}")
        self.cells_per_patch = r
        self.grid_shape = (int(self.grid_shape[0]), int(self.grid_shape[1]))
        shape = heatmap_shape(self.grid_shape, r)
        self.total = np.zeros(shape, dtype=np.float32)
        self.count = np.zeros(shape, dtype=np.uint16)

    @property
    def shape(self) -> tuple[int, int]:
        return self.total.shape

    def add(self, grid_ij: np.ndarray, probs: np.ndarray) -> None:
        """Add patches: ``grid_ij`` (n, 2) (row, col) of each patch's top-left cell, ``probs`` (n,)."""
        grid_ij = np.asarray(grid_ij).reshape(-1, 2)
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if len(grid_ij) != len(probs):
            raise ValueError(f"{len(grid_ij)} grid positions but {len(probs)} probabilities")
        if not len(probs):
            return
        rows, cols = grid_ij[:, 0].astype(np.int64), grid_ij[:, 1].astype(np.int64)
        if rows.min() < 0 or cols.min() < 0 or rows.max() >= self.grid_shape[0] or cols.max() >= self.grid_shape[1]:
            raise ValueError(
                f"grid_ij outside the grid {list(self.grid_shape)}: rows {rows.min()}..{rows.max()}, "
                f"cols {cols.min()}..{cols.max()}"
            )
        width = self.shape[1]
        # Flat views: np.add.at on 1-D indices handles repeated cells (overlaps) correctly.
        total, count = self.total.reshape(-1), self.count.reshape(-1)
        for di in range(self.cells_per_patch):
            for dj in range(self.cells_per_patch):
                flat = (rows + di) * width + (cols + dj)
                np.add.at(total, flat, probs)
                np.add.at(count, flat, 1)

    def result(self) -> np.ndarray:
        """Mean probability per cell (float32); NaN where no patch covers the cell."""
        out = np.full(self.shape, np.nan, dtype=np.float32)
        covered = self.count > 0
        out[covered] = self.total[covered] / self.count[covered]
        return out


def stitch_heatmap(
    grid_ij: np.ndarray, probs: np.ndarray, grid_shape: tuple[int, int], cells_per_patch: int = 1
) -> np.ndarray:
    """Heatmap of :func:`heatmap_shape` from all patches at once (see :class:`HeatmapAccumulator`)."""
    acc = HeatmapAccumulator(grid_shape, cells_per_patch)
    acc.add(grid_ij, probs)
    return acc.result()


# --------------------------------------------------------------------------- mask, polygons


def tumor_mask(
    heatmap: np.ndarray, threshold: float, min_area_cells: int = 0, fill_holes_cells: int = 0
) -> np.ndarray:
    """Cells with probability >= ``threshold`` (NaN = no tissue = not tumor), cleaned up.

    Regions of fewer than ``min_area_cells`` cells are dropped and holes of fewer than
    ``fill_holes_cells`` cells are filled. Both use 4-connectivity, the same notion of a
    region as the polygons (cells touching only at a corner become separate polygons),
    so every polygon that survives has at least ``min_area_cells`` cells.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
    mask = np.where(np.isnan(heatmap), -np.inf, heatmap) >= threshold
    # Specks first, so a dropped speck inside a hole cannot keep that hole open.
    if min_area_cells > 1:
        mask = morphology.remove_small_objects(mask, max_size=int(min_area_cells) - 1, connectivity=1)
    if fill_holes_cells > 1:
        mask = morphology.remove_small_holes(mask, max_size=int(fill_holes_cells) - 1, connectivity=1)
    return mask


def tumor_polygons(
    mask: np.ndarray,
    stride_l0: float,
    origin_l0: tuple[float, float] = (0.0, 0.0),
    bounds: tuple[float, float] | None = None,
) -> MultiPolygon:
    """Tumor cells as level-0 (x, y) polygons, exact on the cell grid.

    ``bounds`` = level-0 (width, height) clips to the slide: the last grid row and
    column may run past the slide's edge, and that padding is not tumor area.
    """
    polys = mask_to_polygons(mask, scale=float(stride_l0), offset=(float(origin_l0[0]), float(origin_l0[1])))
    if bounds is not None and not polys.is_empty:
        polys = as_multipolygon(shapely.intersection(polys, box(0, 0, float(bounds[0]), float(bounds[1]))))
    return polys


def grid_to_thumbnail(
    grid: np.ndarray,
    thumb_shape: tuple[int, int],
    thumb_downsample: float,
    cell_l0: float,
    origin_l0: tuple[float, float] = (0.0, 0.0),
    fill: Any = 0,
) -> np.ndarray:
    """Resample a grid onto the thumbnail's pixels (nearest cell to each pixel centre).

    Thumbnail pixel (i, j) covers level-0 ``[j*ds, (j+1)*ds) x [i*ds, (i+1)*ds)``; pixels
    whose centre falls outside the grid get ``fill``.
    """
    grid = np.asarray(grid)
    th, tw = int(thumb_shape[0]), int(thumb_shape[1])

    def index(n_px: int, origin: float, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        centre_l0 = (np.arange(n_px) + 0.5) * thumb_downsample
        idx = np.floor((centre_l0 - origin) / cell_l0).astype(np.int64)
        inside = (idx >= 0) & (idx < n_cells)
        return np.clip(idx, 0, max(n_cells - 1, 0)), inside

    rows, rows_in = index(th, float(origin_l0[1]), grid.shape[0])
    cols, cols_in = index(tw, float(origin_l0[0]), grid.shape[1])
    out = grid[np.ix_(rows, cols)]
    out[~rows_in, :] = fill
    out[:, ~cols_in] = fill
    return out


# --------------------------------------------------------------------------- tumor ∩ tissue

# What tumor_area_mm2, the polygons and the masks count (summary.json "tumor_area_basis").
AREA_BASIS_TISSUE = "tumor cells ∩ tissue (the tissue outline less its glass clefts)"
AREA_BASIS_CELLS = "tumor cells (the store records no tissue outline to clip to)"


def glass_clefts(
    thumbnail: np.ndarray, tissue_mask: np.ndarray, saturation_threshold: float, max_brightness: float, min_px: int
) -> np.ndarray:
    """Glass inside the tissue outline: pieces of at least ``min_px`` thumbnail pixels that the
    tissue detector's own pixel rule calls background (saturation at or below its threshold, or
    brighter than ``max_brightness``; near-black is not glass).

    The detector closes gaps and fills small holes, so a cleft with a few fibres of debris in
    it, or one open to the slide's glass through a narrow gap, ends up inside the outline;
    this finds it again from the thumbnail's pixels."""
    from wsipipe.slides.tissue import remove_small_objects, saturation_value

    sat, grey = saturation_value(np.asarray(thumbnail)[..., :3])
    tissue_px = (sat > saturation_threshold * 255) & (grey < max_brightness * 255)
    glass = ~tissue_px & (grey > 0.05 * 255) & np.asarray(tissue_mask, dtype=bool)
    return remove_small_objects(glass, max(int(min_px) - 1, 0)) if min_px > 1 else glass


def tissue_region(outline: BaseGeometry, clefts: np.ndarray | None = None, downsample: float = 1.0) -> MultiPolygon:
    """The tissue outline (level-0) less the cleft pixels of a ``downsample`` mask, valid."""
    region = shapely.make_valid(outline)
    if clefts is not None and clefts.any():
        region = shapely.make_valid(shapely.difference(region, mask_to_polygons(clefts, scale=float(downsample))))
    return as_multipolygon(region)


def clip_regions(
    polygons: MultiPolygon, region: BaseGeometry | None, min_area_px: float, sliver_px: float = 0.0
) -> MultiPolygon:
    """Each tumor polygon ∩ ``region`` (None = unclipped), made valid.

    A polygon whose clipped area is below ``min_area_px`` (level-0 px²) is dropped, so the
    minimum tumor area holds after clipping; the pieces of one that passes are all kept (a
    cleft splitting a region leaves tumor on both sides of it), except slivers below
    ``sliver_px``."""
    kept: list[Polygon] = []
    for poly in polygons.geoms:
        pieces = as_multipolygon(shapely.make_valid(shapely.intersection(poly, region))) if region is not None \
            else MultiPolygon([poly])
        parts = [q for q in pieces.geoms if q.area > max(sliver_px, 0.0)]
        if parts and sum(q.area for q in parts) >= min_area_px:
            kept.extend(parts)
    return MultiPolygon(kept)


def top_k_count(n: int, top_k: int, fraction: float | None = None) -> int:
    """k of the slide score: ``clamp(ceil(fraction x n), 1, top_k)`` (``min(top_k, n)`` without a
    fraction); 0 without patches."""
    if n <= 0:
        return 0
    if fraction is None:
        return min(top_k, n)
    return max(1, min(top_k, math.ceil(fraction * n - 1e-9), n))


def decide(
    region_areas_mm2: list[float], region_max_p: float | None, top_k_mean: float | None, k: int, threshold: float,
    min_area_mm2: float,
) -> tuple[str, str, bool]:
    """(decision, reason, agree): "tumor" when a tumor region is drawn or the top-k mean reaches
    the threshold; ``reason`` says both in one sentence; ``agree`` is False when only one holds."""
    by_regions = bool(region_areas_mm2)
    by_score = top_k_mean is not None and top_k_mean >= threshold
    if by_regions:
        n = len(region_areas_mm2)
        regions = f"{n} tumor region{'s' if n > 1 else ''} (largest {max(region_areas_mm2):.3g} mm²"
        regions += f", max p {region_max_p:.3f})" if region_max_p is not None else ")"
    else:
        regions = f"no tumor region of at least {min_area_mm2:.3g} mm²"
    score = "no patch analysed" if top_k_mean is None else (
        f"top-{k} mean {top_k_mean:.3f} {'≥' if by_score else '<'} threshold {threshold:g}"
    )
    return ("tumor" if by_regions or by_score else "normal"), f"{regions}; {score}", by_regions == by_score


# --------------------------------------------------------------------------- slide score


@dataclass
class ScoreAccumulator:
    """Streaming slide score: count, sum, and the ``top_k`` largest probabilities.

    With ``top_k_fraction`` the score's k is :func:`top_k_count` of the final count: the
    ``top_k`` largest are kept while streaming, and k never exceeds ``top_k``."""

    top_k: int
    top_k_fraction: float | None = None
    n: int = 0
    total: float = 0.0
    top: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32), repr=False)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")

    def add(self, probs: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if not len(probs):
            return
        self.n += len(probs)
        self.total += float(probs.sum(dtype=np.float64))
        top = np.concatenate([self.top, probs])
        if len(top) > self.top_k:
            top = np.partition(top, len(top) - self.top_k)[-self.top_k :]
        self.top = top

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            # No patches: no score. None, not 0.0, so nobody reads "certainly normal".
            return {"n": 0, "k": 0, "max": None, "top_k_mean": None, "mean": None}
        k = top_k_count(self.n, self.top_k, self.top_k_fraction)
        top = np.sort(self.top.astype(np.float64))[-k:]
        return {
            "n": self.n,
            "k": k,
            "max": float(self.top.max()),
            "top_k_mean": float(top.mean()),
            "mean": self.total / self.n,
        }


def slide_score(probs: np.ndarray, top_k: int, top_k_fraction: float | None = None) -> dict[str, Any]:
    """``{"n", "k", "max", "top_k_mean", "mean"}`` of patch probabilities.

    ``k = min(top_k, n)``, or :func:`top_k_count` with ``top_k_fraction``; with no patches
    every score is None.
    """
    probs = np.asarray(probs)
    if probs.ndim != 1:
        raise ValueError(f"probs must be 1-D (one tumor probability per patch), got shape {probs.shape}")
    acc = ScoreAccumulator(top_k, top_k_fraction)
    acc.add(probs)
    return acc.result()


# --------------------------------------------------------------------------- rendering

def render_heatmap_png(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    heatmap: np.ndarray,
    stride_l0: float,
    origin_l0: tuple[float, float],
    polygons: MultiPolygon,
    threshold: float,
    slide_mpp: float | None = None,
    title: str = "",
    *,
    min_area_mm2: float = 0.0,
    bounds: tuple[float, float] | None = None,
) -> bytes:
    """heatmap.png: the heatmap over ``thumbnail`` (level-0 px per pixel: ``thumb_downsample``;
    :func:`wsipipe.outputs.figures.read_background` gives one at the figure's size), see
    :func:`wsipipe.outputs.figures.heatmap_figure`. ``min_area_mm2``: the smallest tumor region
    counted, stated in the legend; ``bounds``: the slide's level-0 (width, height)."""
    background = Background(np.asarray(thumbnail), float(thumb_downsample), "thumbnail")
    grid = HeatmapGrid(
        np.asarray(heatmap), float(stride_l0), (float(origin_l0[0]), float(origin_l0[1])), float(threshold),
        float(min_area_mm2), bounds,
    )
    return figure_png(heatmap_figure(background, grid, polygons, slide_mpp, title))


# tEXt keys of tumor_mask.png: its scale and place on the slide, readable without summary.json.
PNG_UM_PER_PX, PNG_DOWNSAMPLE_L0, PNG_ORIGIN_L0 = "wsipipe:um_per_px", "wsipipe:downsample_l0", "wsipipe:origin_l0"


def mask_png(mask: np.ndarray, scale: FileScale | None = None) -> bytes:
    """Binary mask as an 8-bit greyscale PNG: white = tumor.

    With ``scale``, the PNG carries it: tEXt chunks :data:`PNG_UM_PER_PX`,
    :data:`PNG_DOWNSAMPLE_L0` and :data:`PNG_ORIGIN_L0` ("x,y" level-0 px of the top-left
    corner), and a pHYs chunk of the same pixel size (image viewers show it as dpi)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    buf = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if scale is not None:
        info = PngInfo()
        info.add_text(PNG_UM_PER_PX, repr(float(scale.um_per_px)))
        info.add_text(PNG_DOWNSAMPLE_L0, repr(float(scale.downsample_l0)))
        info.add_text(PNG_ORIGIN_L0, ",".join(repr(float(v)) for v in scale.origin_l0))
        dpi = 25_400.0 / float(scale.um_per_px)
        kwargs = {"pnginfo": info, "dpi": (dpi, dpi)}
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- store level


def stitch_identity(group: zarr.Group, cfg: StitchConfig) -> dict[str, Any]:
    """What the stitch outputs depend on: the inference outputs and the stitch settings."""
    infer = store.stage_entry(group, store.STAGE_INFER) or {}
    return {store.STAGE_INFER: infer.get("identity"), "stitch_config": cfg.model_dump(mode="json")}


def _identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def summary_identity(group: zarr.Group, cfg: StitchConfig, qc_cfg: QCConfig, export: ExportConfig) -> str:
    """Hash of everything summary.json and its files depend on. QC thresholds and export
    settings decide flags and which files exist, not the heatmap: they are in this hash (a
    changed setting rewrites the outputs) but not in the store's stitch stage identity."""
    return _identity_hash(
        {**stitch_identity(group, cfg), "qc_config": qc_cfg.model_dump(mode="json"),
         "export": export.model_dump(mode="json")}
    )


def existing_outputs(
    group: zarr.Group, out_dir: str | Path, cfg: StitchConfig, qc_cfg: QCConfig, export: ExportConfig
) -> dict[str, Any] | None:
    """The summary (as a dict) of complete stitch outputs in ``out_dir`` made from these very inputs, else None."""
    summary = existing_summary(group, out_dir, cfg, qc_cfg, export)
    return None if summary is None else summary.as_dict()


def existing_summary(
    group: zarr.Group, out_dir: str | Path, cfg: StitchConfig, qc_cfg: QCConfig, export: ExportConfig
) -> SlideSummary | None:
    """The typed summary of complete stitch outputs in ``out_dir`` made from these very inputs, else None."""
    if not store.is_complete(group, STAGE, stitch_identity(group, cfg)):
        return None
    return _existing_summary(Path(out_dir), summary_identity(group, cfg, qc_cfg, export))


def _existing_summary(out_dir: Path, identity_hash: str) -> SlideSummary | None:
    """The previous summary when every output is there and was made from the same inputs."""
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES.values()):
        return None
    try:
        summary = load_summary(out_dir / OUTPUT_FILES["summary"])
    except SummaryError:
        return None
    if summary.provenance.stitch_identity != identity_hash:
        return None  # outputs of another store or older settings in the same folder
    if not all((out_dir / name).exists() for name in summary.exports.values()):
        return None  # an export (e.g. heatmap.ome.zarr) was deleted
    return summary


def _write_exports(
    out_dir: Path, export: ExportConfig, heatmap: np.ndarray, mask: np.ndarray, polygons: MultiPolygon,
    stride_l0: float, origin: tuple, slide_mpp: float, bounds: tuple[float, float] | None, provenance: dict,
) -> dict[str, str]:
    """Outputs for other tools (see wsipipe.outputs.omezarr, wsipipe.outputs.ometiff, wsipipe.outputs.qupath); their file names."""
    files = {}
    if export.validate_geojson:
        from wsipipe.outputs.qupath import validate_qupath_geojson

        validate_qupath_geojson(out_dir / OUTPUT_FILES["tumor_geojson"], expected={"Tumor": polygons})
    if export.ome_zarr:
        from wsipipe.outputs.omezarr import write_heatmap_omezarr

        files["heatmap_ome_zarr"] = "heatmap.ome.zarr"
        write_heatmap_omezarr(out_dir / files["heatmap_ome_zarr"], heatmap, mask, stride_l0, origin, slide_mpp, provenance)
    if export.ome_tiff_mask and bounds is not None:
        from wsipipe.outputs.ometiff import write_mask_ometiff

        downsample = export.ome_tiff_mpp / slide_mpp
        shape = (math.ceil(bounds[1] / downsample), math.ceil(bounds[0] / downsample))
        files["tumor_mask_ome_tiff"] = "tumor_mask.ome.tif"
        # From the polygons (clipped to the tissue), like tumor_mask.png: finer than the cells.
        write_mask_ometiff(
            out_dir / files["tumor_mask_ome_tiff"], rasterize(polygons, shape, scale=downsample), export.ome_tiff_mpp,
        )
    return files


@dataclass(frozen=True)
class TumorColumn:
    """Which probability column is the tumor one: ``index`` (None = the one column of a one-logit
    model), its ``name`` and every column's (None where the store names none)."""

    index: int | None
    name: str | None
    columns: list[str] | None

    def of(self, probs: np.ndarray) -> np.ndarray:
        return probs if self.index is None or probs.ndim == 1 else probs[:, self.index]


def tumor_column(
    attrs: Any, shape: tuple[int, ...], tumor_class: str | None, class_index: int, store_path: Path | None,
) -> TumorColumn:
    """The tumor column of a probabilities array (its ``attrs`` and ``shape``): ``tumor_class`` by
    name when set, else the positive class the model's card named, else ``class_index`` for a
    store whose columns have no names (a model without a card). The report picks the same one.

    A ``tumor_class`` that names no column is a ConfigError listing the columns."""
    names = attrs.get("classes") if hasattr(attrs, "get") else None
    columns = [str(c) for c in names] if isinstance(names, list) else None
    n_classes = 1 if len(shape) == 1 else int(shape[1])
    if columns is not None and len(columns) != n_classes:
        columns = None  # names of another model's columns: not these
    positive = attrs.get("positive_class") if hasattr(attrs, "get") else None
    if tumor_class is not None:
        if columns is None:
            raise ConfigError(store_path, f"stitch.tumor_class={tumor_class!r}: the probabilities name no classes "
                              f"(a model without a card); use stitch.class_index (0..{n_classes - 1}) instead")
        if tumor_class not in columns:
            raise ConfigError(store_path, f"stitch.tumor_class={tumor_class!r} names no probability column "
                              f"(columns: {', '.join(columns)})")
        name = tumor_class
    elif columns is not None:
        name = positive if positive in columns else columns[-1]
    else:
        name = None
    if len(shape) == 1:
        return TumorColumn(None, name, columns)
    if name is not None and columns is not None:
        return TumorColumn(columns.index(name), name, columns)
    if not -n_classes <= class_index < n_classes:
        raise StoreError(store_path, f"stitch.class_index={class_index} but probabilities have {n_classes} classes")
    return TumorColumn(class_index % n_classes, None, None)


@dataclass
class StitchInputs:
    """Step 1 (read): the geometry and arrays of a classified store that stitching needs."""

    store_path: Path
    meta: dict[str, Any]  # the store's wsipipe attrs
    grid_shape: tuple[int, int]
    stride_l0: float
    cells_per_patch: int
    thumb_downsample: float
    origin: tuple[float, float]
    slide_mpp: float
    grid_ij: zarr.Array
    probabilities: zarr.Array
    corrupt: zarr.Array | None  # patches tiling skipped for corrupt tile data carry no result
    # Which probability column is tumor (stitch.tumor_class / the card's positive class / class_index).
    column: TumorColumn = field(default_factory=lambda: TumorColumn(None, None, None))
    # Each patch's QC background (glass) fraction, read a slice at a time; None = no QC measures.
    background: Callable[[slice], np.ndarray] | None = None
    # Level-0 tissue the tumor regions are clipped to; None = the store records no outline.
    tissue: MultiPolygon | None = None
    # Each patch's distance from the model's training domain (models.domain); None = not checked.
    distances: zarr.Array | None = None

    @property
    def n(self) -> int:
        return int(self.grid_ij.shape[0])

    @property
    def slide(self) -> dict[str, Any]:
        return dict(self.meta.get(store.META_SLIDE) or {})

    @property
    def stages(self) -> dict[str, Any]:
        return dict(self.meta.get(store.META_STAGES) or {})

    @property
    def bounds(self) -> tuple[float, float] | None:
        """Level-0 (width, height) of the slide, when the store knows it."""
        width, height = self.slide.get("width"), self.slide.get("height")
        return (float(width), float(height)) if width and height else None


@dataclass
class Accumulated:
    """Step 2 (accumulate): the heatmap and slide score from every patch."""

    heatmap: np.ndarray
    scores: dict[str, Any]
    n_tumor_patches: int
    excluded: dict[str, int] | None = None  # patches not analysed, by reason; None = not checked
    distances: np.ndarray | None = None  # the analysed patches' domain distances; None = none stored


@dataclass
class TumorRegions:
    """The tumor regions (clipped to the tissue) and the decision they and the score make."""

    mask: np.ndarray  # heatmap cells whose centre lies in a region
    polygons: MultiPolygon  # level-0, clipped to the tissue, each at least the minimum area
    min_cells: int
    tumor_area_mm2: float
    decision: str
    reason: str  # one sentence: regions and score
    agree: bool  # regions and score say the same
    basis: str  # what the area counts (AREA_BASIS_*)

    def thumbnail_mask(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """The regions on the thumbnail's pixels (pixel centre inside a region)."""
        return rasterize(self.polygons, shape, scale=float(downsample))


@dataclass
class Rendered:
    """Step 3 (render): the tumor mask, its polygons and the images, all still in memory."""

    mask: np.ndarray
    polygons: MultiPolygon
    min_cells: int
    tumor_area_mm2: float
    decision: str
    heatmap_png: bytes
    mask_thumb: np.ndarray
    regions: TumorRegions | None = None


def read_inputs(group: zarr.Group, store_path: Path, cfg: StitchConfig | None = None) -> StitchInputs:
    """Geometry from the tile attrs and the grid_ij / probabilities / corrupt arrays, checked;
    the tumor column by ``cfg`` (default settings when None)."""
    meta = store.meta(group)
    tile, slide = meta.get(store.META_TILE) or {}, meta.get(store.META_SLIDE) or {}
    for name in (store.GRID_IJ, store.PROBABILITIES, store.THUMBNAIL):
        if name not in group:
            raise StoreError(store_path, f"array '{name}' is missing; rerun the stage that writes it")
    try:
        grid_shape = (int(tile["grid_shape"][0]), int(tile["grid_shape"][1]))
        stride_l0 = float(tile["stride_l0"])
        r = cells_per_patch(tile["patch_size"], tile["stride"])
        thumb_ds = float(tile["thumb_downsample"])
    except (KeyError, TypeError, IndexError) as exc:
        raise StoreError(store_path, f"tile attrs incomplete ({exc!r}); rerun `wsipipe tile`") from None
    ox, oy = (float(v) for v in tile.get("origin_l0", (0, 0)))
    slide_mpp = float(tile.get("slide_mpp") or slide.get("mpp") or 0.0)
    if slide_mpp <= 0:
        raise StoreError(store_path, "no slide mpp in the store attrs; cannot convert areas to µm²")
    cfg = cfg or StitchConfig()
    probabilities = store.array(group, store.PROBABILITIES)
    inputs = StitchInputs(
        store_path=store_path, meta=meta, grid_shape=grid_shape, stride_l0=stride_l0, cells_per_patch=r,
        thumb_downsample=thumb_ds, origin=(ox, oy), slide_mpp=slide_mpp,
        grid_ij=store.array(group, store.GRID_IJ), probabilities=probabilities,
        corrupt=store.optional_array(group, store.CORRUPT),
        column=tumor_column(probabilities.attrs, tuple(probabilities.shape), cfg.tumor_class, cfg.class_index, store_path),
        background=_background_reader(group), tissue=read_tissue_region(group, thumb_ds, slide_mpp),
        distances=store.optional_array(group, DISTANCE_ARRAY),
    )
    n, n_probs = inputs.n, int(inputs.probabilities.shape[0])
    if n_probs != n:
        raise StoreError(store_path, f"{n} patches but {n_probs} probabilities; rerun `wsipipe infer`")
    if n == 0:
        raise NoTissueError(store_path, "the store has no patches (no tissue was tiled); nothing to stitch")
    return inputs


def _background_reader(group: zarr.Group) -> Callable[[slice], np.ndarray] | None:
    """Rows of the stored QC background fraction, or None when the store has no QC measures."""
    arr = store.optional_array(group, store.QC_MEASURES)
    if arr is not None:
        names = arr.attrs.get("measures")
        columns = [str(c) for c in names] if isinstance(names, list) else []
        if "background_fraction" not in columns:
            return None
        col = columns.index("background_fraction")
        return lambda sl: np.asarray(arr[sl, col], dtype=np.float32)
    name = f"{store.QC_GROUP}/background_fraction"  # earlier layout: one array per measure
    if name in group:
        one = store.array(group, name)
        return lambda sl: np.asarray(one[sl], dtype=np.float32)
    return None


def cleft_min_um2(tissue_params: dict[str, Any]) -> float:
    """Smallest glass cleft, and smallest piece of a tumor region cut off by clefts, µm²:
    (2 x tissue.closing_um)², the area of the widest gap the tissue detector's closing bridges."""
    return (2.0 * float(tissue_params.get("closing_um", 40.0))) ** 2


def read_tissue_region(group: zarr.Group, thumb_downsample: float, slide_mpp: float) -> MultiPolygon | None:
    """The store's tissue outline less its glass clefts (:func:`glass_clefts`), level-0; None
    when the store records no outline.

    A cleft is a glass piece of at least (2 x tissue.closing_um)² µm²: wider than the gaps
    the detector's closing is there to bridge (6 400 µm², 100 px of an 8 µm/px thumbnail,
    by default; specks between cells and fibres stay tissue)."""
    tissue = store.meta(group).get(store.META_TISSUE) or {}
    wkt = tissue.get("polygon_wkt")
    if not wkt:
        return None
    outline = shapely.from_wkt(wkt)
    params = tissue.get("params") or {}
    threshold = tissue.get("saturation_threshold")
    if params.get("detect") is False or threshold is None or store.TISSUE_MASK not in group:
        return tissue_region(outline)
    px_um2 = (float(thumb_downsample) * float(slide_mpp)) ** 2
    min_px = math.ceil(cleft_min_um2(params) / px_um2)
    clefts = glass_clefts(
        np.asarray(store.array(group, store.THUMBNAIL)[...]), np.asarray(store.array(group, store.TISSUE_MASK)[...]),
        float(threshold), float(params.get("max_brightness", 0.94)), min_px,
    )
    return tissue_region(outline, clefts, thumb_downsample)


def _checked_probabilities(p: np.ndarray, sl: slice, store_path: Path) -> None:
    if len(p) and (not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0):
        raise StoreError(
            store_path,
            f"probabilities of patches {sl.start}..{sl.stop - 1} are not all in [0, 1] "
            f"(min {np.nanmin(p):.4g}, max {np.nanmax(p):.4g}, NaN/inf present: {not np.isfinite(p).all()}); "
            "were logits stored instead of probabilities?",
        )


def accumulate(
    inputs: StitchInputs, cfg: StitchConfig, chunk_patches: int = CHUNK_PATCHES, progress: Progress | None = None
) -> Accumulated:
    """Heatmap and score, reading the store chunk by chunk (memory: the grid and one chunk)."""
    n, store_path = inputs.n, inputs.store_path
    # Chunk-aligned reads: a whole number of the probabilities' own Zarr chunks per step.
    step = max(1, int(inputs.probabilities.chunks[0]))
    step *= max(1, chunk_patches // step)
    heat = HeatmapAccumulator(inputs.grid_shape, inputs.cells_per_patch)
    score = ScoreAccumulator(cfg.top_k, cfg.top_k_fraction)
    n_tumor_patches = n_glass = 0
    kept_distances: list[np.ndarray] = []  # 4 bytes per analysed patch: far below the grid
    for sl in store.chunk_slices(n, step):
        ij = np.asarray(inputs.grid_ij[sl])
        p = inputs.column.of(np.asarray(inputs.probabilities[sl], dtype=np.float32))
        keep = np.ones(len(p), dtype=bool)
        if inputs.corrupt is not None:
            keep &= ~np.asarray(inputs.corrupt[sl], dtype=bool)
        if inputs.background is not None:
            # Mostly glass (clefts, tears, between fragments): not analysed. NaN (not measured) is kept.
            glass = keep & (inputs.background(sl) > cfg.max_background)
            n_glass += int(np.count_nonzero(glass))
            keep &= ~glass
        ij, p = ij[keep], p[keep]
        if inputs.distances is not None:
            kept_distances.append(np.asarray(inputs.distances[sl], dtype=np.float32)[keep])
        _checked_probabilities(p, sl, store_path)
        try:
            heat.add(ij, p)
        except ValueError as exc:
            raise StoreError(store_path, f"inconsistent grid_ij: {exc}") from None
        score.add(p)
        n_tumor_patches += int(np.count_nonzero(p >= cfg.tumor_threshold))
        if progress:
            progress(sl.stop, n)
    if score.n == 0 and n_glass:
        raise NoTissueError(
            store_path, f"all {n_glass} analysable patches are mostly glass (background fraction above "
            f"stitch.max_background={cfg.max_background:g}); nothing to stitch",
        )
    excluded = None if inputs.background is None else {"mostly_background": n_glass}
    distances = np.concatenate(kept_distances) if inputs.distances is not None and kept_distances else None
    return Accumulated(heat.result(), score.result(), n_tumor_patches, excluded, distances)


def _min_tumor_cells(cfg: StitchConfig, inputs: StitchInputs) -> int:
    """The minimum tumor area in heatmap cells (the ceil is nudged so an exact multiple is not
    rounded up by float noise)."""
    cell_area_um2 = (inputs.stride_l0 * inputs.slide_mpp) ** 2
    return math.ceil(cfg.min_tumor_area_um2 / cell_area_um2 - 1e-9) if cfg.min_tumor_area_um2 > 0 else 0


def _model_info(inputs: StitchInputs) -> dict[str, Any]:
    return dict((inputs.stages.get(store.STAGE_INFER) or {}).get("model") or {})


def tumor_regions(inputs: StitchInputs, acc: Accumulated, cfg: StitchConfig) -> TumorRegions:
    """Tumor regions from the heatmap, clipped to the tissue, and the slide's decision.

    Cells at or above the threshold (specks and small holes cleaned on the cell grid), as
    polygons clipped to the slide and to the tissue (outline less glass clefts); pieces below
    the minimum area after clipping are dropped. The cell mask is rebuilt from the clipped
    polygons, so every output shows the same regions."""
    min_cells = _min_tumor_cells(cfg, inputs)
    # Holes below the same size are treated like specks: noise inside a tumor region.
    cells = tumor_mask(acc.heatmap, cfg.tumor_threshold, min_area_cells=min_cells, fill_holes_cells=min_cells)
    polygons = tumor_polygons(cells, inputs.stride_l0, inputs.origin, bounds=inputs.bounds)
    if inputs.tissue is not None:
        # Pieces smaller than a cleft are debris in a cleft or slivers of the outline's pixel grid.
        params = (inputs.meta.get(store.META_TISSUE) or {}).get("params") or {}
        polygons = clip_regions(
            polygons, inputs.tissue, cfg.min_tumor_area_um2 / inputs.slide_mpp**2,
            max(cleft_min_um2(params) / inputs.slide_mpp**2, inputs.thumb_downsample**2),
        )
    mask = rasterize(polygons, acc.heatmap.shape, scale=inputs.stride_l0, offset=inputs.origin)
    mm2 = inputs.slide_mpp**2 / 1e6
    areas = [poly.area * mm2 for poly in polygons.geoms]
    in_regions = acc.heatmap[_touching(cells, polygons, inputs)]
    decision, reason, agree = decide(
        areas, float(np.nanmax(in_regions)) if in_regions.size else None, acc.scores["top_k_mean"],
        acc.scores["k"], cfg.tumor_threshold, cfg.min_tumor_area_um2 / 1e6,
    )
    return TumorRegions(
        mask, polygons, min_cells, float(sum(areas)), decision, reason, agree,
        AREA_BASIS_CELLS if inputs.tissue is None else AREA_BASIS_TISSUE,
    )


def _touching(cells: np.ndarray, polygons: MultiPolygon, inputs: StitchInputs) -> np.ndarray:
    """Cells of ``cells`` whose square overlaps a polygon (not just along an edge): the cells
    under the regions, also where a clipped region is too narrow to hold a cell centre."""
    if polygons.is_empty or not cells.any():
        return np.zeros_like(cells)
    ij = np.argwhere(cells)
    s, (ox, oy), e = inputs.stride_l0, inputs.origin, 1e-3  # e: shrink so a shared edge is no overlap
    x, y = ox + ij[:, 1] * s, oy + ij[:, 0] * s
    shapely.prepare(polygons)
    hit = shapely.intersects(polygons, shapely.box(x + e, y + e, x + s - e, y + s - e))
    out = np.zeros_like(cells)
    out[ij[hit, 0], ij[hit, 1]] = True
    return out


def render(inputs: StitchInputs, acc: Accumulated, cfg: StitchConfig, thumbnail: np.ndarray) -> Rendered:
    """Tumor mask and polygons from the heatmap; the heatmap PNG and the mask at thumbnail scale."""
    regions = tumor_regions(inputs, acc, cfg)
    mask, polygons, tumor_area_mm2, decision = regions.mask, regions.polygons, regions.tumor_area_mm2, regions.decision
    scores = acc.scores
    slide = inputs.slide
    title = (
        f"{slide.get('name') or Path(str(slide.get('path', inputs.store_path))).name}: {decision} "
        f"(top-{scores['k']} mean {scores['top_k_mean']:.3f}, max {scores['max']:.3f}; "
        f"tumor {tumor_area_mm2:.3g} mm²)"
    )
    # The background at the figure's size from the slide file (the store's thumbnail if it is gone).
    background = read_background(thumbnail, inputs.thumb_downsample, slide, inputs.meta.get(store.META_TILE) or {})
    heatmap_png = render_heatmap_png(
        background.rgb, background.downsample, acc.heatmap, inputs.stride_l0, inputs.origin, polygons,
        cfg.tumor_threshold, inputs.slide_mpp, title, min_area_mm2=cfg.min_tumor_area_um2 / 1e6, bounds=inputs.bounds,
    )
    mask_thumb = regions.thumbnail_mask(thumbnail.shape[:2], inputs.thumb_downsample)
    return Rendered(mask, polygons, regions.min_cells, tumor_area_mm2, decision, heatmap_png, mask_thumb, regions)


def write_outputs(
    out_dir: Path, inputs: StitchInputs, acc: Accumulated, out: Rendered, cfg: StitchConfig, export: ExportConfig
) -> dict[str, str]:
    """heatmap.npy, heatmap.png, tumor_mask.png, tumor.geojson and the exports, each atomically;
    returns the exports' file names by kind."""
    slide, model = inputs.slide, _model_info(inputs)
    geojson_props = {
        "name": "Tumor",
        # QuPath keeps string key/values under "metadata" with the annotation.
        "metadata": {
            "wsipipe_version": __version__,
            "slide_identity": str(slide.get("identity", "")),
            "model_sha256": str(model.get("sha256", "")),
            "threshold": f"{cfg.tumor_threshold:g}",
        },
    }
    write_atomic(out_dir / OUTPUT_FILES["heatmap"], _npy_bytes(acc.heatmap))
    write_atomic(out_dir / OUTPUT_FILES["heatmap_png"], out.heatmap_png)
    write_atomic(out_dir / OUTPUT_FILES["tumor_mask_png"], mask_png(out.mask_thumb, file_scales(inputs)["tumor_mask_png"]))
    write_geojson(out_dir / OUTPUT_FILES["tumor_geojson"], {"Tumor": out.polygons}, properties=geojson_props)
    return _write_exports(
        out_dir, export, acc.heatmap, out.mask, out.polygons, inputs.stride_l0, inputs.origin, inputs.slide_mpp,
        inputs.bounds,
        provenance={"wsipipe_version": __version__, "slide_identity": slide.get("identity"),
                    "model_sha256": model.get("sha256"), "threshold": cfg.tumor_threshold},
    )


def file_scales(inputs: StitchInputs) -> dict[str, FileScale]:
    """Scale of the raster outputs by kind (as in OUTPUT_FILES): tumor_mask.png is on the
    thumbnail's pixels, heatmap.npy on the heatmap's cells."""
    mpp = inputs.slide_mpp
    return {
        "heatmap": FileScale(
            um_per_px=inputs.stride_l0 * mpp, downsample_l0=inputs.stride_l0, origin_l0=list(inputs.origin)
        ),
        "tumor_mask_png": FileScale(
            um_per_px=inputs.thumb_downsample * mpp, downsample_l0=inputs.thumb_downsample, origin_l0=[0.0, 0.0]
        ),
    }


def _config_hashes(stages: dict[str, Any], identity: dict[str, Any]) -> dict[str, str]:
    """Config hash per stage: those the earlier stages recorded, and this stitch's."""
    config_hash = {
        stage: entry.get("identity", {}).get("config")
        for stage, entry in stages.items()
        if isinstance(entry.get("identity"), dict) and entry["identity"].get("config")
    }
    config_hash[STAGE] = _identity_hash(identity["stitch_config"])
    return config_hash


def summarise(
    group: zarr.Group, inputs: StitchInputs, acc: Accumulated, out: Rendered, cfg: StitchConfig, qc_cfg: QCConfig,
    identity: dict[str, Any], identity_hash: str, exports: dict[str, str], seconds: float,
) -> SlideSummary:
    """The :class:`SlideSummary` of a stitched slide (QC flags computed here, from the store)."""
    slide, stages, model, scores = inputs.slide, inputs.stages, _model_info(inputs), acc.scores
    qc_section = QCSection.model_validate(
        qc.slide_qc(group, inputs.meta, scores["top_k_mean"], cfg.tumor_threshold, qc_cfg)
    )
    regions = out.regions
    if regions is not None and not regions.agree:
        qc_section.flags.append(QCFlag(
            code="decision_regions_disagree", severity=qc.REVIEW,
            message=f"the tumor regions and the slide score disagree: {regions.reason}; "
            f"the slide is called {regions.decision}",
        ))
        qc_section.needs_review = True
    departed = (stages.get(store.STAGE_INFER) or {}).get(OVERRIDE_KEY)
    if departed:  # run with --force at another resolution or patch size than the model's card says
        words = "; ".join(f"{k} {v.get('used')} (the card says {v.get('card')})" for k, v in departed.items())
        qc_section.flags.append(QCFlag(
            code=OVERRIDE_KEY, severity=qc.REVIEW, values=departed,
            message=f"patches classified at other settings than the model was trained at: {words}",
        ))
        qc_section.needs_review = True
    domain, domain_flag = domain_section(
        (stages.get(store.STAGE_INFER) or {}).get("domain"), acc.distances, qc_cfg.ood_fraction
    )
    if domain_flag is not None:
        qc_section.flags.append(domain_flag)
        qc_section.needs_review = True
    return SlideSummary(
        version=__version__,
        slide=SummarySlide(
            name=slide.get("name"), path=slide.get("path"), identity=slide.get("identity"),
            width=slide.get("width"), height=slide.get("height"), mpp=inputs.slide_mpp,
            mpp_source=slide.get("mpp_source"), mpp_file=slide.get("mpp_file"),
        ),
        store=str(inputs.store_path),
        provenance=Provenance(
            config_hash=_config_hashes(stages, identity),
            model=ModelRef(sha256=model.get("sha256"), arch=model.get("arch"), training_data=model.get("training_data")),
            stitch_identity=identity_hash,
        ),
        config=identity["stitch_config"],
        n_patches=inputs.n,
        skipped_patches=(stages.get(store.STAGE_TILE) or {}).get("corrupt_patches"),
        excluded_patches=acc.excluded,
        n_tumor_patches=acc.n_tumor_patches,
        threshold=cfg.tumor_threshold,
        slide_score=SlideScore(**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores.items()}),
        decision=out.decision,
        decision_reason=regions.reason if regions is not None else None,
        tumor_area_mm2=round(out.tumor_area_mm2, 6),
        tumor_area_basis=regions.basis if regions is not None else None,
        n_tumor_regions=len(out.polygons.geoms),
        heatmap=HeatmapInfo(
            shape=list(acc.heatmap.shape),
            cell_size_l0=inputs.stride_l0,
            cell_size_um=inputs.stride_l0 * inputs.slide_mpp,
            origin_l0=list(inputs.origin),
            cells_per_patch=inputs.cells_per_patch,
            min_tumor_area_cells=out.min_cells,
        ),
        seconds={
            store.STAGE_TILE: (stages.get(store.STAGE_TILE) or {}).get("seconds"),
            store.STAGE_INFER: (stages.get(store.STAGE_INFER) or {}).get("seconds"),
            STAGE: round(seconds, 3),
        },
        files=dict(OUTPUT_FILES),
        file_scales=file_scales(inputs),
        qc=qc_section,
        exports=exports,  # outputs for other tools (directories included), by kind
        # The probability columns (None: the model names none) and the one read as tumor.
        classes=inputs.column.columns, tumor_class=inputs.column.name,
        domain=domain,
    )


def write_summary(group: zarr.Group, out_dir: Path, summary: SlideSummary, identity: dict[str, Any]) -> None:
    """summary.json, then the stitch stage marked complete: the last two writes of a stitch."""
    write_atomic(out_dir / OUTPUT_FILES["summary"], summary_json(summary))
    store.set_stage(
        group, STAGE, identity, True, seconds=summary.seconds[STAGE], out_dir=str(out_dir),
        n_tumor_regions=summary.n_tumor_regions,
    )


def stitch_store(
    store_path: str | Path,
    out_dir: str | Path,
    cfg: StitchConfig,
    progress: Progress | None = None,
    *,
    chunk_patches: int = CHUNK_PATCHES,
    qc_cfg: QCConfig | None = None,
    export: ExportConfig | None = None,
) -> dict[str, Any]:
    """Heatmap, tumor mask, QuPath GeoJSON and summary.json from a classified store.

    Needs the ``tile`` and ``infer`` stages complete. Writes into ``out_dir`` only after
    everything is computed (each file via a temporary name; summary.json last), then marks
    the ``stitch`` stage complete. A rerun with the same inputs and all outputs present
    returns the existing summary without recomputing. Returns the summary as a dict
    (:func:`stitch_summary` returns the typed :class:`SlideSummary`).
    ``export`` (default: :class:`ExportConfig` defaults) adds outputs for other tools.
    """
    return stitch_summary(
        store_path, out_dir, cfg, progress, chunk_patches=chunk_patches, qc_cfg=qc_cfg, export=export
    ).as_dict()


def stitch_summary(
    store_path: str | Path,
    out_dir: str | Path,
    cfg: StitchConfig,
    progress: Progress | None = None,
    *,
    chunk_patches: int = CHUNK_PATCHES,
    qc_cfg: QCConfig | None = None,
    export: ExportConfig | None = None,
) -> SlideSummary:
    """:func:`stitch_store`, returning the typed summary: read, accumulate, render, write, summarise."""
    t0 = time.perf_counter()
    store_path, out_dir = Path(store_path), Path(out_dir)
    group = store.open_store(store_path, mode="r+")
    store.require_complete(group, store.STAGE_TILE, store_path)
    store.require_complete(group, store.STAGE_INFER, store_path)
    export = export or ExportConfig()
    qc_cfg = qc_cfg or QCConfig()
    identity = stitch_identity(group, cfg)
    identity_hash = summary_identity(group, cfg, qc_cfg, export)
    existing = _existing_summary(out_dir, identity_hash) if store.is_complete(group, STAGE, identity) else None
    if existing is not None:
        log.info("%s: stitch outputs up to date in %s", store_path, out_dir)
        return existing

    inputs = read_inputs(group, store_path, cfg)
    acc = accumulate(inputs, cfg, chunk_patches, progress)
    rendered = render(inputs, acc, cfg, np.asarray(store.array(group, store.THUMBNAIL)[...]))
    # Everything is computed: now write, each file atomically, summary.json last.
    store.set_stage(group, STAGE, identity, False)
    exports = write_outputs(out_dir, inputs, acc, rendered, cfg, export)
    summary = summarise(
        group, inputs, acc, rendered, cfg, qc_cfg, identity, identity_hash, exports, time.perf_counter() - t0
    )
    write_summary(group, out_dir, summary, identity)
    return summary
