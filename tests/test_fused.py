"""The fused tile -> infer path (``tile.store_patches: false``) against the two-stage path, on a
generated slide and a real SVS: same store contents (coords, tissue fraction, QC, corrupt flags,
probabilities), same summary, resuming after an interrupted inference, corrupt tiles, a missing
slide, training's error, and `wsipipe` end to end with the setting in a config file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr
from torch import nn
from typer.testing import CliRunner

from wsipipe.cli import app
from wsipipe.config import InferenceConfig, load_config
from wsipipe.errors import SlideOpenError, SlideReadError, StoreError
from wsipipe.models.inference import infer_store
from wsipipe.models.model import ModelInfo, build_model, save_weights
from wsipipe.outputs.stitch import stitch_store
from wsipipe.slides.synth import write_synthetic_slide
from wsipipe.tiles import store
from wsipipe.tiles.tiling import read_store_patches, tile_slide

# Small patches and a tiny model keep each slide to a second or two; the batch (24) straddles
# the chunks (16), so batches are assembled across chunk boundaries on both paths.
SMALL = {"tile.mpp": 1.0, "tile.patch_size": 64, "tile.chunk_patches": 16, "dask.num_workers": 2}
FP32 = InferenceConfig(batch_size=24, device="cpu", precision="fp32", prefetch_batches=2)
TILE_ARRAYS = ("coords", "grid_ij", "tissue_fraction", "corrupt", "qc/measures", "thumbnail", "tissue_mask")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: the reader threads need the other one
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """6000 x 4000 at 0.5 µm/px, tiled at 1 µm/px: resampled patches (no level at 1 µm/px)."""
    return write_synthetic_slide(tmp_path_factory.mktemp("fused") / "gen.svs", 6000, 4000, mpp=0.5, seed=4).path


def tiny_model(seed: int = 0) -> tuple[nn.Module, ModelInfo]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    return net.eval(), ModelInfo(arch="tiny", num_classes=1, sha256=f"{seed:064d}", path=None)


def both_paths(slide: Path, tmp: Path, overrides: dict) -> tuple[zarr.Group, zarr.Group]:
    """The slide tiled and classified twice: patches stored, then read from the slide."""
    net, info = tiny_model()
    groups = []
    for name, keep in (("two-stage", True), ("fused", False)):
        cfg = load_config(None, {**SMALL, **overrides, "tile.store_patches": keep})
        tile_slide(slide, tmp / f"{name}.zarr", cfg)
        infer_store(tmp / f"{name}.zarr", net, info, FP32)
        groups.append(store.open_store(tmp / f"{name}.zarr"))
    return groups[0], groups[1]


def assert_same_results(two: zarr.Group, fused: zarr.Group) -> None:
    for name in (*TILE_ARRAYS, "probabilities"):
        np.testing.assert_array_equal(two[name][:], fused[name][:], err_msg=name)  # NaN == NaN here
    assert not np.isnan(fused["qc/measures"][:, 1:]).any()  # measured (focus alone may be NaN on glass)


@pytest.mark.parametrize("which", ["generated", "cmu-1-small-region.svs"])
def test_fused_path_gives_the_two_stage_results(which, generated, slides_dir, tmp_path):
    slide = generated if which == "generated" else slides_dir / which
    overrides = {} if which == "generated" else {"tile.mpp": 0.5}  # CMU: level 0, decoded tile by tile
    two, fused = both_paths(slide, tmp_path, overrides)
    n = two["coords"].shape[0]
    assert n > 200
    assert "patches" not in fused and "_progress/tile" not in fused  # planned only: no patch written, no chunk task
    assert store.meta(fused)["tile"]["store_patches"] is False
    assert store.stage_entry(fused, "infer")["patches_from"] == "slide"
    assert store.stage_entry(two, "infer")["patches_from"] == "store"
    assert_same_results(two, fused)
    # The tile identity (and so the infer identity) tells the two apart.
    assert store.stage_entry(two, "tile")["identity"] != store.stage_entry(fused, "tile")["identity"]

    # What the report's gallery shows: the very pixels the two-stage store holds.
    idx = np.array([0, 5, n // 2, n - 1])
    np.testing.assert_array_equal(read_store_patches(fused, idx, tmp_path / "fused.zarr"), two["patches"][:][idx])

    cfg = load_config(None, SMALL)
    a = stitch_store(tmp_path / "two-stage.zarr", tmp_path / "two-out", cfg.stitch, qc_cfg=cfg.qc)
    b = stitch_store(tmp_path / "fused.zarr", tmp_path / "fused-out", cfg.stitch, qc_cfg=cfg.qc)
    for key in ("decision", "slide_score", "tumor_area_mm2", "n_tumor_regions", "n_tumor_patches", "n_patches", "qc"):
        assert a[key] == b[key], key
    np.testing.assert_array_equal(np.load(tmp_path / "two-out" / "heatmap.npy"), np.load(tmp_path / "fused-out" / "heatmap.npy"))


def test_interrupted_fused_inference_resumes_with_the_remaining_chunks(generated, tmp_path):
    cfg = load_config(None, {**SMALL, "tile.store_patches": False})
    net, info = tiny_model()
    one_chunk = InferenceConfig(batch_size=16, device="cpu", precision="fp32")  # a unit is one chunk
    ref = tmp_path / "ref.zarr"
    tile_slide(generated, ref, cfg)
    infer_store(ref, net, info, one_chunk)

    path = tmp_path / "cut.zarr"
    tile_slide(generated, path, cfg)
    calls = []

    def stop_after_first_chunk(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:  # the first call reports the start, the second the first chunk written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer_store(path, net, info, one_chunk, progress=stop_after_first_chunk)
    g = store.open_store(path)
    assert not store.is_complete(g, "infer") and g["_progress/infer"][:].tolist()[:2] == [True, False]
    first = {p: p.stat().st_mtime_ns for p in (path / "probabilities" / "c" / "0", path / "qc" / "measures" / "c" / "0" / "0")}

    seen = []
    stats = infer_store(path, net, info, one_chunk, progress=lambda d, t: seen.append(d))
    n = g["coords"].shape[0]
    assert stats["computed"] == n - 16 and seen[0] == 16  # only the chunks not flagged done
    assert {p: p.stat().st_mtime_ns for p in first} == first  # chunk 0 neither re-read nor rewritten
    r, g = store.open_store(ref), store.open_store(path)
    for name in ("probabilities", "qc/measures", "corrupt"):
        np.testing.assert_array_equal(r[name][:], g[name][:], err_msg=name)
    assert store.is_complete(g, "infer")
    again = infer_store(path, net, info, one_chunk)
    assert again["skipped"]


def _corrupt_tiles(path: Path, tile_rc: list[tuple[int, int]]) -> None:
    """Overwrite the start of level-0 tiles (row, col) in place with undecodable JPEG data."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, cols = list(page.dataoffsets), -(-page.shape[1] // page.tilewidth)
    with open(path, "r+b") as fh:
        for r, c in tile_rc:
            fh.seek(offsets[r * cols + c] + 2)
            fh.write(b"\xff\xda\x00\x01garbage" * 4)


def test_corrupt_tiles_are_flagged_by_the_infer_stage(generated, tmp_path):
    bad = tmp_path / "bad.svs"
    shutil.copyfile(generated, bad)
    _corrupt_tiles(bad, [(2, 7), (5, 3)])
    skip = {"tile.min_tissue": 0.0, "tile.on_corrupt_tile": "skip"}
    two, fused = both_paths(bad, tmp_path, skip)
    assert 0 < int(two["corrupt"][:].sum()) < two["coords"].shape[0]
    assert_same_results(two, fused)
    report = store.stage_entry(two, "tile")["corrupt_patches"]
    assert store.stage_entry(fused, "tile")["corrupt_patches"] == report  # summary.json lists them from here

    net, info = tiny_model()
    cfg = load_config(None, {**SMALL, "tile.min_tissue": 0.0, "tile.store_patches": False})  # on_corrupt_tile: fail
    tile_slide(bad, tmp_path / "fail.zarr", cfg)  # planning reads no level-0 tile: nothing to see yet
    with pytest.raises(SlideReadError, match=f"{report['count']} of .* patches have corrupt tile data") as err:
        infer_store(tmp_path / "fail.zarr", net, info, FP32)
    assert str(bad) in str(err.value)
    assert not store.is_complete(store.open_store(tmp_path / "fail.zarr"), "infer")


def test_missing_or_replaced_slide_is_named(generated, tmp_path):
    moved = tmp_path / "moved.svs"
    shutil.copyfile(generated, moved)
    cfg = load_config(None, {**SMALL, "tile.store_patches": False})
    tile_slide(moved, tmp_path / "s.zarr", cfg)
    net, info = tiny_model()
    other = write_synthetic_slide(tmp_path / "other.svs", 3000, 2000, mpp=0.5, seed=9).path
    with pytest.raises(SlideReadError, match="not the slide that was tiled") as err:
        infer_store(tmp_path / "s.zarr", net, info, FP32, slide_path=other)
    assert str(other) in str(err.value)
    moved.unlink()
    with pytest.raises(SlideOpenError, match="tile.store_patches: false") as err:
        infer_store(tmp_path / "s.zarr", net, info, FP32)
    assert str(moved) in str(err.value)
    assert "probabilities" not in store.open_store(tmp_path / "s.zarr")  # failed before touching the store


def test_training_on_a_store_without_patches_says_how_to_get_them(generated, tmp_path):
    from wsipipe.learn.augment import augment_store
    from wsipipe.learn.patchsets import label_store, load_patch_sets
    from wsipipe.learn.pretrain import PatchStream

    path = tmp_path / "s.zarr"
    cfg = load_config(None, {**SMALL, "tile.store_patches": False})
    tile_slide(generated, path, cfg)
    for call in (
        lambda: label_store(path, generated.with_suffix(".geojson")), lambda: load_patch_sets([path]),
        lambda: PatchStream([path]), lambda: augment_store(path, tmp_path / "aug.zarr", cfg.augment),
    ):
        with pytest.raises(StoreError, match="tile it again with tile.store_patches: true") as err:
            call()
        assert str(path) in str(err.value)


def test_cli_end_to_end_with_store_patches_false_in_the_config(generated, tmp_path):
    config = tmp_path / "fused.yaml"
    config.write_text(yaml.safe_dump({
        "tile": {"mpp": 1.0, "patch_size": 64, "chunk_patches": 16, "store_patches": False},
        "inference": {"batch_size": 24, "device": "cpu", "precision": "fp32"},
        "dask": {"num_workers": 2},
    }))
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    runner = CliRunner()

    res = runner.invoke(app, ["run", str(generated), "--model", str(weights), "--out", str(tmp_path / "runs"),
                              "--config", str(config)])
    assert res.exit_code == 0, res.output
    [slide_dir] = (tmp_path / "runs").iterdir()
    assert "patches" not in store.open_store(slide_dir / "patches.zarr")
    summary = json.loads((slide_dir / "summary.json").read_text())
    html = (slide_dir / "report.html").read_text()
    assert summary["n_patches"] > 200 and html.count('alt="patch ') == load_config(None).qc.report_patches
    assert "data:image/jpeg" in html

    # The stage commands, one by one: infer finds the slide through the path the store recorded.
    s = tmp_path / "stage.zarr"
    for args in (["tile", str(generated), "--out", str(s)], ["infer", str(s), "--model", str(weights)],
                 ["stitch", str(s), "--out", str(tmp_path / "stitched")]):
        res = runner.invoke(app, [*args, "--config", str(config)])
        assert res.exit_code == 0, res.output
    stitched = json.loads((tmp_path / "stitched" / "summary.json").read_text())
    for key in ("decision", "slide_score", "tumor_area_mm2"):
        assert stitched[key] == summary[key], key


@pytest.mark.parametrize("which", ["generated", "cmu-1-small-region.svs"])
def test_device_decode_on_the_inference_device_gives_the_two_stage_results(which, generated, slides_dir, tmp_path):
    """tile.decode: device decodes each chunk's JPEG tiles in one batch on the inference device
    (here the CPU: torchvision's libjpeg-turbo decoder, the same pixels) and assembles and
    area-averages the patches there: same QC, probabilities and corrupt flags as two-stage."""
    slide = generated if which == "generated" else slides_dir / which
    overrides = {"tile.decode": "device"} if which == "generated" else {"tile.mpp": 0.5, "tile.decode": "device"}
    two, fused = both_paths(slide, tmp_path, overrides)
    assert store.meta(fused)["tile"]["decode"] == "device"
    assert_same_results(two, fused)
