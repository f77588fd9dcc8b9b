"""Stitching: heatmap arithmetic, tumor mask/polygons, slide score, and the store-level stage.

The store tests build a real Zarr group on disk the way the tiler and inference leave
it (arrays + attrs + stage entries), with a planted tumor whose level-0 rectangle is
known exactly.
"""

from __future__ import annotations

import io
import json
import math
import os
import tracemalloc

import numpy as np
import pytest
import zarr
from PIL import Image
from shapely.geometry import MultiPolygon, box

from wsipipe.tiles import store
from wsipipe.config import StitchConfig
from wsipipe.errors import NoTissueError, StoreError
from wsipipe.geojson import read_geojson
from wsipipe.geometry import rasterize
from wsipipe.outputs.stitch import (
    HeatmapAccumulator,
    ScoreAccumulator,
    cells_per_patch,
    display_image,
    grid_to_thumbnail,
    heatmap_shape,
    render_heatmap_png,
    slide_score,
    stitch_heatmap,
    stitch_store,
    tumor_mask,
    tumor_polygons,
)

# --------------------------------------------------------------------------- heatmap


def test_cells_per_patch_and_shape():
    assert cells_per_patch(224, 224) == 1
    assert cells_per_patch(224, 112) == 2
    assert cells_per_patch(224, 300) == 1
    assert heatmap_shape((4, 5), 1) == (4, 5)
    assert heatmap_shape((4, 5), 2) == (5, 6)


def test_heatmap_exact_averages_with_half_stride_overlap():
    # stride = patch/2: each patch covers 2x2 cells; a cell is the mean of the patches on it.
    grid_ij = np.array([[0, 0], [0, 1], [1, 0]])
    probs = np.array([0.2, 0.6, 1.0], dtype=np.float32)
    heat = stitch_heatmap(grid_ij, probs, (4, 5), cells_per_patch=2)
    nan = np.nan
    expected = np.array(
        [
            [0.2, 0.4, 0.6, nan, nan, nan],
            [0.6, 0.6, 0.6, nan, nan, nan],  # (1,1): mean of all three patches
            [1.0, 1.0, nan, nan, nan, nan],
            [nan] * 6,
            [nan] * 6,
        ],
        dtype=np.float32,
    )
    assert heat.dtype == np.float32 and heat.shape == (5, 6)
    np.testing.assert_allclose(heat, expected, rtol=0, atol=1e-6)
    assert np.array_equal(np.isnan(heat), np.isnan(expected))


def test_heatmap_without_overlap_is_the_probabilities_on_the_grid():
    grid_ij = np.array([[0, 2], [3, 1]])
    heat = stitch_heatmap(grid_ij, [0.25, 0.75], (4, 3))
    assert heat[0, 2] == 0.25 and heat[3, 1] == 0.75
    assert np.isnan(heat).sum() == 12 - 2


def test_last_patches_reach_past_the_grid_rows():
    # The last grid row's patch covers cells rows..rows+r-1: nothing it saw is dropped.
    heat = stitch_heatmap(np.array([[2, 3]]), [0.5], (3, 4), cells_per_patch=3)
    assert heat.shape == (5, 6)
    assert np.all(heat[2:5, 3:6] == 0.5)


def test_chunked_accumulation_equals_one_shot():
    rng = np.random.default_rng(0)
    rows, cols = 30, 40
    cells = np.argwhere(rng.random((rows, cols)) < 0.6)
    probs = rng.random(len(cells)).astype(np.float32)
    one_shot = stitch_heatmap(cells, probs, (rows, cols), cells_per_patch=2)
    acc = HeatmapAccumulator((rows, cols), cells_per_patch=2)
    edges = np.sort(rng.choice(np.arange(1, len(cells)), size=9, replace=False))
    for ij, p in zip(np.split(cells, edges), np.split(probs, edges), strict=True):
        acc.add(ij, p)
    acc.add(np.empty((0, 2), dtype=np.int32), np.empty(0, dtype=np.float32))
    # Same cells, same values; only the float32 summation order within a cell differs.
    np.testing.assert_allclose(acc.result(), one_shot, rtol=0, atol=1e-6, equal_nan=True)


def test_accumulator_rejects_cells_outside_the_grid():
    acc = HeatmapAccumulator((3, 3))
    with pytest.raises(ValueError, match="outside the grid"):
        acc.add([[3, 0]], [0.5])
    with pytest.raises(ValueError, match="outside the grid"):
        acc.add([[0, -1]], [0.5])
    with pytest.raises(ValueError, match="probabilities"):
        acc.add([[0, 0], [1, 1]], [0.5])


def test_accumulator_memory_is_grid_sized_over_two_million_patches():
    """Stream 2M patches (generated chunk by chunk, never all at once) into a 1000x1000 grid.

    Structural, not a benchmark: the accumulator holds exactly two grid-sized arrays, and
    the traced peak stays far below what materialising the patches would take (24 MB for
    2M int32 (row, col) pairs + float32 probabilities)."""
    rows, cols, n, chunk = 1000, 1000, 2_000_000, 1 << 16
    acc = HeatmapAccumulator((rows, cols))
    rng = np.random.default_rng(1)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            ij = np.stack([rng.integers(0, rows, m, dtype=np.int32), rng.integers(0, cols, m, dtype=np.int32)], 1)
            acc.add(ij, rng.random(m, dtype=np.float32))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert acc.total.shape == acc.count.shape == (rows, cols)
    assert acc.total.nbytes == rows * cols * 4 and acc.count.nbytes == rows * cols * 2
    assert int(acc.count.sum(dtype=np.int64)) == n
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB while streaming"
    heat = acc.result()
    assert heat.shape == (rows, cols) and np.nanmax(heat) <= 1.0


# --------------------------------------------------------------------------- mask, polygons


def _planted_heatmap():
    heat = np.full((20, 30), np.nan, dtype=np.float32)
    heat[2:18, 2:28] = 0.1  # tissue
    heat[4:9, 5:12] = 0.9  # tumor block: rows 4..8, cols 5..11 (35 cells)
    heat[14, 20] = 0.95  # one-cell speck
    heat[15:17, 24:26] = 0.7  # 4-cell speck
    return heat


def test_tumor_mask_threshold_and_nan_is_not_tumor():
    heat = _planted_heatmap()
    mask = tumor_mask(heat, 0.5)
    assert mask.dtype == bool and mask.sum() == 35 + 1 + 4
    assert not tumor_mask(heat, 0.0)[0, 0]  # NaN never passes, even at threshold 0
    assert tumor_mask(heat, 0.0)[2:18, 2:28].all()


def test_tumor_mask_drops_specks_below_min_area_and_fills_small_holes():
    heat = _planted_heatmap()
    mask = tumor_mask(heat, 0.5, min_area_cells=5)
    expected = np.zeros_like(mask)
    expected[4:9, 5:12] = True
    assert np.array_equal(mask, expected)
    assert tumor_mask(heat, 0.5, min_area_cells=4).sum() == 35 + 4  # exactly min area: kept
    holed = heat.copy()
    holed[6, 8] = 0.2
    assert not tumor_mask(holed, 0.5, min_area_cells=5)[6, 8]
    assert tumor_mask(holed, 0.5, min_area_cells=5, fill_holes_cells=2)[6, 8]


def test_tumor_polygon_is_the_blocks_level0_rectangle():
    mask = tumor_mask(_planted_heatmap(), 0.5, min_area_cells=5)
    stride_l0, origin = 448.0, (100.0, 50.0)
    polys = tumor_polygons(mask, stride_l0, origin)
    block = box(100 + 5 * 448, 50 + 4 * 448, 100 + 12 * 448, 50 + 9 * 448)
    assert len(polys.geoms) == 1
    assert polys.geoms[0].equals(block)
    assert polys.area == pytest.approx(7 * 5 * 448**2)
    # Without cleanup the specks come out as their own regions.
    assert len(tumor_polygons(tumor_mask(_planted_heatmap(), 0.5), stride_l0, origin).geoms) == 3


def test_tumor_polygons_clip_to_slide_bounds():
    mask = np.zeros((3, 3), dtype=bool)
    mask[2, 2] = True  # last cell runs past a 250 x 250 slide
    polys = tumor_polygons(mask, 100.0, bounds=(250, 250))
    assert polys.equals(box(200, 200, 250, 250))
    assert tumor_polygons(np.zeros((3, 3), bool), 100.0, bounds=(250, 250)).is_empty


def test_grid_to_thumbnail_aligns_cells_with_pixels():
    grid = np.zeros((4, 4), dtype=bool)
    grid[1, 2] = True  # level-0 x [200, 300), y [100, 200) with 100-px cells
    thumb = grid_to_thumbnail(grid, (40, 50), 10.0, 100.0, fill=False)
    assert thumb.shape == (40, 50)
    assert np.array_equal(thumb, rasterize(box(200, 100, 300, 200), (40, 50), scale=10.0))
    assert not thumb[:, 40:].any()  # pixels past the grid get the fill


# --------------------------------------------------------------------------- slide score


def test_slide_score_values():
    s = slide_score(np.array([0.1, 0.9, 0.5, 0.7], dtype=np.float32), top_k=2)
    assert s["n"] == 4 and s["k"] == 2
    assert s["max"] == pytest.approx(0.9)
    assert s["top_k_mean"] == pytest.approx(0.8)
    assert s["mean"] == pytest.approx(0.55)
    assert slide_score(np.array([0.3, 0.6]), top_k=10)["top_k_mean"] == pytest.approx(0.45)  # k = n


def test_slide_score_empty_is_none_not_zero():
    s = slide_score(np.array([], dtype=np.float32), top_k=5)
    assert s == {"n": 0, "k": 0, "max": None, "top_k_mean": None, "mean": None}


def test_slide_score_streaming_equals_one_shot():
    p = np.random.default_rng(2).random(1000).astype(np.float32)
    acc = ScoreAccumulator(top_k=25)
    for part in np.array_split(p, 7):
        acc.add(part)
    assert acc.result() == pytest.approx(slide_score(p, 25))
    with pytest.raises(ValueError):
        slide_score(p.reshape(10, 100), 5)


# --------------------------------------------------------------------------- store level

SLIDE_W, SLIDE_H, MPP, THUMB_DS = 4000, 3000, 0.5, 16.0
PATCH, STRIDE = 200, 100  # half-stride: 2x2 cells per patch; level-0 == target mpp here
ROWS = math.ceil((SLIDE_H - PATCH) / STRIDE) + 1
COLS = math.ceil((SLIDE_W - PATCH) / STRIDE) + 1
# High-probability patches at top-left cells rows 10..15, cols 12..19. With 2x2 averaging the
# cells covered only by them are rows 11..15, cols 13..19 (edge cells average 0.45 < 0.5):
TUMOR_L0 = box(13 * STRIDE, 11 * STRIDE, 20 * STRIDE, 16 * STRIDE)  # 700 x 500 px = 0.0875 mm²


def _tissue_cells() -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    inside = ((ii - 14) / 11.0) ** 2 + ((jj - 19) / 16.0) ** 2 <= 1.0
    return np.argwhere(inside).astype(np.int32)  # row-major, as the tiler writes them


def _probs(grid_ij: np.ndarray) -> np.ndarray:
    i, j = grid_ij[:, 0], grid_ij[:, 1]
    p = np.full(len(grid_ij), 0.1, dtype=np.float32)
    p[(i >= 10) & (i <= 15) & (j >= 12) & (j <= 19)] = 0.8
    p[(i >= 20) & (i <= 21) & (j >= 25) & (j <= 26)] = 0.8  # 2x2 patches -> a 1-cell speck
    return p


def _thumbnail() -> np.ndarray:
    th, tw = math.ceil(SLIDE_H / THUMB_DS), math.ceil(SLIDE_W / THUMB_DS)
    img = np.full((th, tw, 3), 242, dtype=np.uint8)
    yy, xx = np.mgrid[0:th, 0:tw]
    x0, y0 = (xx + 0.5) * THUMB_DS, (yy + 0.5) * THUMB_DS  # level-0 pixel centres
    tissue = ((y0 - 1500) / 1150) ** 2 + ((x0 - 2000) / 1650) ** 2 <= 1
    img[tissue] = (226, 160, 200)  # eosin pink
    tumor = rasterize(TUMOR_L0, (th, tw), scale=THUMB_DS)
    img[tumor] = (120, 60, 150)  # dense haematoxylin purple
    return img


def build_store(path, probs=None, chunk=7, infer=True, grid_ij=None):
    grid_ij = _tissue_cells() if grid_ij is None else grid_ij
    n = len(grid_ij)
    probs = _probs(grid_ij) if probs is None else probs
    group = zarr.open_group(str(path), mode="w")
    group.create_array("coords", data=(grid_ij[:, ::-1] * STRIDE).astype(np.int64).reshape(n, 2), chunks=(chunk, 2))
    group.create_array("grid_ij", data=grid_ij, chunks=(chunk, 2))
    group.create_array("tissue_fraction", data=np.ones(n, dtype=np.float32), chunks=(chunk,))
    thumb = _thumbnail()
    group.create_array("thumbnail", data=thumb, chunks=thumb.shape)
    group.create_array("tissue_mask", data=thumb[..., 0] < 240, chunks=thumb.shape[:2])
    store.update_meta(
        group,
        version="test",
        slide={"path": "/data/case-1.svs", "name": "case-1.svs", "identity": "slide-abc",
               "width": SLIDE_W, "height": SLIDE_H, "mpp": MPP},
        tile={"mpp": MPP, "patch_size": PATCH, "stride": STRIDE, "patch_size_l0": float(PATCH),
              "stride_l0": float(STRIDE), "grid_shape": [ROWS, COLS], "origin_l0": [0, 0],
              "thumb_downsample": THUMB_DS, "slide_mpp": MPP},
    )
    store.set_stage(group, "tile", {"slide": "slide-abc", "config": "cfg-tile-1"}, True, seconds=1.5)
    if infer:
        group.create_array("probabilities", data=probs, chunks=(chunk,) + probs.shape[1:])
        store.set_stage(
            group, "infer", {"tile": "cfg-tile-1", "model": "sha-xyz", "config": "cfg-inf-1"}, True,
            seconds=2.5, model={"sha256": "sha-xyz", "arch": "resnet18"},
        )
    return path


def test_stitch_store_end_to_end(tmp_path):
    store_path = build_store(tmp_path / "case.zarr")
    out = tmp_path / "out"
    calls = []
    cfg = StitchConfig(threshold=0.5, min_tumor_area_um2=50_000, top_k=10)
    summary = stitch_store(store_path, out, cfg, progress=lambda d, t: calls.append((d, t)), chunk_patches=10)

    n = len(_tissue_cells())
    # Read in the store's own 7-patch chunks, never all at once.
    assert len(calls) == math.ceil(n / 7) and calls[-1] == (n, n)
    for name in summary["files"].values():
        assert (out / name).is_file()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]

    heat = np.load(out / "heatmap.npy")
    assert heat.dtype == np.float32 and heat.shape == (ROWS + 1, COLS + 1)
    one_shot = stitch_heatmap(_tissue_cells(), _probs(_tissue_cells()), (ROWS, COLS), 2)
    np.testing.assert_allclose(heat, one_shot, rtol=0, atol=1e-6, equal_nan=True)
    assert np.isnan(heat[0, 0])  # glass corner: no patch

    regions = read_geojson(out / "tumor.geojson")
    assert set(regions) == {"Tumor"}
    assert regions["Tumor"].equals(TUMOR_L0)  # the speck (1 cell = 2500 µm²) was dropped
    raw = json.loads((out / "tumor.geojson").read_text())
    props = raw["features"][0]["properties"]
    assert props["objectType"] == "annotation" and props["classification"]["name"] == "Tumor"
    assert props["metadata"]["model_sha256"] == "sha-xyz"

    th, tw = _thumbnail().shape[:2]
    with Image.open(out / "tumor_mask.png") as im:
        assert im.size == (tw, th) and im.mode == "L"
        mask_px = np.asarray(im) == 255
    assert np.array_equal(mask_px, rasterize(TUMOR_L0, (th, tw), scale=THUMB_DS))
    with Image.open(out / "heatmap.png") as im:
        im.load()
        assert im.format == "PNG" and im.width == 1500 and 400 < im.height < 2100

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    area_mm2 = TUMOR_L0.area * MPP**2 / 1e6
    assert summary["tumor_area_mm2"] == pytest.approx(area_mm2)
    assert summary["tumor_area_mm2"] == pytest.approx(regions["Tumor"].area * MPP**2 / 1e6)
    assert summary["n_tumor_regions"] == 1
    assert summary["n_patches"] == n
    assert summary["n_tumor_patches"] == 6 * 8 + 4
    assert summary["slide_score"]["max"] == pytest.approx(0.8)
    assert summary["slide_score"]["top_k_mean"] == pytest.approx(0.8)
    assert summary["decision"] == "tumor"
    assert summary["slide"]["identity"] == "slide-abc" and summary["slide"]["mpp"] == MPP
    assert summary["provenance"]["model"]["sha256"] == "sha-xyz"
    assert summary["provenance"]["config_hash"]["tile"] == "cfg-tile-1"
    assert summary["provenance"]["config_hash"]["infer"] == "cfg-inf-1"
    assert summary["version"]
    assert summary["seconds"]["tile"] == 1.5 and summary["seconds"]["infer"] == 2.5
    assert summary["seconds"]["stitch"] >= 0
    assert summary["heatmap"]["min_tumor_area_cells"] == 20  # 50 000 µm² / (50 µm)²

    group = store.open_store(store_path)
    assert store.is_complete(group, "stitch", {"infer": store.stage_entry(group, "infer")["identity"],
                                               "stitch_config": cfg.model_dump(mode="json")})


def test_stitch_store_rerun_is_a_noop_and_new_settings_recompute(tmp_path):
    store_path = build_store(tmp_path / "case.zarr")
    out = tmp_path / "out"
    cfg = StitchConfig()
    first = stitch_store(store_path, out, cfg)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = []
    again = stitch_store(store_path, out, cfg, progress=lambda d, t: calls.append(d))
    assert again == first and not calls
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # A missing output is rebuilt; another threshold is a new identity.
    (out / "heatmap.png").unlink()
    stitch_store(store_path, out, cfg)
    assert (out / "heatmap.png").is_file()
    strict = stitch_store(store_path, out, StitchConfig(threshold=0.9))
    assert strict["decision"] == "normal" and strict["n_tumor_regions"] == 0 and strict["tumor_area_mm2"] == 0
    assert read_geojson(out / "tumor.geojson") == {}


def test_stitch_store_multiclass_uses_class_index(tmp_path):
    p = _probs(_tissue_cells())
    multi = np.stack([1 - p, np.zeros_like(p), p], axis=1)  # tumor is the last class
    store_path = build_store(tmp_path / "multi.zarr", probs=multi)
    summary = stitch_store(store_path, tmp_path / "out", StitchConfig(class_index=-1))
    assert summary["tumor_area_mm2"] == pytest.approx(TUMOR_L0.area * MPP**2 / 1e6)
    assert read_geojson(tmp_path / "out" / "tumor.geojson")["Tumor"].equals(TUMOR_L0)
    with pytest.raises(StoreError, match="class_index=5"):
        stitch_store(store_path, tmp_path / "out2", StitchConfig(class_index=5))


def test_stitch_store_requires_inference(tmp_path):
    store_path = build_store(tmp_path / "case.zarr", infer=False)
    with pytest.raises(StoreError, match="infer") as info:
        stitch_store(store_path, tmp_path / "out", StitchConfig())
    assert str(store_path) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_stitch_store_refuses_logits(tmp_path):
    logits = _probs(_tissue_cells()) * 8 - 4
    store_path = build_store(tmp_path / "case.zarr", probs=logits)
    with pytest.raises(StoreError, match="logits"):
        stitch_store(store_path, tmp_path / "out", StitchConfig())
    assert not (tmp_path / "out").exists()


def test_stitch_store_without_patches_reports_no_tissue(tmp_path):
    empty = np.empty((0, 2), dtype=np.int32)
    store_path = build_store(tmp_path / "glass.zarr", probs=np.empty(0, np.float32), grid_ij=empty)
    with pytest.raises(NoTissueError, match="no patches"):
        stitch_store(store_path, tmp_path / "out", StitchConfig())
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- rendering


def test_display_image_is_one_area_reduce_in_bounded_strips():
    rng = np.random.default_rng(4)
    for shape in [(6250, 4100, 3), (2049, 10, 3), (700, 900, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        factor = -(-max(shape[:2]) // 2048)
        want = np.asarray(Image.fromarray(rgb).reduce(factor)) if factor > 1 else rgb
        got = display_image(rgb)
        assert max(got.shape[:2]) <= 2048
        np.testing.assert_array_equal(got, want)


def test_heatmap_png_of_a_100k_slide_thumbnail_stays_small_in_memory():
    """A 100k² slide's 8 µm/px thumbnail is 6 250² px. Drawn whole, matplotlib resampled it in
    float RGBA: 2.1 GiB of numpy arrays (measured); drawn through display_image, a few MB."""
    thumb = np.full((6250, 6250, 3), 230, np.uint8)
    thumb[1000:5000, 1500:4500] = (180, 90, 160)
    heat = np.full((446, 446), np.nan, np.float32)
    heat[100:300, 120:350] = 0.3
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        png = render_heatmap_png(thumb, 16.0, heat, 224.0, (0.0, 0.0), MultiPolygon(), 0.5, 0.5, "big")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert Image.open(io.BytesIO(png)).size[0] == 1500  # the 10 in x 150 dpi figure
    assert peak < 300 << 20, f"traced peak {peak / 2**20:.0f} MiB while drawing"


# --------------------------------------------------------------------------- contracts: steps and summary.json


def test_stitch_steps_compose_to_the_driver(tmp_path):
    """read_inputs -> accumulate -> render are the driver's steps: the same heatmap and score."""
    from wsipipe.outputs.stitch import accumulate, read_inputs, render

    store_path = build_store(tmp_path / "case.zarr")
    cfg = StitchConfig(threshold=0.5, min_tumor_area_um2=50_000, top_k=10)
    group = store.open_store(store_path)
    inputs = read_inputs(group, store_path)
    assert inputs.n == len(_tissue_cells()) and inputs.grid_shape == (ROWS, COLS)
    assert inputs.bounds == (float(SLIDE_W), float(SLIDE_H)) and inputs.corrupt is None
    acc = accumulate(inputs, cfg, chunk_patches=10)
    expected = stitch_heatmap(_tissue_cells(), _probs(_tissue_cells()), (ROWS, COLS), cells_per_patch(PATCH, STRIDE))
    np.testing.assert_allclose(acc.heatmap, expected, rtol=1e-6)
    assert acc.scores == slide_score(_probs(_tissue_cells()), 10)
    rendered = render(inputs, acc, cfg, np.asarray(store.array(group, store.THUMBNAIL)[...]))
    assert rendered.decision == "tumor" and len(rendered.polygons.geoms) == 1

    summary = stitch_store(store_path, tmp_path / "out", cfg, chunk_patches=10)
    assert summary["n_patches"] == inputs.n and summary["n_tumor_regions"] == 1
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "heatmap.npy"), acc.heatmap)


def test_summary_json_round_trips_through_the_model(tmp_path):
    from wsipipe.outputs.summary import SlideSummary, load_summary, summary_json

    out = tmp_path / "out"
    summary = stitch_store(build_store(tmp_path / "case.zarr"), out, StitchConfig(threshold=0.5, top_k=10))
    text = (out / "summary.json").read_text()
    assert json.loads(text) == summary  # the returned dict is what the file holds
    model = load_summary(out)  # a folder or the file itself
    assert isinstance(model, SlideSummary) and load_summary(out / "summary.json") == model
    assert summary_json(model) == text  # same keys, order and values
    assert model.slide.identity == "slide-abc" and model.provenance.model.sha256 == "sha-xyz"
    assert model.slide_score.top_k_mean == pytest.approx(0.8) and model.decision == "tumor"
    # A section added later (ground truth) is kept, not dropped.
    extended = json.loads(text) | {"ground_truth": {"tumor_dice": 0.9}}
    (out / "summary.json").write_text(json.dumps(extended, indent=2))
    assert load_summary(out).as_dict()["ground_truth"] == {"tumor_dice": 0.9}


def test_load_summary_names_a_missing_or_broken_file(tmp_path):
    from wsipipe.outputs.summary import SummaryError, load_summary

    with pytest.raises(SummaryError, match="no summary.json") as missing:
        load_summary(tmp_path)
    assert isinstance(missing.value, StoreError) and missing.value.path == tmp_path / "summary.json"
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(SummaryError, match="not valid JSON"):
        load_summary(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"version": "1", "decision": "tumor"}))
    with pytest.raises(SummaryError, match="not a wsipipe summary"):
        load_summary(tmp_path / "summary.json")


def test_a_broken_summary_json_is_recomputed_not_returned(tmp_path):
    store_path = build_store(tmp_path / "case.zarr")
    out, cfg = tmp_path / "out", StitchConfig(threshold=0.5, top_k=10)
    first = stitch_store(store_path, out, cfg)
    (out / "summary.json").write_text("{}")
    again = stitch_store(store_path, out, cfg)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


# --------------------------------------------------------------------------- tumor ∩ tissue, decision, glass, scales


def test_top_k_scales_with_the_slide():
    from wsipipe.outputs.stitch import top_k_count

    assert [top_k_count(n, 10, 0.1) for n in (0, 1, 9, 14, 49, 100, 101, 10_000)] == [0, 1, 1, 2, 5, 10, 10, 10]
    assert top_k_count(14, 10) == 10 and top_k_count(4, 10) == 4  # without a fraction: min(top_k, n)
    p = np.array([0.994, 0.99] + [0.1] * 12, dtype=np.float32)  # 14 patches, two of them tumor
    assert slide_score(p, 10)["top_k_mean"] < 0.5  # the top-10 mean drowns them
    scaled = slide_score(p, 10, 0.1)
    assert scaled["k"] == 2 and scaled["top_k_mean"] == pytest.approx(0.992)
    acc = ScoreAccumulator(10, 0.1)
    for part in np.array_split(p, 5):
        acc.add(part)
    assert acc.result() == pytest.approx(scaled)


def test_decision_follows_regions_or_score_and_says_when_they_disagree():
    from wsipipe.outputs.stitch import decide

    assert decide([0.15, 0.02], 0.994, 0.81, 2, 0.5, 0.05) == (
        "tumor", "2 tumor regions (largest 0.15 mm², max p 0.994); top-2 mean 0.810 ≥ threshold 0.5", True)
    assert decide([], None, 0.2, 10, 0.5, 0.05) == (
        "normal", "no tumor region of at least 0.05 mm²; top-10 mean 0.200 < threshold 0.5", True)
    assert decide([0.15], 0.994, 0.3, 10, 0.5, 0.05)[::2] == ("tumor", False)  # regions, low score
    assert decide([], None, 0.7, 10, 0.5, 0.05)[::2] == ("tumor", False)  # score, specks only


def test_clip_regions_keeps_tissue_and_the_minimum_area_after_clipping():
    from wsipipe.outputs.stitch import clip_regions

    tissue = box(0, 0, 100, 100).difference(box(40, 0, 60, 100))  # a cleft splits the tissue in two
    region = MultiPolygon([box(20, 20, 80, 60)])  # 60 x 40 cells across the cleft
    clipped = clip_regions(region, tissue, min_area_px=1000)
    assert len(clipped.geoms) == 2 and clipped.area == pytest.approx(2 * 20 * 40)  # both sides, not the cleft
    assert clip_regions(region, tissue, min_area_px=2000).is_empty  # 1600 px² of tissue left: below the minimum
    assert clip_regions(region, None, min_area_px=2000).equals(region)
    edge = clip_regions(MultiPolygon([box(90, 20, 130, 60)]), tissue, min_area_px=100, sliver_px=500)
    assert edge.is_empty  # 10 x 40 left inside the tissue: under the sliver limit


@pytest.fixture(scope="module")
def cmu_1um(tmp_path_factory, slides_dir):
    """cmu-1-small-region.svs tiled for real at 1 µm/px: 14 patches of 224 µm."""
    from wsipipe.config import load_config
    from wsipipe.tiles.tiling import tile_slide

    path = tmp_path_factory.mktemp("cmu") / "cmu-1um.zarr"
    tile_slide(slides_dir / "cmu-1-small-region.svs", path, load_config(None, {"tile.mpp": 1.0}))
    return path


def _planted_cmu(src, dst, tumor_xy: dict[tuple[int, int], float], low: float = 0.05):
    """A copy of the tiled store with probabilities planted per level-0 patch corner."""
    import shutil

    shutil.copytree(src, dst)
    group = store.open_store(dst, mode="r+")
    xy = group["coords"][:]
    probs = np.array([tumor_xy.get((int(x), int(y)), low) for x, y in xy], dtype=np.float32)
    group.create_array("probabilities", data=probs, chunks=(64,))
    store.set_stage(group, "infer", {"tile": "t", "model": "m", "config": "c"}, True, seconds=1.0,
                    model={"sha256": "m", "arch": "resnet18"})
    return dst, group, xy


def test_tumor_regions_on_a_real_slide_exclude_glass_and_agree_everywhere(cmu_1um, tmp_path):
    """Four patches around the white cleft of CMU-1 planted as tumor: the regions, GeoJSON and
    mask cover the tissue, not the cleft, and carry their scale."""
    import shapely

    from wsipipe.outputs.qupath import validate_qupath_geojson
    from wsipipe.outputs.stitch import AREA_BASIS_TISSUE, PNG_DOWNSAMPLE_L0, PNG_ORIGIN_L0, PNG_UM_PER_PX

    block = {(x, y): 0.99 for x in (898, 1347) for y in (898, 1347)}
    path, group, xy = _planted_cmu(cmu_1um, tmp_path / "cmu.zarr", block)
    out = tmp_path / "out"
    summary = stitch_store(path, out, StitchConfig())
    meta = store.meta(group)
    s, mpp, ds = meta["tile"]["stride_l0"], meta["slide"]["mpp"], meta["tile"]["thumb_downsample"]
    cells = shapely.union_all([box(x, y, x + s, y + s) for x, y in block])  # the 0.2 mm² the cells cover
    polys = read_geojson(out / "tumor.geojson")["Tumor"]
    validate_qupath_geojson(out / "tumor.geojson", expected={"Tumor": polys})

    outline = shapely.from_wkt(meta["tissue"]["polygon_wkt"])
    assert outline.buffer(1.0).contains(polys) and cells.buffer(1.0).contains(polys)
    assert summary["tumor_area_mm2"] == pytest.approx(polys.area * mpp**2 / 1e6, abs=1e-6)
    assert 0.1 < summary["tumor_area_mm2"] < 0.8 * cells.area * mpp**2 / 1e6  # the cleft's ~0.06 mm² are out
    assert summary["tumor_area_basis"] == AREA_BASIS_TISSUE
    # Independent of the tissue detector: the thumbnail's white (glass) pixels under the regions.
    thumb = np.asarray(group["thumbnail"][...])
    white = thumb.min(axis=2) >= 235
    under_cells, under_regions = (rasterize(g, white.shape, scale=ds) for g in (cells, polys))
    assert white[under_cells].mean() > 0.1 and white[under_regions].mean() < 0.02

    with Image.open(out / "tumor_mask.png") as im:
        mask_px, text, dpi = np.asarray(im) == 255, dict(im.text), im.info["dpi"]
    assert np.array_equal(mask_px, under_regions)  # the mask is the regions, pixel for pixel
    assert float(text[PNG_UM_PER_PX]) == pytest.approx(mpp * ds) and float(text[PNG_DOWNSAMPLE_L0]) == ds
    assert text[PNG_ORIGIN_L0] == "0.0,0.0" and dpi[0] == pytest.approx(25_400 / (mpp * ds), rel=1e-3)
    assert summary["file_scales"]["tumor_mask_png"] == {"um_per_px": pytest.approx(mpp * ds), "downsample_l0": ds,
                                                        "origin_l0": [0.0, 0.0]}
    assert summary["file_scales"]["heatmap"]["um_per_px"] == pytest.approx(224.0)  # one cell = one 224 µm patch
    assert summary["file_scales"]["heatmap"]["downsample_l0"] == pytest.approx(s)
    assert summary["decision"] == "tumor" and "decision_regions_disagree" not in [f["code"] for f in summary["qc"]["flags"]]


def test_decision_on_a_14_patch_slide_matches_its_regions(cmu_1um, tmp_path):
    """The top-10 mean of a 14-patch slide called two 0.994 patches 'normal' beside their
    drawn region; k scales with the slide, and a region the score does not back is flagged."""
    two = {(898, 1796): 0.994, (898, 2244): 0.99}  # two tissue patches, one above the other
    path, _, _ = _planted_cmu(cmu_1um, tmp_path / "two.zarr", two, low=0.1)
    summary = stitch_store(path, tmp_path / "two", StitchConfig())
    assert summary["slide_score"]["n"] == 14 and summary["slide_score"]["k"] == 2
    assert summary["n_tumor_regions"] == 1 and summary["decision"] == "tumor"
    assert summary["decision_reason"].startswith("1 tumor region (largest ")
    assert "top-2 mean 0.992 ≥ threshold 0.5" in summary["decision_reason"]
    assert "decision_regions_disagree" not in [f["code"] for f in summary["qc"]["flags"]]

    # One 0.6 patch: a region, but a top-2 mean of 0.35: called tumor and sent for review.
    path, _, _ = _planted_cmu(cmu_1um, tmp_path / "one.zarr", {(898, 1796): 0.6}, low=0.1)
    summary = stitch_store(path, tmp_path / "one", StitchConfig(min_tumor_area_um2=20_000))
    flags = {f["code"]: f for f in summary["qc"]["flags"]}
    assert summary["n_tumor_regions"] == 1 and summary["decision"] == "tumor"
    assert flags["decision_regions_disagree"]["severity"] == "review" and summary["qc"]["needs_review"]
    assert "top-2 mean 0.350 < threshold 0.5" in flags["decision_regions_disagree"]["message"]


def test_mostly_glass_patches_are_not_analysed(cmu_1um, tmp_path):
    """The QC background fraction decides: above stitch.max_background a patch is left out of
    the heatmap, the score, the regions and the counts; changing the limit restitches."""
    from wsipipe.tiles import qc

    group = store.open_store(cmu_1um)
    background = qc.read_measures(group)["background_fraction"]
    glassy = int(np.argmax(background))  # the 224 µm patch at the top of the cleft, ~60 % glass
    assert 0.5 < background[glassy] < 0.7
    x, y = (int(v) for v in group["coords"][glassy])
    path, _, _ = _planted_cmu(cmu_1um, tmp_path / "g.zarr", {(x, y): 0.95})
    out = tmp_path / "out"
    kept = stitch_store(path, out, StitchConfig())  # default limit 0.7: analysed
    assert kept["excluded_patches"] == {"mostly_background": 0} and kept["n_tumor_patches"] == 1
    from wsipipe.config import load_config, load_config_sources

    # The limit as the user names it: --set tile.max_background (an alias) or stitch.max_background.
    cfg, sources = load_config_sources(None, {"tile.max_background": 0.5})
    assert cfg.stitch.max_background == 0.5 and sources["stitch.max_background"] == "from --set"
    assert load_config(None, {"stitch": {"max_background": 0.6}}).stitch.max_background == 0.6
    dropped = stitch_store(path, out, cfg.stitch)
    assert dropped["excluded_patches"] == {"mostly_background": 1}
    assert dropped["n_tumor_patches"] == 0 and dropped["slide_score"]["n"] == 13
    assert dropped["slide_score"]["max"] == pytest.approx(0.05) and dropped["n_tumor_regions"] == 0
    i, j = (int(v) for v in group["grid_ij"][glassy])
    assert np.isnan(np.load(out / "heatmap.npy")[i, j]) and dropped["decision"] == "normal"


def test_old_summary_json_without_the_newer_fields_still_loads(tmp_path):
    from wsipipe.outputs.summary import load_summary

    out = tmp_path / "out"
    summary = stitch_store(build_store(tmp_path / "case.zarr"), out, StitchConfig())
    assert summary["excluded_patches"] is None  # a store without QC measures: every patch analysed
    old = {k: v for k, v in summary.items()
           if k not in ("excluded_patches", "decision_reason", "tumor_area_basis", "file_scales")}
    (out / "summary.json").write_text(json.dumps(old))
    model = load_summary(out)
    assert model.decision_reason is None and model.tumor_area_basis is None and model.file_scales == {}
