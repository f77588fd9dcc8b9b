"""Patches decoded and assembled on a device (wsipipe.models.gpudecode) against the CPU reader.

On the CPU, torchvision's decoder is libjpeg-turbo like imagecodecs: decoded tiles and native
patches are bit-identical (measured: max 0, mean 0 on cmu-1-small-region.svs and the mosaic).
At an exact 2x factor the device patches are the rounded-half-up 2x2 mean of the native read
exactly, and within 1 level of PIL's box filter (``tile.resample: area``; measured mean 0.12).
nvJPEG is a different decoder: on CUDA we assert mean <= 1.5 and max <= 32 levels (chroma
upsampling differs at sharp edges; torchvision's own nvJPEG test asserts mean < 2)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from wsipipe.models import gpudecode
from wsipipe.models.gpudecode import decode_tiles, device_decode_problem, jpeg_stream, read_patches_on_device
from wsipipe.errors import SlideReadError
from wsipipe.slides.mosaic import write_mosaic_slide
from wsipipe.slides.slide import open_slide
from wsipipe.tiles.tiling import plan_grid, read_patches

CUDA_MAX, CUDA_MEAN = 32, 1.5


@pytest.fixture(scope="module")
def cmu(slides_dir):
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        yield slide


@pytest.fixture(scope="module")
def mosaic(slides_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.svs"
    write_mosaic_slide(path, 1536, 1280, slides_dir / "cmu-1-small-region.svs", mpp=0.25, pool_size=16, seed=3)
    with open_slide(path) as slide:
        yield slide


def all_cells(spec, every: int = 1) -> np.ndarray:
    ii, jj = np.meshgrid(np.arange(spec.rows), np.arange(spec.cols), indexing="ij")
    return np.stack([ii.ravel(), jj.ravel()], axis=1)[::every]


def grid(slide, mpp, resample="area"):
    return plan_grid(*slide.dimensions, slide.mpp, slide.level_downsamples, mpp, 224, 224, resample=resample)


def diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


def area2(native: np.ndarray) -> np.ndarray:
    """2x2 block means of (N, 2P, 2P, 3) patches, rounded half up."""
    n, s = native.shape[:2]
    blocks = native.reshape(n, s // 2, 2, s // 2, 2, 3).astype(np.float64).mean(axis=(2, 4))
    return np.floor(blocks + 0.5).astype(np.uint8)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).cpu().numpy()


def test_aperio_tiles_need_the_tables_and_an_rgb_marker(cmu):
    level = cmu.fast_reader(0)
    assert level.jpegtables is not None and level._jpeg == (2, 2)  # abbreviated, RGB-encoded, no JFIF
    import os

    raw = os.pread(level._fd, int(level.counts[0]), int(level.offsets[0]))
    stream = jpeg_stream(level, raw)
    assert stream.startswith(b"\xff\xd8") and stream.endswith(b"\xff\xd9") and stream.count(b"\xff\xd8") == 1
    assert gpudecode.adobe_marker(0) in stream[:40]
    # Without the marker a decoder takes the RGB samples for YCbCr: colours tens of levels off.
    from torchvision.io import decode_jpeg

    plain = level.jpegtables[:-2] + raw[2:]
    wrong = decode_jpeg(torch.frombuffer(bytearray(plain), dtype=torch.uint8)).permute(1, 2, 0).numpy()
    assert diff(wrong, level.tile(0))[1] > 20


@pytest.mark.parametrize("name", ["cmu", "mosaic"])
def test_decoded_tiles_equal_the_cpu_reader(name, request):
    level = request.getfixturevalue(name).fast_reader(0)
    indices = list(range(len(level.counts)))
    got = nhwc(decode_tiles(level, indices, "cpu"))
    want = np.stack([level.tile(i) for i in indices])
    assert diff(got, want) == (0, 0.0)


@pytest.mark.parametrize("name", ["cmu", "mosaic"])
@pytest.mark.parametrize("decode", ["device", "cpu"])
def test_native_patches_equal_read_patches(name, decode, request):
    slide = request.getfixturevalue(name)
    spec = grid(slide, slide.mpp)
    assert not spec.needs_resize
    cells = all_cells(spec, every=3)  # gaps between cells: several runs per row; edge cells past the slide
    got = read_patches_on_device(slide, spec, cells, "cpu", decode=decode)
    assert got.shape == (len(cells), 3, 224, 224) and got.dtype == torch.uint8
    assert diff(nhwc(got), read_patches(slide, spec, cells)) == (0, 0.0)


@pytest.mark.parametrize("name", ["cmu", "mosaic"])
def test_two_x_patches_are_the_area_average_of_the_native_read(name, request):
    slide = request.getfixturevalue(name)
    spec = grid(slide, 2 * slide.mpp)
    assert spec.needs_resize and gpudecode.integer_factor(spec) == 2
    cells = all_cells(spec)
    got = nhwc(read_patches_on_device(slide, spec, cells, "cpu"))
    # The same cells at the native level with doubled size: 448 level px at x = 448 * col.
    native = plan_grid(*slide.dimensions, slide.mpp, slide.level_downsamples, slide.mpp, 448, 448)
    assert diff(got, area2(read_patches(slide, native, cells))) == (0, 0.0)
    max_pil, mean_pil = diff(got, read_patches(slide, spec, cells))  # PIL's box filter rounds its own way
    assert max_pil <= 1 and mean_pil < 0.25


def test_fractional_resample_falls_back_to_the_cpu_reader(cmu):
    spec = grid(cmu, 0.8, resample="lanczos")  # 1.6x: no integer factor
    assert gpudecode.integer_factor(spec) is None
    cells = all_cells(spec)
    assert diff(nhwc(read_patches_on_device(cmu, spec, cells, "cpu")), read_patches(cmu, spec, cells)) == (0, 0.0)


def test_jpeg2000_is_refused_by_the_decoder_and_read_on_the_cpu(slides_dir, caplog):
    with open_slide(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", mpp_override=0.25) as slide:
        level = slide.fast_reader(0)
        assert level is not None
        problem = device_decode_problem(level)
        assert problem is not None and "JPEG 2000" in problem
        with pytest.raises(SlideReadError, match="JPEG 2000") as err:
            decode_tiles(level, [0], "cpu")
        assert "tcga-cr-7395-01a-01-ts1.svs" in str(err.value)
        spec = grid(slide, slide.mpp)
        cells = all_cells(spec)[:12]
        with caplog.at_level(logging.INFO, logger="wsipipe.models.gpudecode"):
            got = read_patches_on_device(slide, spec, cells, "cpu")
        assert "tcga-cr-7395-01a-01-ts1.svs level 0: tiles are JPEG 2000" in caplog.text
        assert diff(nhwc(got), read_patches(slide, spec, cells)) == (0, 0.0)


@pytest.mark.parametrize("marker", [b"", b"\xff\xc0\x00\x03\x00"], ids=["ignored", "refused"])
def test_a_decoder_with_the_wrong_colours_or_that_refuses_the_stream_is_not_used(cmu, monkeypatch, marker):
    # A device decoder that ignores the Adobe marker decodes RGB as YCbCr, one that fails on the
    # stream raises: the probe catches both, and the level is decoded on the CPU.
    level = cmu.fast_reader(0)
    monkeypatch.setattr(gpudecode, "adobe_marker", lambda transform: marker)
    monkeypatch.setattr(gpudecode, "_colour_ok", type(gpudecode._colour_ok)())
    assert not gpudecode.device_decode_agrees(level, "cpu")
    spec = grid(cmu, cmu.mpp)
    cells = all_cells(spec)[:6]
    assert diff(nhwc(read_patches_on_device(cmu, spec, cells, "cpu")), read_patches(cmu, spec, cells)) == (0, 0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["cmu", "mosaic"])
def test_cuda_decode_and_assembly_match_the_cpu(name, request):
    slide = request.getfixturevalue(name)
    level = slide.fast_reader(0)
    assert gpudecode.device_decode_agrees(level, "cuda"), "nvJPEG disagrees with libjpeg-turbo on colour"
    indices = list(range(len(level.counts)))
    tiles = decode_tiles(level, indices, "cuda")
    assert tiles.is_cuda
    max_d, mean_d = diff(nhwc(tiles), np.stack([level.tile(i) for i in indices]))
    assert max_d <= CUDA_MAX and mean_d <= CUDA_MEAN, (max_d, mean_d)
    for mpp in (slide.mpp, 2 * slide.mpp):
        spec = grid(slide, mpp)
        cells = all_cells(spec, every=2)
        got = read_patches_on_device(slide, spec, cells, "cuda")
        assert got.is_cuda
        max_d, mean_d = diff(nhwc(got), read_patches(slide, spec, cells))
        assert max_d <= CUDA_MAX and mean_d <= CUDA_MEAN, (mpp, max_d, mean_d)


def test_tiles_with_no_stored_bytes_are_background(slides_dir):
    # A sparse TIFF records unscanned tiles with a byte count of 0; the CPU reader paints them
    # the background colour, and so must the batch decode, around decoded neighbours.
    with open_slide(slides_dir / "cmu-1-small-region.svs") as slide:
        level = slide.fast_reader(0)
        level.counts = level.counts.copy()
        level.counts[[1, 4]] = 0
        got = nhwc(decode_tiles(level, [0, 1, 2, 4], "cpu"))
        assert (got[1] == np.asarray(slide.background, np.uint8)).all() and (got[3] == got[1]).all()
        assert diff(got, np.stack([level.tile(i) for i in (0, 1, 2, 4)])) == (0, 0.0)
        assert diff(nhwc(decode_tiles(level, [1], "cpu")), level.tile(1)[None]) == (0, 0.0)
