"""Generated slides: real files that OpenSlide opens, pixels that follow the ground truth."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import openslide
import pytest
from shapely.geometry import MultiPolygon, Point, box
from skimage.measure import label

from wsipipe.geojson import read_geojson
from wsipipe.geometry import rasterize
from wsipipe.slides.synth import (
    LYMPHOID, NORMAL, TUMOR, _edges, _fill, lymphoid_aggregates, make_layout, make_textures, pyramid_downsamples,
    render_region, write_synthetic_slide,
)


def _rgb(o: openslide.OpenSlide, xy, level: int, size) -> np.ndarray:
    return np.asarray(o.read_region(xy, level, size))[..., :3]


def _patches_inside(o, region, n: int, size: int = 224, seed: int = 0) -> list[np.ndarray]:
    """``n`` random level-0 patches lying wholly inside ``region``."""
    rng = np.random.default_rng(seed)
    minx, miny, maxx, maxy = region.bounds
    out = []
    for _ in range(100 * n):
        x, y = int(rng.uniform(minx, maxx - size)), int(rng.uniform(miny, maxy - size))
        if region.contains(box(x, y, x + size, y + size)):
            out.append(_rgb(o, (x, y), 0, (size, size)))
            if len(out) == n:
                return out
    raise AssertionError("region too small for the patches")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """One slide with normal tissue and tumor, shared by the pixel tests."""
    return write_synthetic_slide(tmp_path_factory.mktemp("synth") / "s.svs", 8000, 6000, mpp=0.5, seed=5,
                                 n_tissue=2, n_tumor=1)


# --------------------------------------------------------------------------- the file


@pytest.mark.parametrize("fmt,vendor", [("svs", "aperio"), ("tiff", "generic-tiff")])
@pytest.mark.parametrize("size,mpp,downsamples", [((5000, 4100), 0.25, (1, 4)), ((17000, 4000), 0.5, (1, 4, 16))])
def test_opens_in_openslide_with_pyramid_and_mpp(tmp_path, fmt, vendor, size, mpp, downsamples):
    s = write_synthetic_slide(tmp_path / f"s.{fmt}", *size, mpp=mpp, seed=3, fmt=fmt)
    assert tuple(pyramid_downsamples(*size)) == downsamples
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.properties["openslide.vendor"] == vendor
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(mpp, rel=1e-6)
        assert float(o.properties["openslide.mpp-y"]) == pytest.approx(mpp, rel=1e-6)
        assert o.dimensions == size
        assert o.level_count == len(downsamples)
        for lvl, f in enumerate(downsamples):
            assert o.level_dimensions[lvl] == (size[0] // f, size[1] // f)
            assert o.level_downsamples[lvl] == pytest.approx(f, rel=2e-3)
        if fmt == "svs":
            assert o.properties["openslide.objective-power"] == ("40" if mpp < 0.375 else "20")
            assert o.properties["aperio.MPP"] == str(mpp)
            thumb = o.associated_images["thumbnail"]  # the stripped second IFD
            assert max(thumb.size) <= 1024 and thumb.size[0] > thumb.size[1]
        else:
            assert o.properties["tiff.ResolutionUnit"] == "centimeter"
            assert not o.associated_images
        assert int(o.properties["openslide.level[0].tile-width"]) == 256


def test_written_atomically_as_an_ordinary_file(tmp_path):
    (tmp_path / "s.svs").write_bytes(b"old")
    s = write_synthetic_slide(tmp_path / "s.svs", 3000, 2000, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.geojson", "s.svs"]  # no temporaries left
    assert s.path.stat().st_size > 10_000 and s.geojson_path == tmp_path / "s.geojson"
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic_slide(tmp_path / "x.png", 3000, 2000, fmt="png")
    with pytest.raises(ValueError, match="tile_size"):
        write_synthetic_slide(tmp_path / "x.svs", 3000, 2000, tile_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.geojson", "s.svs"]


def test_same_seed_same_bytes_other_seed_other_slide(tmp_path):
    a = write_synthetic_slide(tmp_path / "a.svs", 3000, 2000, seed=1)
    b = write_synthetic_slide(tmp_path / "b.svs", 3000, 2000, seed=1)
    c = write_synthetic_slide(tmp_path / "c.svs", 3000, 2000, seed=2)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert a.tissue.equals(b.tissue) and not a.tissue.equals(c.tissue)


# --------------------------------------------------------------------------- pixels


def test_decoded_pixels_match_what_was_written(slide):
    """OpenSlide's decode of every level equals the array we encoded, up to JPEG loss."""
    minx, miny, _, _ = slide.tumor.bounds
    with openslide.OpenSlide(str(slide.path)) as o:
        for lvl in range(o.level_count):
            f = int(round(o.level_downsamples[lvl]))
            x, y = (int(minx) - 300) // f * f, (int(miny) - 300) // f * f  # straddles the tumor edge
            w, h = min(1024, o.level_dimensions[lvl][0] - x // f), min(768, o.level_dimensions[lvl][1] - y // f)
            got = _rgb(o, (x, y), lvl, (w, h)).astype(float)
            want = render_region(slide.tissue, slide.tumor, (x, y), (w, h), seed=5, mpp=0.5, downsample=f)
            assert np.abs(got - want).mean() < 4, f"level {lvl}"


def test_lower_level_is_the_box_filtered_level0(slide):
    with openslide.OpenSlide(str(slide.path)) as o:
        assert o.level_downsamples[1] == 4
        x, y = (int(c) // 4 * 4 for c in slide.tumor.centroid.coords[0])
        x, y = x - 1024, y - 1024
        full = _rgb(o, (x, y), 0, (2048, 2048)).astype(float)
        reduced = full.reshape(512, 4, 512, 4, 3).mean(axis=(1, 3))
        level1 = _rgb(o, (x, y), 1, (512, 512)).astype(float)
    assert np.abs(reduced - level1).mean() < 4


def test_glass_is_bright_unsaturated_and_slightly_noisy(slide):
    with openslide.OpenSlide(str(slide.path)) as o:
        glass = _rgb(o, (10, 10), 0, (256, 256)).astype(float)
    assert 235 <= glass.mean() <= 246
    assert (glass.max(-1) - glass.min(-1)).mean() < 6  # grey-white, not tinted
    assert 0.2 < glass.std() < 6  # not flat 255, not speckled


def test_tumor_is_darker_more_haematoxylin_with_larger_nuclei(slide):
    """Tumor vs normal stroma at 224-px patches (0.5 µm/px): more haematoxylin on average,
    and told apart patch by patch by nucleus size, which mean colour alone cannot do for
    every patch (normal tissue has dense lymphoid aggregates)."""
    normal_only = slide.tissue.difference(slide.tumor.buffer(100))
    with openslide.OpenSlide(str(slide.path)) as o:
        tumor = _patches_inside(o, slide.tumor, 40)
        normal = _patches_inside(o, normal_only, 80)

    def od(p):  # optical density: what stain absorbs
        return -np.log(np.maximum(p.astype(float), 1) / 242.0)

    t_od = np.mean([od(p).mean(axis=(0, 1)) for p in tumor], axis=0)
    n_od = np.mean([od(p).mean(axis=(0, 1)) for p in normal], axis=0)
    assert t_od.sum() > n_od.sum() + 0.25  # darker
    # Haematoxylin absorbs red about as much as green, eosin mostly green: purple, not pink.
    assert t_od[0] / t_od[1] > n_od[0] / n_od[1] + 0.15

    t_size = [_median_nucleus_px(p) for p in tumor]
    n_size = [_median_nucleus_px(p) for p in normal]
    assert min(t_size) > max(n_size), (min(t_size), max(n_size))


def _median_nucleus_px(p: np.ndarray) -> float:
    lab = label(p.astype(int).sum(-1) < 400)  # dark haematoxylin blobs
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= 15]
    return float(np.median(areas)) if areas.size else 0.0


def test_lymphoid_aggregates_are_as_dark_as_tumor_but_not_tumor(slide):
    """Normal tissue holds dense lymphocyte aggregates: mean darkness alone does not find
    tumor, nucleus size still does."""
    assert len(slide.lymphoid.geoms) >= 1
    assert slide.lymphoid.difference(slide.tissue.difference(slide.tumor)).area < 1e-6
    assert slide.lymphoid.equals(lymphoid_aggregates(slide.tissue, slide.tumor, 0.5, 5))  # pure, per seed
    tex = make_textures(5, mpp=0.5)
    rng = np.random.default_rng(1)
    crops = {c: [tex[c, y : y + 224, x : x + 224] for y, x in rng.integers(0, 2048 - 224, (20, 2))]
             for c in (NORMAL, LYMPHOID, TUMOR)}
    grey = {c: np.mean([p.mean() for p in ps]) for c, ps in crops.items()}
    assert grey[LYMPHOID] < grey[TUMOR] < grey[NORMAL]  # no single darkness threshold separates tumor
    size = {c: [_median_nucleus_px(p) for p in ps] for c, ps in crops.items()}
    assert min(size[TUMOR]) > max(size[LYMPHOID] + size[NORMAL])


def test_no_seams_at_tile_borders(slide):
    """Pixel steps across tile borders are like steps anywhere else (nuclei continue)."""
    x, y = (int(c) for c in slide.tumor.centroid.coords[0])
    x, y = x // 256 * 256 - 512, y // 256 * 256 - 512
    with openslide.OpenSlide(str(slide.path)) as o:
        img = _rgb(o, (x, y), 0, (1024, 1024)).astype(float)
    for axis in (0, 1):
        steps = np.abs(np.diff(img, axis=axis)).mean(axis=(1 - axis, 2))  # step between i and i+1
        border = steps[255::256][:3]
        inner = np.delete(steps, np.arange(255, steps.size, 8))  # also skip 8-px JPEG block borders
        assert border.mean() < 1.5 * inner.mean(), (axis, border, inner.mean())


def test_empty_glass_slide(tmp_path):
    s = write_synthetic_slide(tmp_path / "glass.svs", 4000, 3000, seed=1, n_tissue=0, n_tumor=0)
    assert s.tissue.is_empty and s.tumor.is_empty
    with openslide.OpenSlide(str(s.path)) as o:
        lowest = _rgb(o, (0, 0), o.level_count - 1, o.level_dimensions[-1]).astype(int)
    assert lowest.min() > 225 and (lowest.max(-1) - lowest.min(-1)).max() < 12


def test_custom_layout_is_drawn_and_tumor_clipped_to_tissue(tmp_path):
    tissue = MultiPolygon([box(500, 500, 2500, 1500)])
    tumor = MultiPolygon([Point(2400, 1000).buffer(300)])  # pokes out of the tissue
    s = write_synthetic_slide(tmp_path / "c.tiff", 3000, 2000, seed=2, fmt="tiff", layout=(tissue, tumor))
    assert s.tumor.difference(tissue).area < 1e-6 and s.tumor.area < tumor.area
    with openslide.OpenSlide(str(s.path)) as o:
        inside_tumor = _rgb(o, (2300, 900), 0, (150, 200)).astype(float).mean()
        stroma = _rgb(o, (700, 700), 0, (600, 600)).astype(float).mean()
        outside = _rgb(o, (2560, 900), 0, (200, 200)).astype(float)  # glass beside the clipped tumor
    assert inside_tumor < stroma - 15
    assert outside.mean() > 235


# --------------------------------------------------------------------------- layout and ground truth


def test_ground_truth_geojson_roundtrip(tmp_path):
    s = write_synthetic_slide(tmp_path / "g.svs", 4000, 3000, seed=11, n_tissue=3, n_tumor=2)
    regions = read_geojson(s.geojson_path)
    assert set(regions) == {"Tissue", "Tumor"}
    assert regions["Tissue"].symmetric_difference(s.tissue).area < 1e-6 * s.tissue.area
    assert regions["Tumor"].symmetric_difference(s.tumor).area < 1e-6 * s.tumor.area
    features = json.loads(s.geojson_path.read_text())["features"]
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}
    assert sum(f["properties"]["classification"]["name"] == "Tissue" for f in features) == 3


@pytest.mark.parametrize("seed,width,height,n_tissue,n_tumor", [
    (0, 12000, 9000, 3, 2), (1, 4000, 3000, 3, 2), (2, 20000, 6000, 7, 4), (3, 6000, 9000, 1, 3), (4, 9000, 9000, 4, 0),
])
def test_layout_rules(seed, width, height, n_tissue, n_tumor):
    tissue, tumor = make_layout(width, height, 0.5, seed=seed, n_tissue=n_tissue, n_tumor=n_tumor)
    assert tissue.is_valid and tumor.is_valid
    assert len(tissue.geoms) == n_tissue
    margin = 0.02 * min(width, height)  # glass all round every piece
    minx, miny, maxx, maxy = tissue.bounds
    assert minx > margin and miny > margin and maxx < width - margin and maxy < height - margin
    for a, b in itertools.combinations(tissue.geoms, 2):
        assert a.distance(b) > margin
    assert tumor.difference(tissue).area < 1e-6
    if n_tumor:
        assert 0.02 * tissue.area < tumor.area < 0.8 * tissue.area  # tumor with normal tissue around it
    else:
        assert tumor.is_empty


def test_layout_is_deterministic_per_seed_and_allows_empty():
    a = make_layout(8000, 6000, 0.5, seed=4)
    b = make_layout(8000, 6000, 0.5, seed=4)
    c = make_layout(8000, 6000, 0.5, seed=5)
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert not a[0].equals(c[0])
    empty_tissue, empty_tumor = make_layout(8000, 6000, 0.5, seed=4, n_tissue=0)
    assert empty_tissue.is_empty and empty_tumor.is_empty
    normal, no_tumor = make_layout(8000, 6000, 0.5, seed=4, n_tumor=0)
    assert normal.equals(a[0]) and no_tumor.is_empty  # tissue is drawn before tumors


def test_pixel_classes_follow_the_polygons_like_geometry_rasterize():
    """The tile renderer's scanline fill gives exactly geometry.rasterize's pixels."""
    rng = np.random.default_rng(0)
    for seed in range(3):
        tissue, tumor = make_layout(6000, 4000, 0.5, seed=seed)
        for geom in (tissue, tumor):
            edges = _edges(geom)
            for _ in range(30):
                scale = float(rng.choice([1, 2, 4, 16]))
                offset = (rng.uniform(0, 6000), rng.uniform(0, 4000))
                shape = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
                assert np.array_equal(_fill(edges, shape, scale, offset), rasterize(geom, shape, scale, offset))


# --------------------------------------------------------------------------- memory


def _peak_rss_mib(path, size: int) -> float:
    code = (
        "from wsipipe.slides.synth import write_synthetic_slide;"
        f"write_synthetic_slide({str(path)!r}, {size}, {size}, seed=1, n_tissue=4, n_tumor=3);"
        # VmHWM is this process's own peak (ru_maxrss would carry the forking parent's over exec).
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def test_streams_in_bounded_memory(tmp_path):
    """A 20000^2 slide (1.2 GB of RGB per level 0) is written with the same peak memory as a
    4000^2 one: the fixed cost of the textures, not of the slide."""
    small = _peak_rss_mib(tmp_path / "small.svs", 4000)
    big = _peak_rss_mib(tmp_path / "big.svs", 20000)
    assert big < 600, f"peak RSS {big:.0f} MiB for 20000^2"
    assert big < small + 64, f"peak RSS {small:.0f} MiB at 4000^2 vs {big:.0f} MiB at 20000^2"
    with openslide.OpenSlide(str(tmp_path / "big.svs")) as o:
        assert o.dimensions == (20000, 20000) and o.level_count == 3
