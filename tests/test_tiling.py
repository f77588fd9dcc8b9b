"""Tiling real slides into real Zarr stores with real Dask schedulers."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from PIL import Image

from wsipipe.tiles import store
from wsipipe.config import load_config
from wsipipe.slides.slide import composite_rgba
from wsipipe.tiles.tiling import plan_grid, tile_slide


def read_store(path):
    g = store.open_store(path)
    return g, store.meta(g)


def openslide_patch(path, x, y, level, size):
    with openslide.OpenSlide(str(path)) as s:
        return composite_rgba(np.asarray(s.read_region((int(x), int(y)), level, (size, size))))


def test_plan_grid_covers_slide_with_exact_downsamples():
    spec = plan_grid(300, 250, 0.25, (1.0, 2.0, 4.016129032258064), mpp=1.0, patch_size=16, stride=16)
    assert spec.level == 2 and spec.scale == 4.016129032258064 and not spec.needs_resize
    # Last row/column reach the far edge (padded), never fall short of it.
    assert (spec.cols - 1) * spec.stride_l0 < 300 <= (spec.cols - 1) * spec.stride_l0 + spec.patch_size_l0
    assert (spec.rows - 1) * spec.stride_l0 < 250 <= (spec.rows - 1) * spec.stride_l0 + spec.patch_size_l0
    between = plan_grid(1000, 1000, 0.25, (1.0, 4.0), mpp=0.5, patch_size=224, stride=112)
    assert between.level == 0 and between.scale == 2.0 and between.needs_resize
    assert between.stride_l0 == 224.0 and between.patch_size_l0 == 448.0


def test_native_patches_equal_read_region_pixel_for_pixel(slides_dir, tmp_path):
    path = slides_dir / "cmu-1-small-region.svs"
    cfg = load_config(None, {"tile.min_tissue": 0.0, "tile.chunk_patches": 16})  # whole grid: edges included
    stats = tile_slide(path, tmp_path / "s.zarr", cfg)
    g, meta = read_store(tmp_path / "s.zarr")
    coords, patches = g["coords"][:], g["patches"]
    w, h = 2220, 2967
    assert stats["n_patches"] == meta["tile"]["rows"] * meta["tile"]["cols"] == len(coords)
    right = coords[:, 0] + 224 > w
    bottom = coords[:, 1] + 224 > h
    assert right.any() and bottom.any() and (right & bottom).any()
    for k in range(len(coords)):
        ref = openslide_patch(path, coords[k, 0], coords[k, 1], 0, 224)
        assert np.array_equal(patches[k], ref), f"patch {k} at {coords[k]} differs"
    assert meta["tile"]["mpp"] == pytest.approx(0.499) and meta["slide"]["identity"]
    assert g["tissue_fraction"].shape == (len(coords),)


def test_two_file_dicom_native(slides_dir, tmp_path):
    path = slides_dir / "openslide-fixtures" / "boxes_0.dcm"
    cfg = load_config(
        None, {"tile.min_tissue": 0.0, "tile.patch_size": 8, "tile.mpp": 0.499, "tissue.detect": False}
    )
    tile_slide(path, tmp_path / "d.zarr", cfg)
    g, _ = read_store(tmp_path / "d.zarr")
    assert g["coords"][:].tolist() == [[0, 0], [8, 0], [0, 8], [8, 8]]
    for k, (x, y) in enumerate(g["coords"][:]):
        assert np.array_equal(g["patches"][k], openslide_patch(path, x, y, 0, 8))


def test_non_integer_level_coords_are_level0(slides_dir, tmp_path):
    """boxes.tiff level 2 has downsample 4.016...: coords stay level-0 and content matches."""
    path = slides_dir / "openslide-fixtures" / "boxes.tiff"
    ds2 = 4.016129032258064
    cfg = load_config(
        None,
        {"mpp_override": 0.25, "tile.mpp": 0.25 * ds2, "tile.patch_size": 16, "tile.min_tissue": 0.0,
         "tissue.detect": False},
    )
    tile_slide(path, tmp_path / "b.zarr", cfg)
    g, meta = read_store(tmp_path / "b.zarr")
    assert meta["tile"]["level"] == 2 and meta["tile"]["level_downsample"] == pytest.approx(ds2, abs=1e-12)
    coords, grid = g["coords"][:], g["grid_ij"][:]
    np.testing.assert_array_equal(coords, np.rint(grid[:, ::-1] * 16 * ds2).astype(np.int64))
    assert coords[:, 0].max() > 200  # level-0 units, not level-2 units (level 2 is only 75 px wide)
    for k in range(len(coords)):
        ref = openslide_patch(path, coords[k, 0], coords[k, 1], 2, 16)
        assert np.abs(g["patches"][k].astype(int) - ref).mean() < 2.0


@pytest.mark.parametrize("resample", ["area", "lanczos"])
def test_coarser_mpp_matches_reference_resize(slides_dir, tmp_path, resample):
    """A factor that is not a whole number (0.499 -> 1.0 µm/px: 2.004x): each patch resampled with
    PIL's box (area weights) or Lanczos filter from its fractional level-0 box."""
    path = slides_dir / "cmu-1-small-region.svs"
    cfg = load_config(None, {"tile.mpp": 1.0, "tile.patch_size": 112, "tile.resample": resample})
    pil_filter = Image.Resampling.BOX if resample == "area" else Image.Resampling.LANCZOS
    tile_slide(path, tmp_path / "c.zarr", cfg)
    g, meta = read_store(tmp_path / "c.zarr")
    edge = meta["tile"]["patch_size_l0"]
    assert meta["tile"]["mpp"] == pytest.approx(1.0) and edge == pytest.approx(112 / 0.499)
    errors = []
    for k in range(g["coords"].shape[0]):
        x, y = g["coords"][k]
        big = openslide_patch(path, x, y, 0, int(np.ceil(edge)) + 1)
        ref = np.asarray(Image.fromarray(big).resize((112, 112), pil_filter, box=(0, 0, edge, edge)))
        errors.append(np.abs(g["patches"][k].astype(int) - ref).mean())
    # Same filter on the same pixels: only float rounding differs (measured max 0.05).
    assert max(errors) < 0.5


@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_pyramid_level_read_at_coarser_mpp(slides_dir, tmp_path, reader):
    """JPEG 2000 slide, no mpp in the file: override 0.25 -> 0.5 µm/px reads level 1 (ds 2.0005).

    The reference is level 1 read whole from (0, 0), the one place where OpenSlide's level
    coordinates are exactly integral. The direct tile reader is exact on the level grid;
    through OpenSlide a level-0 location maps to a fractional level position that OpenSlide
    interpolates, so there we allow a small mean difference (measured max 4.1)."""
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    cfg = load_config(None, {"mpp_override": 0.25, "tile.mpp": 0.5, "tile.reader": reader})
    tile_slide(path, tmp_path / "t.zarr", cfg)
    g, meta = read_store(tmp_path / "t.zarr")
    assert meta["tile"]["level"] == 1
    assert meta["tile"]["reader"] == ("tiff-direct" if reader == "auto" else "openslide")
    assert g["coords"].shape[0] > 20
    with openslide.OpenSlide(str(path)) as s:
        level1 = composite_rgba(np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1])))
        ds = s.level_downsamples[1]
    for k in range(g["coords"].shape[0]):
        i, j = g["grid_ij"][k]
        ref = np.full((224, 224, 3), 255, np.uint8)
        part = level1[i * 224 : (i + 1) * 224, j * 224 : (j + 1) * 224]
        ref[: part.shape[0], : part.shape[1]] = part
        if reader == "auto":
            np.testing.assert_array_equal(g["patches"][k], ref)
        else:
            assert np.abs(g["patches"][k].astype(int) - ref).mean() < 5.0
        assert tuple(g["coords"][k]) == (round(j * 224 * ds), round(i * 224 * ds))


def test_direct_reader_equals_openslide_reader_at_level0(slides_dir, tmp_path):
    path = slides_dir / "cmu-1-small-region.svs"
    stores = {}
    for reader in ("auto", "openslide"):
        cfg = load_config(None, {"tile.min_tissue": 0.0, "tile.reader": reader})
        tile_slide(path, tmp_path / f"{reader}.zarr", cfg)
        stores[reader] = read_store(tmp_path / f"{reader}.zarr")
    assert stores["auto"][1]["tile"]["reader"] == "tiff-direct"
    np.testing.assert_array_equal(stores["auto"][0]["patches"][:], stores["openslide"][0]["patches"][:])


def test_rerun_is_noop_and_config_change_rebuilds(slides_dir, tmp_path):
    path = slides_dir / "cmu-1-small-region.svs"
    out = tmp_path / "s.zarr"
    cfg = load_config(None, {"tile.chunk_patches": 8})
    first = tile_slide(path, out, cfg)
    chunk_files = sorted((out / "patches").rglob("c/*/*/*/*"))
    mtimes = [f.stat().st_mtime_ns for f in chunk_files]
    again = tile_slide(path, out, cfg)
    assert again["skipped"] and again["n_patches"] == first["n_patches"]
    assert [f.stat().st_mtime_ns for f in chunk_files] == mtimes
    changed = tile_slide(path, out, load_config(None, {"tile.chunk_patches": 8, "tile.min_tissue": 0.0}))
    assert not changed["skipped"] and changed["n_patches"] > first["n_patches"]


def test_distributed_cluster_gives_identical_store(slides_dir, tmp_path):
    from distributed import Client, LocalCluster

    path = slides_dir / "cmu-1-small-region.svs"
    cfg = load_config(None, {"tile.chunk_patches": 8})
    tile_slide(path, tmp_path / "local.zarr", cfg)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        seen = []
        tile_slide(path, tmp_path / "dist.zarr", cfg, client=client, progress=lambda d, n: seen.append(d))
    a, _ = read_store(tmp_path / "local.zarr")
    b, _ = read_store(tmp_path / "dist.zarr")
    for name in ("patches", "coords", "grid_ij", "tissue_fraction"):
        np.testing.assert_array_equal(a[name][:], b[name][:])
    assert seen[-1] == a["coords"].shape[0]


def test_store_is_not_complete_after_failed_read(slides_dir, tmp_path):
    from wsipipe.errors import SlideReadError

    path = slides_dir / "openslide-fixtures" / "unreadable.svs"
    with pytest.raises(SlideReadError):
        tile_slide(path, tmp_path / "u.zarr", load_config(None, {"tile.min_tissue": 0.0, "tissue.detect": False}))
    if (tmp_path / "u.zarr" / "zarr.json").exists():
        assert not store.is_complete(store.open_store(tmp_path / "u.zarr"), "tile")


def test_area_resampling_averages_pixel_areas_at_2x(slides_dir, tmp_path):
    """tile.resample: area (the default) at an exact 2x from level 0 gives each output pixel the
    mean of its 2x2 level-0 block as OpenSlide reads it (rounded half up: within 0.5 of the
    float mean), and differs from Lanczos only by the filter (same grid, same coordinates)."""


    slide = slides_dir / "cmu-1-small-region.svs"
    base = {"tile.mpp": 1.0, "tile.min_tissue": 0.3, "mpp_override": 0.5, "dask.num_workers": 1}
    tile_slide(slide, tmp_path / "a.zarr", load_config(None, {**base, "tile.resample": "area"}))
    tile_slide(slide, tmp_path / "l.zarr", load_config(None, {**base, "tile.resample": "lanczos"}))
    a, lz = store.open_store(tmp_path / "a.zarr"), store.open_store(tmp_path / "l.zarr")
    assert store.meta(a)["tile"]["resample"] == "area" and store.meta(a)["tile"]["scale"] == 2.0
    np.testing.assert_array_equal(a["coords"][:], lz["coords"][:])
    with openslide.OpenSlide(str(slide)) as ref:
        n = a["coords"].shape[0]
        for k in (0, n // 2, n - 1):
            x, y = (int(v) for v in a["coords"][k])
            full = composite_rgba(np.asarray(ref.read_region((x, y), 0, (448, 448)))).astype(np.float64)
            block_mean = full.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
            assert np.abs(a["patches"][k].astype(np.float64) - block_mean).max() <= 0.5
            assert not np.array_equal(a["patches"][k], lz["patches"][k])  # Lanczos sharpens: other pixels
