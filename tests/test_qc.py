"""Slide QC: measures written by the real tiler into the real store, flags that fire on slides
built to trigger them (blur, pen, near-empty, bad mpp) and stay quiet on clean ones."""

from __future__ import annotations

import numpy as np
import pytest

from slide_helpers import blur_region, pen_stroke, synthetic_rgb, write_pyramid_tiff
from wsipipe.tiles import qc, store
from wsipipe.config import QCConfig, load_config
from wsipipe.errors import NoTissueError
from wsipipe.slides.slide import open_slide
from wsipipe.tiles.tiling import tile_slide

W, H = 4000, 3000
CFG = QCConfig(min_tissue_area_mm2=0.25)  # the test slides are small: ~1 mm² of tissue


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A clean generated H&E slide as pixels (two tissue pieces)."""
    tmp = tmp_path_factory.mktemp("qc")
    rgb, s = synthetic_rgb(tmp, W, H, seed=3, n_tissue=2, n_tumor=1)
    return tmp, rgb, s.tissue


def tiled_flags(tmp, name: str, rgb: np.ndarray) -> tuple[list[str], dict, object]:
    """Write the pixels as a slide, tile it, and return (flag codes, measures, group)."""
    path = write_pyramid_tiff(tmp / f"{name}.tif", rgb)
    tile_slide(path, tmp / f"{name}.zarr", load_config(None, {}))
    group = store.open_store(tmp / f"{name}.zarr")
    measures = qc.read_measures(group)
    meta = store.meta(group)
    flags = qc.slide_flags(meta["slide"], meta["tissue"], measures, None, 0.5, CFG)
    return [f["code"] for f in flags], measures, group


def test_clean_slide_has_no_flags_and_measures_are_stored(base):
    tmp, rgb, _ = base
    codes, m, group = tiled_flags(tmp, "clean", rgb)
    assert codes == []
    n = group["coords"].shape[0]
    assert n > 20 and all(m[k].shape == (n,) and m[k].dtype == np.float32 for k in qc.MEASURES)
    assert np.isfinite(m["focus"]).all() and (m["pen_fraction"] < CFG.pen_patch_fraction).all()
    # Measures are the pure function of the stored pixels: same values from the store's patches.
    again = qc.patch_qc(group["patches"][:])
    for k in qc.MEASURES:
        np.testing.assert_allclose(m[k], again[k], rtol=1e-5, err_msg=k)


def test_blurred_region_fires_out_of_focus_on_those_patches(base):
    tmp, rgb, _ = base
    codes, m, group = tiled_flags(tmp, "blurred", blur_region(rgb, 0, W // 2))
    assert codes == ["out_of_focus"]
    blurred = qc.patch_flags(m, CFG)["blur"]
    x = group["coords"][:, 0]
    left, right = x + 224 <= W // 2, x >= W // 2
    tissue = m["background_fraction"] <= 0.5
    # Every tissue patch wholly in the blurred half is caught, none in the sharp half.
    assert blurred[left & tissue].all() and blurred[left].sum() > 5
    assert not blurred[right].any()


def test_pen_stroke_fires_pen_marks_on_those_patches(base):
    tmp, rgb, _ = base
    stroke = [(300, 2600), (1600, 1900), (3000, 1500), (3800, 400)]
    codes, m, group = tiled_flags(tmp, "pen", pen_stroke(rgb, stroke))
    assert codes == ["pen_marks"]
    pen = qc.patch_flags(m, CFG)["pen"]
    assert pen.sum() >= CFG.min_pen_patches
    # Flagged patches lie on the stroke: their centres are within a patch of the drawn line.
    import shapely

    line = shapely.LineString(stroke)
    centres = group["coords"][:][pen] + 112
    assert all(line.distance(shapely.Point(c)) < 224 for c in centres)


def test_black_ink_is_a_pen_mark_but_dark_nuclei_are_not(base):
    tmp, rgb, _ = base
    codes, _, _ = tiled_flags(tmp, "black", pen_stroke(rgb, [(200, 1500), (3800, 1600)], colour=(15, 15, 20)))
    assert "pen_marks" in codes


def test_near_empty_slide_flags_small_tissue_and_empty_flags_no_tissue(base):
    tmp, rgb, tissue = base
    glass = np.full_like(rgb, 243)
    speck = glass.copy()
    inside = tissue.geoms[0].buffer(-400)  # a 0.4 x 0.4 mm piece cut from inside the tissue
    x, y = (int(v) - 400 for v in inside.representative_point().coords[0])
    speck[y : y + 800, x : x + 800] = rgb[y : y + 800, x : x + 800]
    codes, m, _ = tiled_flags(tmp, "speck", speck)
    assert codes == ["tissue_small"], codes
    with pytest.raises(NoTissueError):
        tiled_flags(tmp, "glass", glass)
    group = store.open_store(tmp / "glass.zarr")
    meta = store.meta(group)
    flags = qc.slide_flags(meta["slide"], meta["tissue"], qc.read_measures(group), None, 0.5, CFG)
    assert [f["code"] for f in flags] == ["no_tissue"] and flags[0]["severity"] == qc.FAIL


def test_real_slide_is_quiet_on_focus_pen_and_colour(slides_dir, tmp_path):
    """CMU-1 (real Aperio H&E, sharp, no ink): no blur, pen or colour flag on any patch."""
    tile_slide(slides_dir / "cmu-1-small-region.svs", tmp_path / "cmu.zarr", load_config(None, {}))
    group = store.open_store(tmp_path / "cmu.zarr")
    m = qc.read_measures(group)
    assert len(m["focus"]) > 20
    assert {k: int(v.sum()) for k, v in qc.patch_flags(m, CFG).items()} == {"blur": 0, "pen": 0, "colour": 0}
    meta = store.meta(group)
    codes = [f["code"] for f in qc.slide_flags(meta["slide"], meta["tissue"], m, 0.95, 0.5, CFG)]
    assert codes == []
    assert QCConfig().min_tissue_area_mm2 > meta["tissue"]["area_mm2"]  # a 0.6 mm² crop: flagged by default
    default_codes = [f["code"] for f in qc.slide_flags(meta["slide"], meta["tissue"], m, 0.95, 0.5, QCConfig())]
    assert default_codes == ["tissue_small"]


def test_implausible_mpp_of_a_real_file_is_flagged(slides_dir):
    with open_slide(slides_dir / "pathml-small_HE_levels.tiff") as slide:
        info = slide.info()
    assert info["mpp"] > 100  # the file's resolution tags say ~352 µm/px
    flags = qc.slide_flags(info, {"found": True, "area_mm2": 5.0}, None, None, 0.5, CFG)
    assert [f["code"] for f in flags] == ["mpp_suspicious"]
    assert "352" in flags[0]["message"]


@pytest.mark.parametrize(
    "slide,score,expected",
    [
        ({"mpp": 0.25, "mpp_source": "objective-power"}, 0.9, ["mpp_estimated"]),
        ({"mpp": 0.5, "mpp_source": "override"}, 0.02, ["mpp_override"]),
        ({"mpp": 0.5, "mpp_source": "override", "mpp_file": 0.499}, 0.02, ["mpp_override"]),
        ({"mpp": 0.25, "mpp_source": "override", "mpp_file": 0.499}, 0.02, ["mpp_override_contradicts"]),
        ({"mpp": 0.5, "mpp_source": "default", "mpp_file": None}, 0.02, ["mpp_default"]),
        # Only 1.1 mm at the given 0.25 µm/px (TCGA's size); the same size as the file states it is a crop.
        ({"mpp": 0.25, "mpp_source": "override", "width": 4443, "height": 3567}, 0.02, ["mpp_suspicious", "mpp_override"]),
        ({"mpp": 0.5, "mpp_source": "openslide", "mpp_file": 0.5, "width": 2220, "height": 2967}, 0.02, []),
        ({"mpp": None, "mpp_source": None}, 0.9, ["mpp_missing"]),
        ({"mpp": 0.5, "mpp_source": "openslide"}, 0.45, ["near_threshold"]),
        ({"mpp": 0.5, "mpp_source": "openslide"}, 0.61, []),
        ({"mpp": 0.5, "mpp_source": "openslide"}, None, []),
    ],
)
def test_slide_flags_for_mpp_and_score(slide, score, expected):
    flags = qc.slide_flags(slide, {"found": True, "area_mm2": 3.0}, None, score, 0.5, CFG)
    assert [f["code"] for f in flags] == expected
    assert all(f["message"] for f in flags)


def test_patch_qc_on_constructed_patches():
    rng = np.random.default_rng(0)
    sharp = rng.integers(60, 200, size=(1, 64, 64, 3), dtype=np.uint8)
    sharp[..., 0] = 200  # reddish, H&E-like hue
    white = np.full((1, 64, 64, 3), 250, np.uint8)
    green = np.zeros((1, 64, 64, 3), np.uint8)
    green[...] = (40, 170, 60)
    m = qc.patch_qc(np.concatenate([sharp, white, green]))
    assert m["background_fraction"].tolist() == [0.0, 1.0, 0.0]
    assert m["pen_fraction"][2] == 1.0 and m["pen_fraction"][0] < 0.05
    assert m["focus"][0] > 100 and np.isnan(m["focus"][1]) and m["focus"][2] == 0.0
    with pytest.raises(ValueError, match="N, H, W, 3"):
        qc.patch_qc(np.zeros((4, 4, 3), np.uint8))
