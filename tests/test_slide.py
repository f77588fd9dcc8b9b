"""wsipipe.slides.slide on the real slide files in ../shared/data/slides (real OpenSlide, no mocks)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import openslide
import pytest

from wsipipe.errors import ImplausibleMppError, MissingMppError, SlideOpenError, SlideReadError
from wsipipe.slides.slide import composite_rgba, open_slide, resolve_mpp


def reference_rgb(path, x, y, level, w, h):
    """What OpenSlide itself returns, composited over white the same documented way."""
    with openslide.OpenSlide(str(path)) as s:
        return composite_rgba(np.asarray(s.read_region((x, y), level, (w, h))))


def test_real_aperio_metadata(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as s:
        assert s.dimensions == (2220, 2967)
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "openslide"
        assert s.objective_power == 20
        assert s.level_count == 1
        assert len(s.identity) == 16


def test_non_integer_downsamples_are_exact(slides_dir):
    with open_slide(slides_dir / "openslide-fixtures" / "boxes.tiff") as s:
        assert s.level_count == 4
        assert s.level_downsamples[2] == pytest.approx(4.016129032258064, abs=1e-12)
        assert s.level_downsamples[3] == pytest.approx(8.086312118570184, abs=1e-12)
        assert s.level_downsamples[2] != 4.0
        # Resolution tags give 352.78 µm/px: read, but flagged as implausible for a scanner.
        assert s.mpp == pytest.approx(352.7777798, rel=1e-6)
        assert not s.mpp_plausible


def test_missing_mpp_is_a_clear_error_and_override_wins(slides_dir):
    path = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(MissingMppError) as info:
        open_slide(path)
    assert str(path) in str(info.value) and "mpp" in str(info.value)
    with open_slide(path, mpp_override=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
        assert s.level_count == 2 and s.level_downsamples[1] == pytest.approx(2.00050555, rel=1e-7)
    with open_slide(slides_dir / "cmu-1-small-region.svs", mpp_override=0.3) as s:
        assert s.mpp == 0.3  # an explicit override beats the file's own value


def test_resolve_mpp_order(tmp_path, caplog):
    p = tmp_path / "x.svs"
    assert resolve_mpp(p, {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}) == (0.25, "openslide")
    mpp, src = resolve_mpp(p, {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"})
    assert (mpp, src) == (0.25, "tiff-resolution")
    with caplog.at_level(logging.WARNING):
        mpp, src = resolve_mpp(p, {"openslide.objective-power": "40"})
    assert (mpp, src) == (0.25, "objective-power")
    assert "objective power" in caplog.text
    assert resolve_mpp(p, {"openslide.objective-power": "40"}, override=0.5) == (0.5, "override")
    with pytest.raises(MissingMppError):
        resolve_mpp(p, {"openslide.objective-power": "garbage", "tiff.ResolutionUnit": "inch"})



def test_resolve_mpp_default_and_plausible_range(tmp_path):
    """mpp_default only where the file states nothing usable: the file's mpp and its objective power
    (this scan's own record) win over it; a value the file gives outside the range is none at all."""
    p, valid = tmp_path / "x.tiff", (0.1, 2.0)
    stated = {"openslide.mpp-x": "0.499", "openslide.mpp-y": "0.499"}
    assert resolve_mpp(p, stated, default=0.25, valid=valid) == (0.499, "openslide")
    assert resolve_mpp(p, {"openslide.objective-power": "20"}, default=0.25, valid=valid) == (0.5, "objective-power")
    assert resolve_mpp(p, {}, default=0.25, valid=valid) == (0.25, "default")
    dpi72 = {"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}  # an image editor's default
    assert resolve_mpp(p, dpi72) == (pytest.approx(352.78, rel=1e-4), "tiff-resolution")  # no range: read as is
    assert resolve_mpp(p, dpi72, default=0.5, valid=valid) == (0.5, "default")
    assert resolve_mpp(p, {**dpi72, "openslide.objective-power": "40"}, valid=valid) == (0.25, "objective-power")
    with pytest.raises(ImplausibleMppError, match=r"TIFF resolution tags say 352.8 µm/px, outside the 0.1–2 µm/px"):
        resolve_mpp(p, dpi72, valid=valid)
    with pytest.raises(ImplausibleMppError, match=r"objective power 1x gives 10 µm/px"):
        resolve_mpp(p, {"openslide.objective-power": "1"}, valid=valid)
    assert resolve_mpp(p, dpi72, override=5.0, valid=valid) == (5.0, "override")  # the user's word stands


def test_two_file_dicom_opens(slides_dir):
    with open_slide(slides_dir / "openslide-fixtures" / "boxes_0.dcm") as s:
        assert s.vendor == "dicom"
        assert s.dimensions == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        px = s.read_region(0, 0, 0, 16, 16)
        assert px.shape == (16, 16, 3) and px.dtype == np.uint8


def test_identity_is_stable_and_content_sensitive(slides_dir, tmp_path):
    src = slides_dir / "cmu-1-small-region.svs"
    with open_slide(src) as a, open_slide(src) as b:
        assert a.identity == b.identity
    with open_slide(slides_dir / "openslide-fixtures" / "boxes.tiff") as c:
        assert c.identity != a.identity
    copy = tmp_path / "copy.svs"
    shutil.copy(src, copy)
    with open_slide(copy) as d:
        assert d.identity == a.identity  # same content, other path: same slide
    data = bytearray(copy.read_bytes())
    data[-10] ^= 0xFF  # change a byte in the last MiB
    copy.write_bytes(bytes(data))
    with open_slide(copy) as e:
        assert e.identity != a.identity


def test_native_read_equals_openslide_including_edges(slides_dir):
    path = slides_dir / "cmu-1-small-region.svs"
    with open_slide(path) as s:
        w, h = s.dimensions
        for x, y in [(0, 0), (1000, 1500), (w - 224, h - 224), (w - 100, 50), (50, h - 100)]:
            got = s.read_at_mpp(x, y, 224, 224, s.mpp)
            assert np.array_equal(got, reference_rgb(path, x, y, 0, 224, 224))
        # Past the right/bottom edge reads as background (white), not black.
        beyond = s.read_at_mpp(w - 100, h - 100, 224, 224, s.mpp)
        assert (beyond[150:, 150:] == 255).all()


def test_coarser_mpp_matches_reference_resize(slides_dir):
    from PIL import Image

    path = slides_dir / "cmu-1-small-region.svs"
    with open_slide(path) as s:
        scale = 1.0 / s.mpp  # 1.0 µm/px
        for x, y in [(400, 800), (1200, 2000)]:
            got = s.read_at_mpp(x, y, 112, 112, 1.0)
            edge = 112 * scale
            big = reference_rgb(path, x, y, 0, int(np.ceil(edge)) + 1, int(np.ceil(edge)) + 1)
            ref = np.asarray(Image.fromarray(big).resize((112, 112), Image.Resampling.LANCZOS, box=(0, 0, edge, edge)))
            assert np.abs(got.astype(int) - ref).mean() < 0.5


CONVERT = "vips tiffsave IN OUT.tif --tile --pyramid"
SUPPORTED = "Aperio SVS, Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, Ventana, generic tiled TIFF and DICOM WSI"
BAD_FILES = [
    ("broken.svs", ["not a slide format", SUPPORTED]),
    ("openslide-fixtures/unopenable.tiff", ["Unsupported TIFF compression"]),
    # A DICOM WSI without ImageType: what it is, OpenSlide's words, what is supported, how to convert.
    ("pathml-small_dicom.dcm", ["a DICOM whole-slide image OpenSlide cannot read", "image flavor",
                                "no ImageType (0008,0008)", SUPPORTED, "bfconvert", CONVERT]),
    ("pathml-smalltif.tif", ["an untiled TIFF (a single 640x480 image in strips, lzw compression, 2 images in all), "
                             "not a tiled pyramidal whole-slide image", SUPPORTED, CONVERT, "--xres X --yres X"]),
    ("kidney-48-5.tif", ["an untiled TIFF (a single 1493x901 image in strips, uncompressed), not a tiled pyramidal "
                         "whole-slide image", SUPPORTED, CONVERT]),
]


@pytest.mark.parametrize("name,problems", BAD_FILES)
def test_unopenable_files_name_file_and_problem(slides_dir, name, problems):
    """One line naming the file; for an image that is not a WSI, what it is, what is read and how to convert."""
    path = slides_dir / name
    with pytest.raises(SlideOpenError) as info:
        open_slide(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for problem in problems:
        assert problem in message, message


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(SlideOpenError, match="file not found"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty"):
        open_slide(tmp_path / "empty.svs")
    (tmp_path / "dir.svs").mkdir()
    with pytest.raises(SlideOpenError, match="directory"):
        open_slide(tmp_path / "dir.svs")


def test_corrupt_tile_read_fails_clearly(slides_dir):
    path = slides_dir / "openslide-fixtures" / "unreadable.svs"
    with open_slide(path) as s, pytest.raises(SlideReadError) as info:  # opens fine; the read fails
        s.read_region(0, 0, 0, 16, 16)
    assert str(path) in str(info.value) and "x=0, y=0" in str(info.value)


def test_truncated_slide_fails_clearly(slides_dir, tmp_path):
    data = (slides_dir / "cmu-1-small-region.svs").read_bytes()
    cut = tmp_path / "truncated.svs"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises((SlideOpenError, SlideReadError)) as info, open_slide(cut) as s:
        s.thumbnail(8.0)
    assert str(cut) in str(info.value)


def test_a_dicom_file_that_is_not_a_slide_says_so(tmp_path):
    """A DICOM file of another kind (here a bare preamble and a CT SOP class): not a whole-slide image."""
    path = tmp_path / "ct.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x02\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\0" + b"\0" * 64)
    with pytest.raises(SlideOpenError) as info:
        open_slide(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a slide format OpenSlide can read: a DICOM file that is not a whole-slide "
                              "image (its SOP class is not VL Whole Slide Microscopy Image Storage)")
    assert "DICOM WSI" in message
