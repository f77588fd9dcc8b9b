"""The direct tile reader against OpenSlide on every real slide it serves, and decode-once tiling."""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from wsipipe.slides import slide as slide_mod
from wsipipe.tiles import store
from wsipipe.config import load_config
from wsipipe.slides.slide import composite_rgba, open_slide
from wsipipe.tiles.tiling import tile_slide

# Every real file in ../shared/data/slides that OpenSlide opens (the others are error cases).
OPENABLE = [
    "cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "pathml-small_HE_levels.tiff",
    "openslide-fixtures/boxes.tiff", "openslide-fixtures/small.svs", "openslide-fixtures/boxes_0.dcm",
]


@pytest.mark.parametrize("name", OPENABLE)
def test_every_level_read_directly_equals_openslide(slides_dir, name):
    """Whole levels read from (0, 0), where OpenSlide's level coordinates are integral: the
    direct reader (where the format has one) gives OpenSlide's pixels exactly, edges included."""
    path = slides_dir / name
    served, levels = 0, 0
    with open_slide(path, mpp_override=0.25) as s, openslide.OpenSlide(str(path)) as ref:
        levels = ref.level_count
        for level, (w, h) in enumerate(ref.level_dimensions):
            if s.fast_reader(level) is None:
                continue  # other formats: OpenSlide reads them (the fallback), nothing to compare
            served += 1
            want = composite_rgba(np.asarray(ref.read_region((0, 0), level, (w, h))))
            np.testing.assert_array_equal(s.read_level(level, 0, 0, w, h), want, err_msg=f"{name} level {level}")
            # A request past the right/bottom edge: background there, the image elsewhere.
            part = s.read_level(level, w - 5, h - 3, 9, 7)
            np.testing.assert_array_equal(part[:3, :5], want[h - 3 :, w - 5 :])
            assert (part[3:] == 255).all() and (part[:, 5:] == 255).all()
    assert served == (0 if name.endswith(".dcm") else levels)


def test_overlapping_patches_decode_each_tile_once(slides_dir, tmp_path):
    """Stride half the patch: every tile is shared by several patches and chunks, yet decoded once;
    patches still equal OpenSlide's read_region."""
    path = slides_dir / "cmu-1-small-region.svs"
    slide_mod.forget_cached_slide(path)  # a handle left by an earlier test would carry its decode count
    cfg = load_config(None, {"tile.stride": 112, "tile.min_tissue": 0.0, "tile.chunk_patches": 16,
                             "dask.num_workers": 1})
    stats = tile_slide(path, tmp_path / "o.zarr", cfg)
    with slide_mod._cache_lock:  # tiling let go of its shared handle (and its decoded tiles)
        assert not [key for key in slide_mod._cache if key[0] == str(path.resolve())]
    with open_slide(path) as s:
        reader = s.fast_reader(0)
        tiles = reader.cols * -(-reader.height // reader.tile_h)
    assert stats["tiles_decoded"] == tiles  # 10 x 13 tiles of 240 px, each decoded exactly once
    g = store.open_store(tmp_path / "o.zarr")
    coords = g["coords"][:]
    assert len(coords) > 3 * tiles
    with openslide.OpenSlide(str(path)) as ref:
        for k in range(0, len(coords), 37):
            x, y = (int(v) for v in coords[k])
            want = composite_rgba(np.asarray(ref.read_region((x, y), 0, (224, 224))))
            np.testing.assert_array_equal(g["patches"][k], want)


def test_recycled_tile_buffers_never_change_pixels_under_threads(slides_dir):
    """A cache of 3 tiles forces evictions on nearly every read, so decoded tiles are recycled as
    decode targets constantly, while 4 threads read overlapping patches: each patch must still
    equal the single-threaded read through a cache that never evicts."""
    from concurrent.futures import ThreadPoolExecutor

    from wsipipe.slides.tiffread import open_level

    path = slides_dir / "cmu-1-small-region.svs"
    with open_slide(path) as s:
        dims = s.level_dimensions[0]
    big = open_level(str(path), "aperio", dims, cache_bytes=1 << 30)
    tiny = open_level(str(path), "aperio", dims, cache_bytes=3 * 240 * 240 * 3)
    try:
        xy = [(x, y) for y in range(0, dims[1] - 224, 97) for x in range(0, dims[0] - 224, 131)]
        want = [big.read(x, y, 224, 224) for x, y in xy]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: tiny.read(p[0], p[1], 224, 224), xy * 3))
        assert tiny.decoded > 3 * len(xy)  # it really evicted and re-decoded
        assert tiny.recycled > len(xy)  # and decoded into recycled buffers
        for k, patch in enumerate(got):
            np.testing.assert_array_equal(patch, want[k % len(xy)], err_msg=f"patch {k}")
    finally:
        big.close()
        tiny.close()


def test_shared_handles_are_bounded_per_process(slides_dir, tmp_path):
    """A long-lived worker tiling an archive keeps at most CACHED_SLIDES shared handles; an
    evicted one has its decoded tiles dropped at once."""
    import shutil

    src = slides_dir / "cmu-1-small-region.svs"
    copies = []
    for k in range(slide_mod.CACHED_SLIDES + 2):
        copies.append(tmp_path / f"copy{k}.svs")
        shutil.copyfile(src, copies[-1])
    first = slide_mod.cached_slide(copies[0])
    first.read_level(0, 0, 0, 512, 512)
    assert len(first.fast_reader(0)._cache) > 0
    for path in copies[1:]:
        slide_mod.cached_slide(path)
    with slide_mod._cache_lock:
        mine = [key for key in slide_mod._cache if key[0].startswith(str(tmp_path.resolve()))]
    assert len(mine) <= slide_mod.CACHED_SLIDES and str(copies[0].resolve()) not in {k[0] for k in mine}
    assert len(first.fast_reader(0)._cache) == 0  # evicted: its decoded tiles are gone
    np.testing.assert_array_equal(first.read_level(0, 0, 0, 64, 64), slide_mod.cached_slide(copies[-1]).read_level(0, 0, 0, 64, 64))
    for path in copies:
        slide_mod.forget_cached_slide(path)


def test_wide_slide_decodes_each_tile_once(slides_dir, tmp_path):
    """A level wider than a fixed 128 MiB cache holds two tile rows of (90 000 px: 352 tiles of
    256 px a row; 682 fit in 128 MiB): the cache is sized from the level's width, so reading every
    patch row-major in tiling's 64-patch chunks still decodes each tile exactly once."""
    from wsipipe.slides.mosaic import write_mosaic_slide
    from wsipipe.slides.tiffread import CACHE_TILE_ROWS
    from wsipipe.tiles.tiling import plan_grid, read_patches

    path = tmp_path / "wide.svs"
    write_mosaic_slide(path, 90_000, 768, slides_dir / "cmu-1-small-region.svs", mpp=0.5, seed=3)
    with open_slide(path) as s:
        reader = s.fast_reader(0)
        assert reader is not None and reader.tile_w == 256
        assert reader._cache_max >= CACHE_TILE_ROWS * reader.cols > (128 << 20) // (256 * 256 * 3)
        spec = plan_grid(*s.dimensions, s.mpp, s.level_downsamples, 0.5, 224, 224)
        ii, jj = np.meshgrid(np.arange(spec.rows), np.arange(spec.cols), indexing="ij")
        grid_ij = np.stack([ii.ravel(), jj.ravel()], axis=1)
        buf = np.empty((64, 224, 224, 3), np.uint8)
        for start in range(0, len(grid_ij), 64):
            cells = grid_ij[start : start + 64]
            read_patches(s, spec, cells, out=buf[: len(cells)])
        assert reader.decoded == reader.cols * -(-reader.height // reader.tile_h)
        # and the pixels are still OpenSlide's (last chunk, which runs past the bottom edge)
        with openslide.OpenSlide(str(path)) as ref:
            for k in (0, len(cells) - 1):
                x, y = (int(v) for v in spec.cell_xy(cells[k : k + 1])[0])
                want = composite_rgba(np.asarray(ref.read_region((x, y), 0, (224, 224))))
                np.testing.assert_array_equal(buf[k], want)
