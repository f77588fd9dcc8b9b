"""The slide figures, heatmap.png and the report's overview, on the real CMU-1 crop: the background
is read from the slide at the size it is shown (not the store's 139 x 186 thumbnail upsampled),
analysed negative tissue is coloured apart from H&E and from tissue never analysed, the analysed
area is outlined, and the legends state the minimum tumor area and mark the hot cells under it.

Probabilities are planted (low everywhere, a 3 x 3 block hot, one hot cell alone) so where each
kind of cell lies is known; the PNGs are checked pixel by pixel, the report in headless Chromium."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
from PIL import Image

from test_report import probe, screenshot
from wsipipe.config import load_config
from wsipipe.geojson import read_geojson
from wsipipe.outputs.figures import (
    ANALYSED_LABEL, ANALYSED_STYLE, HeatmapGrid, analysed_area, figure_png, fit_background, heatmap_figure, legend_labels,
    read_background, saved_heatmap, tumor_label, uncounted_hot_regions, uncounted_label,
)
from wsipipe.outputs.report import overview_plot, write_slide_report
from wsipipe.outputs.stitch import stitch_store, tumor_mask, tumor_polygons
from wsipipe.outputs.summary import load_summary
from wsipipe.tiles import store
from wsipipe.tiles.tiling import tile_slide

HOT_BLOCK = [(i, j) for i in range(9, 12) for j in range(3, 6)]  # 9 cells of (112 µm)²: 0.11 mm², counted
HOT_ALONE = (4, 6)  # one cell, 0.0125 mm²: under the default 0.05 mm², not a tumor region
LOW = 0.05


@pytest.fixture(scope="module")
def cmu1(tmp_path_factory, slides_dir):
    """CMU-1 tiled for real, probabilities planted, stitched: the slide folder and its parts."""
    out = tmp_path_factory.mktemp("figures") / "cmu1"
    cfg = load_config(None, {})
    store_path = out / "patches.zarr"
    tile_slide(slides_dir / "cmu-1-small-region.svs", store_path, cfg)
    group = store.open_store(store_path, mode="r+")
    cells = [tuple(c) for c in group["grid_ij"][:].tolist()]
    assert set(HOT_BLOCK) | {HOT_ALONE} <= set(cells)  # all analysed (tissue under them)
    probs = np.array([0.9 if c in HOT_BLOCK else 0.7 if c == HOT_ALONE else LOW for c in cells], np.float32)
    group.create_array("probabilities", data=probs, chunks=(len(probs),))
    store.set_stage(group, "infer", {"tile": "t", "model": "planted", "config": "c"}, True, seconds=0.0,
                    model={"sha256": "planted", "arch": "resnet18"})
    stitch_store(store_path, out, cfg.stitch)
    meta = store.meta(group)
    summary = load_summary(out / "summary.json")
    return {
        "out": out, "group": group, "slide": meta["slide"], "tile": meta["tile"], "summary": summary,
        "thumbnail": np.asarray(group["thumbnail"][...]), "grid": saved_heatmap(out, summary),
        "tumor": read_geojson(out / "tumor.geojson")["Tumor"],
    }


def _background(cmu1):
    return read_background(cmu1["thumbnail"], cmu1["tile"]["thumb_downsample"], cmu1["slide"], cmu1["tile"])


def _high_frequency(rgb: np.ndarray) -> float:
    """Mean absolute difference between neighbouring grey levels: detail, not colour."""
    grey = rgb.astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def _pixels(fig, rgb: np.ndarray, xy_l0: np.ndarray) -> np.ndarray:
    """The figure's rendered pixels (rows, cols) at level-0 points of its image axes."""
    ax = fig.axes[0]
    disp = ax.transData.transform(np.asarray(xy_l0, dtype=float))
    cols = np.clip(np.floor(disp[:, 0]).astype(int), 0, rgb.shape[1] - 1)
    rows = np.clip(np.floor(rgb.shape[0] - disp[:, 1]).astype(int), 0, rgb.shape[0] - 1)
    return np.stack([rows, cols], axis=1)


def _cell_centres(cmu1, analysed: bool, below: float = 0.2) -> np.ndarray:
    """Level-0 points over tissue (the store's tissue mask), away from cell edges, in cells that
    were analysed with p < ``below`` (``analysed``) or never analysed."""
    grid, mask = cmu1["grid"], np.asarray(cmu1["group"]["tissue_mask"][...])
    ds = cmu1["tile"]["thumb_downsample"]
    rows, cols = np.nonzero(mask)
    x, y = (cols + 0.5) * ds, (rows + 0.5) * ds
    s, (ox, oy) = grid.cell_l0, grid.origin_l0
    i, j = np.floor((y - oy) / s).astype(int), np.floor((x - ox) / s).astype(int)
    inside = (i >= 0) & (j >= 0) & (i < grid.values.shape[0]) & (j < grid.values.shape[1])
    fx, fy = ((x - ox) / s) % 1.0, ((y - oy) / s) % 1.0
    central = (fx > 0.2) & (fx < 0.8) & (fy > 0.2) & (fy < 0.8)  # outlines run along cell edges
    value = np.full(len(x), np.nan)
    value[inside] = grid.values[i[inside], j[inside]]
    keep = central & (value < below if analysed else np.isnan(value))
    return np.stack([x[keep], y[keep]], axis=1)


# --------------------------------------------------------------------------- pure parts


def test_uncounted_hot_pieces_analysed_area_and_labels():
    values = np.full((6, 8), 0.1, np.float32)
    values[:, 0] = np.nan  # a column never analysed
    values[1:4, 2:5] = 0.9  # 9 hot cells: a tumor region
    values[5, 7] = 0.8  # one hot cell: under the minimum
    values[0, 7] = np.nan
    grid = HeatmapGrid(values, 100.0, (50.0, 0.0), 0.5, 0.05, bounds=(830.0, 600.0))
    mask = tumor_mask(values, 0.5, min_area_cells=5, fill_holes_cells=5)
    tumor = tumor_polygons(mask, 100.0, (50.0, 0.0), bounds=(830.0, 600.0))
    assert len(tumor.geoms) == 1
    alone = uncounted_hot_regions(grid, tumor)
    assert len(alone.geoms) == 1 and alone.geoms[0].bounds == (750.0, 500.0, 830.0, 600.0)  # clipped to the slide
    area = analysed_area(grid)
    assert area.area == pytest.approx(6 * 6 * 100.0**2 + 5 * 80.0 * 100.0)  # the last column reaches 20 px past the edge
    assert uncounted_hot_regions(grid, tumor_polygons(np.zeros_like(mask), 100.0)).area == pytest.approx(9e4 + 8e3)
    assert tumor_label(0.5, 0.05) == "tumor region (p ≥ 0.50, ≥ 0.05 mm²)"
    assert tumor_label(0.35, 0.0) == "tumor region (p ≥ 0.35)"
    assert uncounted_label(0.125, 0.25) == "p ≥ 0.125 under 0.25 mm² (not counted)"


# --------------------------------------------------------------------------- heatmap.png on CMU-1


def test_background_is_read_from_the_slide_at_the_shown_size(cmu1):
    thumb = cmu1["thumbnail"]
    assert max(thumb.shape[:2]) == 186  # the store's: 16 level-0 px per pixel
    bg = _background(cmu1)
    assert bg.source == "slide" and bg.downsample == 2.0 and bg.rgb.shape[:2] == (1484, 1110)
    # Not an upsample of the thumbnail: the same size made from the thumbnail has far less detail.
    upsampled = np.asarray(Image.fromarray(thumb).resize(bg.rgb.shape[1::-1], Image.Resampling.LANCZOS))
    assert _high_frequency(bg.rgb) > 3 * _high_frequency(upsampled)
    # What heatmap.png draws is that background at the figure's pixels (> 1 000 px on its long side).
    fig = heatmap_figure(bg, cmu1["grid"], cmu1["tumor"], cmu1["slide"]["mpp"], "cmu-1")
    drawn = next(im for im in fig.axes[0].get_images() if im.get_zorder() == -1).get_array()
    assert max(drawn.shape[:2]) >= 1000
    shown = fit_background(bg, drawn.shape[1], drawn.shape[0])  # the drawn image before the heatmap's colours
    assert _high_frequency(shown) > 2.5 * _high_frequency(upsampled)
    with Image.open(cmu1["out"] / "heatmap.png") as png:
        assert png.size == (1500, round(fig.get_figheight() * 150))


def test_background_of_a_slide_without_file_mpp_is_read_from_the_slide(tmp_path, slides_dir, caplog):
    """The TCGA file states no resolution: tiled with --mpp-default, its figures still read the slide."""
    path = tmp_path / "tcga.zarr"
    tile_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", path,
               load_config(None, {"mpp_default": 0.25, "tile.mpp": 2.0, "tile.patch_size": 64}))
    group = store.open_store(path)
    meta = store.meta(group)
    with caplog.at_level(logging.WARNING, logger="wsipipe.outputs.figures"):
        bg = read_background(np.asarray(group["thumbnail"][...]), meta["tile"]["thumb_downsample"], meta["slide"], meta["tile"])
    assert bg.source == "slide" and max(bg.rgb.shape[:2]) > 1000, caplog.text
    assert "cannot read the slide" not in caplog.text


def test_heatmap_png_tells_analysed_negative_from_unanalysed_tissue(cmu1, tmp_path):
    grid, tumor = cmu1["grid"], cmu1["tumor"]
    bg = _background(cmu1)
    fig = heatmap_figure(bg, grid, tumor, cmu1["slide"]["mpp"], "cmu-1")
    png = figure_png(fig)
    (tmp_path / "heatmap.png").write_bytes(png)
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)
    drawn = next(im for im in fig.axes[0].get_images() if im.get_zorder() == -1)
    shape = drawn.get_array().shape
    under = fit_background(bg, shape[1], shape[0]).astype(np.int32)  # the background under the colours, same pixels

    def local_mean(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """5 x 5 means: a pixel's neighbourhood, robust to a one-pixel difference in placement."""
        pad = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
        return np.mean([pad[rows + dr, cols + dc] for dr in range(5) for dc in range(5)], axis=0)

    def colours(xy):
        px = _pixels(fig, rgb, xy)
        _, right, bottom, _ = drawn.get_extent()
        bj = np.clip((xy[:, 0] / right * under.shape[1]).astype(int), 0, under.shape[1] - 1)
        bi = np.clip((xy[:, 1] / bottom * under.shape[0]).astype(int), 0, under.shape[0] - 1)
        return local_mean(rgb, px[:, 0], px[:, 1]), local_mean(under, bi, bj)

    negative, neg_bg = colours(_cell_centres(cmu1, analysed=True))
    never, never_bg = colours(_cell_centres(cmu1, analysed=False))
    assert len(negative) > 500 and len(never) > 20
    # Tissue never analysed is shown as it is: H&E (red over green), no colour on it.
    assert np.abs(never - never_bg).mean() < 6
    assert np.median(never[:, 0] - never[:, 1]) > 20
    # Analysed negative tissue has a cyan cast H&E never has (green over red), far from bare H&E.
    assert np.median(negative[:, 1] - negative[:, 0]) > 15
    assert np.linalg.norm(negative - neg_bg, axis=1).mean() > 50
    apart = np.linalg.norm(negative.mean(axis=0) - never.mean(axis=0))
    print(f"analysed negative {negative.mean(axis=0).round()} vs never analysed {never.mean(axis=0).round()}: "
          f"{apart:.0f} apart; colour over the background {np.linalg.norm(negative - neg_bg, axis=1).mean():.0f}, "
          f"unanalysed vs background {np.abs(never - never_bg).mean():.1f}")
    assert apart > 45
    # The analysed area's outline is drawn in its neutral colour along the whole boundary.
    want = np.array(Image.new("RGB", (1, 1), ANALYSED_STYLE["color"]).getpixel((0, 0)))
    ring = analysed_area(grid).geoms[0].exterior
    points = np.array([ring.interpolate(d).coords[0] for d in np.linspace(0, ring.length, 400, endpoint=False)])
    found = 0
    for r, c in _pixels(fig, rgb, points):
        window = rgb[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3].reshape(-1, 3)
        found += int(np.linalg.norm(window - want, axis=1).min() < 30)
    assert found > 0.8 * len(points)
    # The legend: what a tumor region is (threshold and minimum area), the analysed area, and the
    # hot cell under the minimum, dashed, with its own entry.
    assert legend_labels(fig) == [tumor_label(0.5, 0.05), ANALYSED_LABEL, uncounted_label(0.5, 0.05)]
    assert tumor_label(0.5, 0.05) == "tumor region (p ≥ 0.50, ≥ 0.05 mm²)"
    alone = uncounted_hot_regions(grid, tumor)
    s, (ox, oy) = grid.cell_l0, grid.origin_l0
    assert [g.bounds for g in alone.geoms] == [(ox + 6 * s, oy + 4 * s, ox + 7 * s, oy + 5 * s)]
    # The 3 x 3 block, clipped to the tissue (less the glass of a cleft it touches).
    assert len(tumor.geoms) == 1 and 0.85 * 9 * s * s < tumor.area <= 9 * s * s + 1e-6


def test_background_falls_back_to_the_store_thumbnail(cmu1, slides_dir, tmp_path, caplog):
    thumb, ds = cmu1["thumbnail"], cmu1["tile"]["thumb_downsample"]
    moved = {**cmu1["slide"], "path": str(tmp_path / "archive-moved" / "cmu-1-small-region.svs")}
    with caplog.at_level(logging.WARNING, logger="wsipipe.outputs.figures"):
        bg = read_background(thumb, ds, moved, cmu1["tile"])
    assert bg.source == "thumbnail" and bg.rgb is thumb or np.array_equal(bg.rgb, thumb)
    assert "slide file not found; figure background from the store's thumbnail" in caplog.text
    caplog.clear()
    replaced = {**cmu1["slide"], "path": str(slides_dir / "pathml-small_HE_levels.tiff")}  # another slide there now
    with caplog.at_level(logging.WARNING, logger="wsipipe.outputs.figures"):
        assert read_background(thumb, ds, replaced, cmu1["tile"]).source == "thumbnail"
    assert "not the slide that was tiled" in caplog.text
    # A big slide's store thumbnail is already at the figure's size: used as it is, no read.
    big = np.zeros((2048, 1500, 3), np.uint8)
    assert read_background(big, 64.0, moved, cmu1["tile"]).rgb is big


# --------------------------------------------------------------------------- the report's overview


@pytest.mark.slow  # starts Chromium
def test_report_overview_in_chromium(cmu1, tmp_path):
    out, grid = cmu1["out"], cmu1["grid"]
    fig = overview_plot(
        cmu1["thumbnail"], cmu1["tile"]["thumb_downsample"], store.meta(cmu1["group"])["tissue"]["polygon_wkt"],
        cmu1["tumor"], {}, cmu1["tile"]["patch_size_l0"], grid=grid, slide=cmu1["slide"], tile=cmu1["tile"],
    )
    assert legend_labels(fig) == [
        "tumor region, numbered (p ≥ 0.50, ≥ 0.05 mm²)", "tissue", ANALYSED_LABEL, uncounted_label(0.5, 0.05)
    ]
    drawn = next(im for im in fig.axes[0].get_images() if im.get_zorder() == -1).get_array()
    assert max(drawn.shape[:2]) >= 1000 * 0.88  # the overview's image is ~1 180 px tall on a 910 px page
    write_slide_report(out)
    # In the browser: the overview and the heatmap load at full size; the overview's dark neutral
    # pixels (the analysed-area outline: H&E is never grey-black) run along the boundary.
    page = probe(out / "report.html", tmp_path, """
      var img = document.getElementById("overview"), heat = document.getElementById("heatmap");
      var c = document.createElement("canvas"); c.width = img.naturalWidth; c.height = img.naturalHeight;
      var g = c.getContext("2d"); g.drawImage(img, 0, 0);
      var d = g.getImageData(0, 0, c.width, c.height).data, grey = 0;
      for (var k = 0; k < d.length; k += 4) {
        var r = d[k], gr = d[k + 1], b = d[k + 2];
        if (r > 30 && r < 90 && Math.abs(r - gr) < 14 && Math.abs(gr - b) < 14 && Math.abs(r - b) < 14) grey++;
      }
      return {w: img.naturalWidth, h: img.naturalHeight, heat: heat.naturalWidth, grey: grey,
              src: img.src.slice(0, 16)};
    """)
    assert page["src"] == "data:image/jpeg;" and page["w"] == 910 and page["heat"] == 1500
    ring_px = analysed_area(grid).length / (grid.bounds[1] / (page["h"] * 0.9))  # outline length in page px
    print(f"overview: {page}, analysed outline ~{math.floor(ring_px)} px")
    assert page["grey"] > 0.5 * ring_px, (page, math.floor(ring_px))
    screenshot(out / "report.html", tmp_path / "report-cmu1.png", tmp_path)
