"""Tissue detection: real slides (points checked by eye) and generated slides with known tissue."""

from __future__ import annotations

import numpy as np
import pytest

from wsipipe.config import TissueConfig, load_config
from wsipipe.geometry import mask_to_polygons, rasterize
from wsipipe.slides.slide import open_slide
from wsipipe.slides.tissue import detect_tissue, patch_tissue_fraction

# Level-0 points checked by eye in 224-px crops of each slide: tissue / glass.
EYE_CHECKED = {
    "cmu-1-small-region.svs": (None, [(1600, 2400), (1040, 2000)], [(240, 2400), (240, 240), (2000, 600)]),
    "tcga-cr-7395-01a-01-ts1.svs": (0.25, [(1920, 1600), (1000, 1800)], [(4000, 320), (300, 3300)]),
}


@pytest.mark.parametrize("name", sorted(EYE_CHECKED))
def test_real_slides_tissue_and_glass_points(slides_dir, name):
    override, tissue_pts, glass_pts = EYE_CHECKED[name]
    with open_slide(slides_dir / name, override) as s:
        thumb, ds = s.thumbnail(8.0)
        result = detect_tissue(thumb, ds, s.mpp, TissueConfig())
        width, height = s.dimensions
    assert result.found
    for x, y in tissue_pts:
        assert result.polygon.contains(_pt(x, y)), f"{name}: ({x}, {y}) is tissue"
        assert result.mask[int(y / ds), int(x / ds)]
    for x, y in glass_pts:
        assert not result.polygon.contains(_pt(x, y)), f"{name}: ({x}, {y}) is glass"
    # Polygon is in level-0 pixels and inside the slide.
    minx, miny, maxx, maxy = result.polygon.bounds
    assert minx >= 0 and miny >= 0 and maxx <= width + ds and maxy <= height + ds


def _pt(x, y):
    from shapely.geometry import Point

    return Point(x, y)


def test_blank_glass_is_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(238, 3, size=(200, 300, 3)), 0, 255).astype(np.uint8)
    result = detect_tissue(glass, 16.0, 0.5, TissueConfig())
    assert not result.found and result.polygon.is_empty and result.area_um2 == 0


def test_sizes_are_physical_not_pixels():
    """A 300x300 µm piece is kept with min area 0.05 mm² at any thumbnail resolution; a 150x150 µm speck is not."""
    for um_per_px in (4.0, 8.0, 16.0):
        n = int(2000 / um_per_px)
        img = np.full((n, n, 3), 240, np.uint8)
        big, small = int(300 / um_per_px), int(150 / um_per_px)
        img[10 : 10 + big, 10 : 10 + big] = (200, 80, 150)
        img[n - 10 - small : n - 10, n - 10 - small : n - 10] = (200, 80, 150)
        result = detect_tissue(img, um_per_px / 0.5, 0.5, TissueConfig())
        area_mm2 = result.area_um2 / 1e6
        assert area_mm2 == pytest.approx(0.09, rel=0.15), um_per_px


def test_mask_polygon_roundtrip_with_holes():
    mask = np.zeros((40, 50), bool)
    mask[5:30, 5:40] = True
    mask[10:15, 10:20] = False  # a hole
    mask[33:38, 42:48] = True  # a second piece
    poly = mask_to_polygons(mask, scale=4.0, offset=(100.0, 200.0))
    assert len(poly.geoms) == 2
    assert poly.area == pytest.approx(mask.sum() * 16.0)
    back = rasterize(poly, mask.shape, scale=4.0, offset=(100.0, 200.0))
    np.testing.assert_array_equal(back, mask)


def test_patch_tissue_fraction_counts_outside_as_background():
    mask = np.ones((10, 10), bool)
    xy = np.array([[0, 0], [80, 0], [95, 95]])  # inside, half outside (right), mostly outside
    frac = patch_tissue_fraction(mask, 1.0, xy, 20.0)
    # mask is 10x10 level-0 px here: patch of 20 px at (0, 0) covers 100 of its 400 px.
    assert frac[0] == pytest.approx(0.25)
    assert frac[1] == 0.0 and frac[2] == 0.0


def test_config_sizes_validate():
    with pytest.raises(Exception, match="tissue.min_area_um2"):
        load_config(None, {"tissue.min_area_um2": -1})
