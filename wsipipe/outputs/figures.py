"""What the slide figures share: heatmap.png (:mod:`wsipipe.outputs.stitch`) and the report's
overview (:mod:`wsipipe.outputs.report`).

- The background is read from the slide file at about the size the figure shows it
  (:func:`read_background`), not upsampled from the store's 8 µm/px thumbnail; the store's
  thumbnail stands in when the slide file is gone or is no longer the slide that was tiled.
- The heatmap's colours (:func:`heatmap_cmap`) start at a light cyan, so tissue that was
  analysed and found negative reads apart from H&E pink and purple; cells never analysed
  get no colour, and the analysed area has its own outline.
- Tumor regions are outlined solid and their legend states the threshold and the minimum
  area; cells at or above the threshold in pieces under the minimum area are outlined
  dashed, with their own legend entry, so every hot cell is accounted for.

Figures are drawn in level-0 pixel units, so backgrounds of any resolution, the heatmap
grid and the level-0 polygons line up by construction. Matplotlib's object API only (no
pyplot global state): safe in worker threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, box

from wsipipe.errors import WsipipeError
from wsipipe.geometry import as_multipolygon, mask_to_polygons

log = logging.getLogger(__name__)

# Longest side of a background as drawn into a figure: about the figures' largest image size
# (heatmap.png is 1 500 px wide and up to 2 100 px tall).
DISPLAY_MAX_PX = 2048

# Heatmap colours, light and cool to dark and warm (RGB hex, evenly spaced over p = 0..1). The
# low end is a cyan: the complement of eosin pink and haematoxylin purple, so analysed negative
# tissue never looks like bare H&E. Lightness falls monotonically, so it reads in greyscale too.
HEATMAP_COLOURS = ("#8fe3f0", "#5cc8e0", "#f7e463", "#f59a2f", "#d7301f", "#7f0000")
HEATMAP_ALPHA = 0.6
# Outline of the analysed area (cells with a probability): neutral, thin, under the tumor lines.
ANALYSED_STYLE: dict[str, Any] = {"color": "#3a3a3a", "linewidth": 0.9}
# Tumor regions: a black line on a white halo, visible on the heatmap's reds and on glass.
TUMOR_HALO: dict[str, Any] = {"color": "white", "linewidth": 3.2}
TUMOR_LINE: dict[str, Any] = {"color": "black", "linewidth": 1.4}
# Hot cells under the minimum area: the same lines, dashed.
DASHES = (0, (3.0, 2.0))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Background:
    """The picture under a figure: ``rgb`` covers level-0 ``[0, w*downsample) x [0, h*downsample)``."""

    rgb: np.ndarray
    downsample: float  # level-0 px per background px
    source: str  # "slide" (read at the shown size) or "thumbnail" (the store's)

    @property
    def extent_l0(self) -> tuple[float, float, float, float]:
        """(left, right, bottom, top) for ``imshow`` in level-0 units."""
        h, w = self.rgb.shape[:2]
        return (0.0, w * self.downsample, h * self.downsample, 0.0)


@dataclass(frozen=True)
class HeatmapGrid:
    """A stitched heatmap and how to read it: NaN cells were never analysed."""

    values: np.ndarray  # (rows, cols) mean tumor probability per cell
    cell_l0: float  # level-0 edge of a cell
    origin_l0: tuple[float, float]  # level-0 (x, y) of cell (0, 0)'s top-left corner
    threshold: float
    min_area_mm2: float  # tumor regions smaller than this are not counted (0: no minimum)
    bounds: tuple[float, float] | None = None  # level-0 (width, height) of the slide

    @property
    def extent_l0(self) -> tuple[float, float, float, float]:
        rows, cols = self.values.shape
        ox, oy = self.origin_l0
        return (ox, ox + cols * self.cell_l0, oy + rows * self.cell_l0, oy)


def saved_heatmap(slide_dir: Path, summary: Any) -> HeatmapGrid | None:
    """The heatmap a stitch wrote into ``slide_dir`` (heatmap.npy) with its summary's geometry,
    threshold and minimum area; None when the file is not there or unreadable."""
    path = Path(slide_dir) / "heatmap.npy"
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("%s: figure without the analysed area: %s", path, exc)
        return None
    slide = summary.slide
    bounds = (float(slide.width), float(slide.height)) if slide.width and slide.height else None
    return HeatmapGrid(
        values=values, cell_l0=float(summary.heatmap.cell_size_l0),
        origin_l0=(float(summary.heatmap.origin_l0[0]), float(summary.heatmap.origin_l0[1])),
        threshold=float(summary.threshold), min_area_mm2=float(summary.config.get("min_tumor_area_um2", 0.0)) / 1e6,
        bounds=bounds,
    )


# --------------------------------------------------------------------------- background


def display_image(rgb: np.ndarray, max_side: int = DISPLAY_MAX_PX) -> np.ndarray:
    """``rgb`` shrunk by the smallest integer factor that brings its longer side to at most
    ``max_side`` (area average), unchanged if it already fits.

    Callers draw it with ``imshow(..., extent=...)`` in level-0 units, so overlays still line
    up. Without this matplotlib resamples the whole image in float RGBA to draw it: a 100k²
    slide's 6 250² thumbnail took 2.1 GiB and 16 s per figure."""
    factor = -(-max(rgb.shape[:2]) // max_side)
    if factor <= 1:
        return rgb
    from PIL import Image

    # In strips of whole blocks (the same result as one reduce): PIL would otherwise hold a
    # 4-byte-per-pixel copy of the whole image.
    rows = factor * 256
    return np.concatenate([
        np.asarray(Image.fromarray(np.ascontiguousarray(rgb[y : y + rows])).reduce(factor))
        for y in range(0, rgb.shape[0], rows)
    ])


def read_background(
    thumbnail: np.ndarray, thumb_downsample: float, slide: dict[str, Any], tile: dict[str, Any],
    max_px: int = DISPLAY_MAX_PX,
) -> Background:
    """The slide at about ``max_px`` on its longer side, read from the slide file (``slide``:
    the store's slide attrs, path and identity; ``tile``: its tile attrs, for mpp_override).

    The store's thumbnail is used as it is when it is already that large (a big slide), and in
    place of the slide when the file cannot be read or is not the slide that was tiled (moved
    or replaced since): a warning, never a failure. The read goes through
    :meth:`wsipipe.slides.slide.Slide.thumbnail`: the smallest pyramid level at least that
    fine, area-reduced block by block, so memory stays at the output's size on any slide."""
    stored = Background(np.asarray(thumbnail), float(thumb_downsample), "thumbnail")
    if max(stored.rgb.shape[:2]) >= max_px:
        return stored
    from wsipipe.slides.slide import open_slide

    path = slide.get("path")
    why = "figure background from the store's thumbnail"
    if not path or not Path(path).is_file():
        log.warning("%s: slide file not found; %s (%d px)", path or "(no slide path in the store)", why, max(stored.rgb.shape[:2]))
        return stored
    try:
        # Opened at the level-0 mpp the store records, whatever gave it (file, override or
        # --mpp-default): a slide whose file states none still opens for its pixels.
        with open_slide(path, slide.get("mpp") or tile.get("mpp_override")) as opened:
            if slide.get("identity") and opened.identity != slide["identity"]:
                log.warning("%s: not the slide that was tiled (its identity differs); %s", path, why)
                return stored
            # mpp = level 0: the cap picks the finest level that fits in max_px, else reduces.
            rgb, ds = opened.thumbnail(opened.mpp, max_px)
    except (WsipipeError, OSError) as exc:
        log.warning("%s: cannot read the slide (%s); %s", path, str(exc).splitlines()[0], why)
        return stored
    except Exception as exc:  # openslide.OpenSlideError on a damaged tile: the figure still renders
        log.warning("%s: cannot read the slide (%s: %s); %s", path, type(exc).__name__, exc, why)
        return stored
    if max(rgb.shape[:2]) <= max(stored.rgb.shape[:2]):
        return stored
    return Background(rgb, float(ds), "slide")


# --------------------------------------------------------------------------- geometry


def _clip(geom: Any, bounds: tuple[float, float] | None) -> MultiPolygon:
    if bounds is None or geom.is_empty:
        return as_multipolygon(geom)
    return as_multipolygon(shapely.intersection(geom, box(0, 0, float(bounds[0]), float(bounds[1]))))


def analysed_area(grid: HeatmapGrid) -> MultiPolygon:
    """Level-0 outline of the cells that have a probability (clipped to the slide)."""
    polys = mask_to_polygons(~np.isnan(grid.values), scale=grid.cell_l0, offset=grid.origin_l0)
    return _clip(polys, grid.bounds)


def hot_cells(grid: HeatmapGrid) -> np.ndarray:
    """Cells at or above the threshold (never analysed: not hot)."""
    return np.where(np.isnan(grid.values), -np.inf, grid.values) >= grid.threshold


def uncounted_hot_regions(grid: HeatmapGrid, tumor: MultiPolygon) -> MultiPolygon:
    """Pieces of hot cells (4-connected, as the tumor regions) that touch no tumor region: those
    dropped as smaller than the minimum area. Level-0, clipped to the slide."""
    pieces = mask_to_polygons(hot_cells(grid), scale=grid.cell_l0, offset=grid.origin_l0)
    if pieces.is_empty:
        return MultiPolygon()
    if tumor.is_empty:
        return _clip(pieces, grid.bounds)
    # A piece sharing area with a region is part of it (or a hole filled into it).
    shared = shapely.area(shapely.intersection(np.asarray(pieces.geoms), tumor))
    alone = [p for p, a in zip(pieces.geoms, shared, strict=True) if a <= 0.0]
    return _clip(MultiPolygon(alone), grid.bounds)


# --------------------------------------------------------------------------- labels


def _p(value: float) -> str:
    """A probability for a legend: two decimals unless it needs more (0.50, 0.35, 0.125)."""
    return f"{value:.2f}" if abs(value * 100 - round(value * 100)) < 1e-9 else f"{value:g}"


def _mm2(value: float) -> str:
    return f"{value:.3g} mm²"


def tumor_label(threshold: float, min_area_mm2: float) -> str:
    """What a tumor-region outline means: its threshold and minimum area."""
    if min_area_mm2 > 0:
        return f"tumor region (p ≥ {_p(threshold)}, ≥ {_mm2(min_area_mm2)})"
    return f"tumor region (p ≥ {_p(threshold)})"


def uncounted_label(threshold: float, min_area_mm2: float) -> str:
    return f"p ≥ {_p(threshold)} under {_mm2(min_area_mm2)} (not counted)"


ANALYSED_LABEL = "analysed area"


# --------------------------------------------------------------------------- drawing


def heatmap_cmap():
    """The heatmap's colour map (:data:`HEATMAP_COLOURS`); cells never analysed (NaN) transparent."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("wsipipe_tumor", list(HEATMAP_COLOURS)).with_extremes(bad=(0, 0, 0, 0))


def rings(geom: Any):
    """Exterior and interior rings of a (multi)polygon's non-empty parts."""
    for poly in getattr(geom, "geoms", [geom]):
        if poly.is_empty:
            continue
        yield from (poly.exterior, *poly.interiors)


def draw_rings(ax, geom: Any, ds: float = 1.0, **style: Any) -> None:
    """Every ring of ``geom`` (level-0) drawn in units of ``ds`` level-0 px."""
    for ring in rings(geom):
        xy = np.asarray(ring.coords) / ds
        ax.plot(xy[:, 0], xy[:, 1], **style)


def draw_tumor_outline(
    ax, geom: Any, ds: float = 1.0, dashed: bool = False, line: dict[str, Any] = TUMOR_LINE,
    halo: dict[str, Any] = TUMOR_HALO,
) -> None:
    """Tumor outlines: ``line`` on a ``halo``, both dashed for pieces that are not counted."""
    dash: dict[str, Any] = {"linestyle": DASHES} if dashed else {}
    draw_rings(ax, geom, ds, **halo, **dash)
    draw_rings(ax, geom, ds, **line, **dash)


def outline_handle(line: dict[str, Any] = TUMOR_LINE, halo: dict[str, Any] = TUMOR_HALO, dashed: bool = False):
    """A legend handle that looks like :func:`draw_tumor_outline`'s lines."""
    from matplotlib.lines import Line2D
    from matplotlib.patheffects import Normal, Stroke

    style: dict[str, Any] = {**line, **({"linestyle": DASHES} if dashed else {})}
    handle = Line2D([], [], **style)
    handle.set_path_effects([Stroke(linewidth=halo["linewidth"], foreground=halo["color"]), Normal()])
    return handle


def draw_analysis(
    ax, grid: HeatmapGrid | None, tumor: MultiPolygon, ds: float = 1.0, line: dict[str, Any] = TUMOR_LINE,
    halo: dict[str, Any] = TUMOR_HALO,
) -> list[tuple[Any, str]]:
    """The analysed area's outline and, dashed in the tumor outline's ``line`` and ``halo``, the
    hot pieces under the minimum area (draw the tumor regions after); their legend entries."""
    from matplotlib.lines import Line2D

    if grid is None:
        return []
    legend: list[tuple[Any, str]] = []
    area = analysed_area(grid)
    if not area.is_empty:
        draw_rings(ax, area, ds, **ANALYSED_STYLE)
        legend.append((Line2D([], [], **ANALYSED_STYLE), ANALYSED_LABEL))
    uncounted = uncounted_hot_regions(grid, tumor)
    if not uncounted.is_empty:
        draw_tumor_outline(ax, uncounted, ds, dashed=True, line=line, halo=halo)
        legend.append((outline_handle(line, halo, dashed=True), uncounted_label(grid.threshold, grid.min_area_mm2)))
    return legend


def scale_bar(ax, width_l0: float, height_l0: float, um_per_px: float) -> None:
    """A round-length scale bar (about a fifth of the width) in the lower-left corner; the axes
    are in units of ``um_per_px`` µm."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    width_mm = width_l0 * um_per_px / 1000.0
    nice = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50]
    length_mm = max([v for v in nice if v <= width_mm / 5] or [nice[0]])
    label = f"{length_mm:g} mm" if length_mm >= 1 else f"{length_mm * 1000:g} µm"
    bar = AnchoredSizeBar(
        ax.transData, length_mm * 1000.0 / um_per_px, label, "lower left",
        pad=0.4, color="black", frameon=True, size_vertical=max(height_l0 / 150, 1e-9), fontproperties={"size": 8},
    )
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)


def legend_below(fig, entries: list[tuple[Any, str]], fontsize: float = 8) -> None:
    """The figure's legend under the image (the layout makes room for it), never over the tissue."""
    if not entries:
        return
    handles, labels = zip(*entries, strict=True)
    fig.legend(
        list(handles), list(labels), loc="outside lower center", ncols=min(len(entries), 3), fontsize=fontsize,
        handlelength=2.6, facecolor="#d9d9d9", edgecolor="none", framealpha=1.0,
    )


def heatmap_figure(
    background: Background,
    grid: HeatmapGrid,
    tumor: MultiPolygon,
    slide_mpp: float | None = None,
    title: str = "",
):
    """heatmap.png's figure: the heatmap over the background (cells never analysed left clear),
    the analysed area's outline, tumor regions, hot pieces under the minimum area, a scale bar,
    a legend under the image and the colour bar with the threshold marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    width_l0, height_l0 = grid.bounds or background.extent_l0[1:3]
    cmap, norm = heatmap_cmap(), Normalize(0.0, 1.0)
    # ~88% of the width is image (the rest colour bar); + room for the title and the legend.
    # Clamped so a very long or very tall slide still gives a readable page.
    width_in = 10.0
    height_in = min(max(width_in * 0.88 * height_l0 / max(width_l0, 1.0) + 0.8, 3.4), 14.0)
    fig = Figure(figsize=(width_in, height_in), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    legend = draw_analysis(ax, grid, tumor)
    if not tumor.is_empty:
        draw_tumor_outline(ax, tumor)
        legend.insert(0, (outline_handle(), tumor_label(grid.threshold, grid.min_area_mm2)))
    ax.set_xlim(0, width_l0)
    ax.set_ylim(height_l0, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    legend_below(fig, legend)
    if slide_mpp:
        scale_bar(ax, width_l0, height_l0, slide_mpp)
    # A colour bar of the opaque colormap: the overlay's blend depends on the tissue under it.
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("tumor probability (no colour: not analysed)")
    cbar.ax.axhline(grid.threshold, color="white", linewidth=2.5)
    cbar.ax.axhline(grid.threshold, color="black", linewidth=1.0)
    draw_background(fig, ax, background, grid)
    return fig


def fit_background(background: Background, width_px: int, height_px: int) -> np.ndarray:
    """``background`` resampled to ``width_px x height_px``: area average down, Lanczos up, after
    an integer reduce that bounds what PIL holds whatever the input's size."""
    from PIL import Image

    rgb = display_image(background.rgb)
    if rgb.shape[:2] == (height_px, width_px):
        return rgb
    method = Image.Resampling.BOX if width_px <= rgb.shape[1] else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width_px, height_px), method))


def composite_heatmap(rgb: np.ndarray, extent_l0: tuple[float, float, float, float], grid: HeatmapGrid) -> np.ndarray:
    """The heatmap's colours blended over ``rgb`` (which covers level-0 ``extent_l0``) at
    :data:`HEATMAP_ALPHA`, each pixel taking the cell under its centre; cells never analysed
    (NaN) and pixels off the grid are left as they are."""
    from matplotlib.colors import Normalize

    h, w = rgb.shape[:2]
    left, right, bottom, top = extent_l0
    (ox, oy), s = grid.origin_l0, grid.cell_l0

    def cells(n: int, start: float, stop: float, origin: float, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        centre = start + (np.arange(n) + 0.5) * (stop - start) / n
        idx = np.floor((centre - origin) / s).astype(np.int64)
        return np.clip(idx, 0, n_cells - 1), (idx >= 0) & (idx < n_cells)

    rows, rows_in = cells(h, top, bottom, oy, grid.values.shape[0])
    cols, cols_in = cells(w, left, right, ox, grid.values.shape[1])
    # Colour each cell once, then look the cells up per pixel: no per-pixel colour mapping.
    rgba = heatmap_cmap()(Normalize(0.0, 1.0)(np.ma.masked_invalid(grid.values)), bytes=True)
    per_px = rgba[np.ix_(rows, cols)]
    alpha = (per_px[..., 3:4] / np.float32(255.0)) * np.float32(HEATMAP_ALPHA)
    alpha[~rows_in] = 0.0
    alpha[:, ~cols_in] = 0.0
    out = rgb.astype(np.float32) * (1.0 - alpha) + per_px[..., :3].astype(np.float32) * alpha
    return np.round(out).astype(np.uint8)


def draw_background(fig, ax, background: Background, heatmap: HeatmapGrid | None = None) -> np.ndarray:
    """Draw ``background`` (with ``heatmap``'s colours blended in, when given) under everything on
    ``ax`` at the pixel size the axes show it; returns the array drawn.

    Call it last, once every artist that takes room (title, legend, colour bar) is in place and
    the limits are set: the layout is computed first, then the background is resampled once with
    PIL to the axes' pixels, the heatmap blended in with numpy, and the result drawn 1:1. That is
    sharper and several times faster than matplotlib's own resampling of a photograph and of a
    float heatmap to the page."""
    layout = fig.get_layout_engine()
    if layout is not None:
        layout.execute(fig)
    ax.apply_aspect()
    box = ax.get_window_extent()
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    left, right, bottom, top = background.extent_l0
    # Pixels the whole background spans on the page (it may reach past the limits).
    want_w = max(1, round(box.width * (right - left) / max(x1 - x0, 1e-9)))
    want_h = max(1, round(box.height * (bottom - top) / max(y1 - y0, 1e-9)))
    rgb = fit_background(background, want_w, want_h)
    if heatmap is not None:
        rgb = composite_heatmap(rgb, background.extent_l0, heatmap)
    ax.imshow(rgb, extent=background.extent_l0, interpolation="nearest", zorder=-1)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    return rgb


def legend_labels(fig) -> list[str]:
    """The texts of a figure's legends (for tests and checks)."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def _figure_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


def figure_png(fig) -> bytes:
    """The figure as an RGB PNG (a third smaller and faster to encode than matplotlib's RGBA)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_figure_rgb(fig)).save(buf, format="PNG", dpi=(fig.dpi, fig.dpi))
    return buf.getvalue()


def figure_jpeg(fig, quality: int = 90) -> bytes:
    """The figure as a JPEG: for a page that embeds it (a photograph-like figure is a quarter of its PNG)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_figure_rgb(fig)).save(buf, format="JPEG", quality=quality, dpi=(fig.dpi, fig.dpi))
    return buf.getvalue()
