"""tile.codec: jpeg stores real patches ~4x smaller, close to the lossless pixels, readable by every stage."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from wsipipe.tiles import store
from wsipipe.config import load_config
from wsipipe.tiles.tiling import tile_slide
from wsipipe.tiles.zarrjpeg import JpegPatchCodec


def stored_bytes(path) -> int:
    return sum(f.stat().st_size for f in (path / "patches").rglob("*") if f.is_file() and f.name != "zarr.json")


def test_jpeg_patches_match_lossless_ones_within_jpeg_error(slides_dir, tmp_path):
    slide = slides_dir / "cmu-1-small-region.svs"
    base = {"tile.chunk_patches": 16, "dask.num_workers": 2}
    tile_slide(slide, tmp_path / "z.zarr", load_config(None, base))
    tile_slide(slide, tmp_path / "j.zarr", load_config(None, {**base, "tile.codec": "jpeg"}))
    z, j = store.open_store(tmp_path / "z.zarr"), store.open_store(tmp_path / "j.zarr")
    np.testing.assert_array_equal(z["coords"][:], j["coords"][:])
    exact, lossy = z["patches"][:].astype(int), j["patches"][:].astype(int)
    assert len(exact) > 16  # several chunks, the last one partial
    err = np.abs(exact - lossy)
    # Quality 95, 4:4:4 on real H&E: ~1 grey level on average, a few tens at sharp edges.
    assert err.mean() < 1.5 and err.max() < 48
    assert stored_bytes(tmp_path / "j.zarr") * 3 < stored_bytes(tmp_path / "z.zarr")
    picked = j["patches"].get_orthogonal_selection(([1, len(exact) - 1],))  # the way training reads them
    np.testing.assert_array_equal(picked, lossy[[1, -1]])
    # A fresh process reads the store through wsipipe.tiles.store alone (the codec registers on import).
    code = "import sys; from wsipipe.tiles import store; print(int(store.array(store.open_store(sys.argv[1]), store.PATCHES)[-1].sum()))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "j.zarr")], capture_output=True, text=True, check=True)
    assert int(out.stdout) == int(lossy[-1].sum())


def test_uncompressed_patches_equal_zstd_ones_byte_for_byte(slides_dir, tmp_path):
    slide = slides_dir / "cmu-1-small-region.svs"
    base = {"tile.chunk_patches": 16, "dask.num_workers": 1}
    tile_slide(slide, tmp_path / "z.zarr", load_config(None, base))
    tile_slide(slide, tmp_path / "n.zarr", load_config(None, {**base, "tile.codec": "none"}))
    z, raw = store.open_store(tmp_path / "z.zarr")["patches"], store.open_store(tmp_path / "n.zarr")["patches"]
    np.testing.assert_array_equal(z[:], raw[:])
    assert raw.compressors == ()
    assert stored_bytes(tmp_path / "n.zarr") >= raw.nbytes  # raw chunks, the last one padded
    assert stored_bytes(tmp_path / "z.zarr") < stored_bytes(tmp_path / "n.zarr")


def test_jpeg_codec_rejects_arrays_that_are_not_rgb_patches():
    import zarr

    with pytest.raises(ValueError, match="uint8 patch arrays"):
        zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 8, 8), chunks=(2, 8, 8), dtype="uint8",
                          serializer=JpegPatchCodec(), compressors=None)
    with pytest.raises(ValueError, match="1..100"):
        JpegPatchCodec(level=0)
