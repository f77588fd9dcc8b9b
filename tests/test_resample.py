"""Exact area reduction at integer factors: the OpenCV block mean against references (Pillow's
``Image.reduce``, numpy block sums), the tile reader's reduced tiles against reducing a full
read on a real Aperio slide (edges included), the thumbnail, and the OpenCV tissue morphology
and QC focus against scikit-image and a plain-numpy statement of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsipipe.config import TissueConfig
from wsipipe.slides import tissue
from wsipipe.slides.resample import area_reduce, integer_factor
from wsipipe.slides.slide import open_slide
from wsipipe.tiles import qc

CMU = "cmu-1-small-region.svs"  # 2220 x 2967 px, 240-px JPEG tiles with shared JPEG tables


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """The definition: each output pixel is the mean of a factor x factor block, rounded half up."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    sums = image[: h * factor, : w * factor].astype(np.int64).reshape(h, factor, w, factor, -1).sum(axis=(1, 3))
    return ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 8, 16])
def test_area_reduce_is_the_rounded_block_mean_and_matches_pillow(factor):
    rng = np.random.default_rng(factor)
    image = rng.integers(0, 256, size=(16 * 37 + 5, 16 * 29 + 3, 3), dtype=np.uint8)
    got = area_reduce(image, factor)
    np.testing.assert_array_equal(got, block_mean(image, factor))
    if factor in (2, 4, 8):  # where Pillow's reduce is exact too (elsewhere it can be one level off)
        whole = image[: got.shape[0] * factor, : got.shape[1] * factor]
        np.testing.assert_array_equal(got, np.asarray(Image.fromarray(whole).reduce(factor)))
    out = np.empty_like(got)
    assert area_reduce(image, factor, out=out) is out and np.array_equal(out, got)
    view = np.zeros((got.shape[0] + 2, got.shape[1] + 2, 3), np.uint8)[1:-1, 1:-1]  # not contiguous
    area_reduce(image, factor, out=view)
    np.testing.assert_array_equal(view, got)


def test_integer_factor():
    assert integer_factor(2.0) == 2 and integer_factor(4.000000000001) == 4
    assert integer_factor(2.004) is None and integer_factor(1.0) is None and integer_factor(0.5) is None


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_tile_reader_reduced_reads_equal_reducing_the_full_read(slides_dir, factor):
    """Reduced tiles, cut and assembled, give the block means of the full-resolution read, also
    where a block straddles the image edge (2967 rows: odd) and past it (background)."""
    with open_slide(slides_dir / CMU) as s:
        reader = s.fast_reader(0)
        assert reader is not None and reader.can_reduce(factor)
        w, h = s.dimensions
        for x, y, size in [(0, 0, 300), (1000 // factor, 1301 // factor, 150), ((w - 90) // factor, (h - 70) // factor, 80)]:
            full = s.read_level(0, x * factor, y * factor, size * factor, size * factor)
            got = s.read_level(0, x, y, size, size, factor=factor)
            np.testing.assert_array_equal(got, block_mean(full, factor), err_msg=f"({x}, {y}) at 1/{factor}")
            # The OpenSlide path (no tile reader) reduces its own full read: same pixels.
            np.testing.assert_array_equal(s.read_level(0, x, y, size, size, fast=False, factor=factor), got)
        assert (s.read_level(0, w // factor + 3, 0, 4, 4, factor=factor) == 255).all()


def test_thumbnail_is_a_level_reduced_by_a_whole_factor(slides_dir):
    with open_slide(slides_dir / CMU) as s:
        thumb, ds = s.thumbnail(8.0)  # 8 µm/px from 0.499: the single level reduced 16x
        assert ds == 16.0 and thumb.shape == (-(-2967 // 16), -(-2220 // 16), 3)
        np.testing.assert_array_equal(thumb[:-1, :-1], block_mean(s.read_level(0, 0, 0, 2208, 2960), 16))
        capped, capped_ds = s.thumbnail(1.0, max_px=700)  # 1 µm/px would be 1481 px: capped to <= 700
        assert max(capped.shape[:2]) <= 700 and capped_ds == 5.0


def test_tissue_morphology_equals_scikit_image():
    morphology = pytest.importorskip("skimage.morphology")
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    for k in range(40):
        values = rng.integers(rng.integers(0, 100), rng.integers(101, 256), size=int(rng.integers(50, 3000))).astype(np.uint8)
        assert tissue.otsu_threshold(values) == float(threshold_otsu(values)), k
        mask = rng.random((int(rng.integers(30, 120)), int(rng.integers(30, 120)))) < rng.uniform(0.2, 0.8)
        radius, small = int(rng.integers(1, 5)), int(rng.integers(1, 30))
        pad = radius + 1  # callers pad: compare where the image border plays no part
        closed = tissue.binary_closing(mask, tissue.disk(radius))
        np.testing.assert_array_equal(closed[pad:-pad, pad:-pad], morphology.closing(mask, morphology.disk(radius))[pad:-pad, pad:-pad])
        np.testing.assert_array_equal(tissue.remove_small_objects(mask, small), morphology.remove_small_objects(mask, max_size=small))


def test_real_slide_tissue_mask_equals_the_scikit_image_pipeline(slides_dir):
    """detect_tissue's steps, done with scikit-image on the same thumbnail, give the same mask."""
    morphology = pytest.importorskip("skimage.morphology")
    from skimage.filters import threshold_otsu

    cfg = TissueConfig()
    with open_slide(slides_dir / CMU) as s:
        thumb, ds = s.thumbnail(cfg.thumb_mpp)
        got = tissue.detect_tissue(thumb, ds, s.mpp, cfg)
        px_um = ds * s.mpp
    sat, grey = tissue.saturation_value(thumb)
    thr = max(float(threshold_otsu(sat)) / 255.0, cfg.min_saturation)
    mask = (sat > thr * 255) & (grey < cfg.max_brightness * 255) & (grey > 0.05 * 255)
    r = int(round(cfg.closing_um / px_um))
    mask = morphology.closing(np.pad(mask, r + 1), morphology.disk(r))[r + 1 : -r - 1, r + 1 : -r - 1]
    mask = morphology.remove_small_holes(mask, max_size=int(cfg.max_hole_um2 / px_um**2))
    mask = morphology.remove_small_objects(mask, max_size=int(cfg.min_area_um2 / px_um**2))
    assert mask.any()
    np.testing.assert_array_equal(got.mask, mask)


def reference_focus(patches: np.ndarray) -> np.ndarray:
    """QC focus from its definition, in plain numpy: 2x2 green sums, 4-neighbour Laplacian,
    variance over pixels whose neighbourhood is all tissue, in grey levels (1/16 of sums)."""
    g = patches[..., 1].astype(np.int64)
    sums = g[:, 0::2, 0::2] + g[:, 1::2, 0::2] + g[:, 0::2, 1::2] + g[:, 1::2, 1::2]
    lap = sums[:, 1:-1, 2:] + sums[:, 1:-1, :-2] + sums[:, 2:, 1:-1] + sums[:, :-2, 1:-1] - 4 * sums[:, 1:-1, 1:-1]
    sharp = sums < 4 * qc.WHITE_LEVEL
    inner = sharp[:, 1:-1, 1:-1] & sharp[:, 1:-1, 2:] & sharp[:, 1:-1, :-2] & sharp[:, 2:, 1:-1] & sharp[:, :-2, 1:-1]
    out = np.full(len(patches), np.nan)
    for k in range(len(patches)):
        if inner[k].sum() >= 16:
            out[k] = lap[k][inner[k]].astype(np.float64).var() / 16.0
    return out


def test_focus_measure_follows_its_definition_on_real_patches(slides_dir):
    with open_slide(slides_dir / CMU) as s:
        patches = np.stack([s.read_level(0, x, y, 224, 224) for x, y in [(1500, 2300), (900, 1900), (100, 100), (1200, 2000)]])
    got, want = qc.focus_measure(patches), reference_focus(patches)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert ok.sum() >= 2  # tissue patches measured, glass not
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5)
    # patch_qc measures the central half of each patch.
    central = qc.patch_qc(patches)["focus"]
    np.testing.assert_allclose(central, qc.focus_measure(patches[:, 56:168, 56:168]), rtol=0, equal_nan=True)
