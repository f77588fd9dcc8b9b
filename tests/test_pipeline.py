"""End to end on generated slides with known truth: tissue recall/precision, resume after
a killed tiler, and the demo path (fit -> run -> Dice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import shapely

from wsipipe.tiles import store
from wsipipe.config import load_config
from wsipipe.slides.synth import write_synthetic_slide
from wsipipe.tiles.tiling import tile_slide


@pytest.mark.parametrize("seed,n_tissue", [(1, 3), (2, 5), (3, 2), (4, 4)])
def test_tissue_patch_recall_and_precision(tmp_path, seed, n_tissue):
    s = write_synthetic_slide(tmp_path / "s.svs", 8000, 6000, mpp=0.5, seed=seed, n_tissue=n_tissue, n_tumor=1)
    cfg = load_config(None, {"tile.min_tissue": 0.0})  # every cell: we score the tissue fractions
    tile_slide(s.path, tmp_path / "s.zarr", cfg)
    g = store.open_store(tmp_path / "s.zarr")
    coords, frac = g["coords"][:], g["tissue_fraction"][:]
    squares = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + 224, coords[:, 1] + 224)
    truth_frac = shapely.area(shapely.intersection(squares, s.tissue)) / 224**2
    truth, predicted = truth_frac >= 0.5, frac >= 0.5
    recall = (truth & predicted).sum() / truth.sum()
    precision = (truth & predicted).sum() / predicted.sum()
    assert recall >= 0.98 and precision >= 0.9, (recall, precision)


def test_no_tissue_is_reported_not_silent(tmp_path):
    from wsipipe.errors import NoTissueError

    s = write_synthetic_slide(tmp_path / "glass.svs", 3000, 2000, seed=1, n_tissue=0, n_tumor=0)
    with pytest.raises(NoTissueError, match="no tissue"):
        tile_slide(s.path, tmp_path / "glass.zarr")
    g = store.open_store(tmp_path / "glass.zarr")
    assert store.is_complete(g, "tile") and g["coords"].shape[0] == 0
    assert store.meta(g)["tissue"]["found"] is False


def test_killed_tiler_resumes_to_identical_store(tmp_path):
    s = write_synthetic_slide(tmp_path / "r.svs", 9000, 7000, mpp=0.5, seed=8)
    overrides = {"tile.min_tissue": 0.0, "tile.chunk_patches": 4, "dask.num_workers": 1}
    cfg = load_config(None, overrides)
    tile_slide(s.path, tmp_path / "ref.zarr", cfg)  # uninterrupted reference
    target = tmp_path / "killed.zarr"
    code = (
        "import sys, json; from wsipipe.config import load_config; from wsipipe.tiles.tiling import tile_slide;"
        "tile_slide(sys.argv[1], sys.argv[2], load_config(None, json.loads(sys.argv[3])))"
    )
    killed_after = None
    for seed in (0, 1):  # kill at two different points
        proc = subprocess.Popen([sys.executable, "-c", code, str(s.path), str(target), json.dumps(overrides)])
        flags = target / "_progress" / "tile" / "c"
        want = 40 + seed * 60
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if flags.is_dir() and len(os.listdir(flags)) >= want:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "tiler finished before it could be killed; make the slide bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        g = store.open_store(target)
        killed_after = int(g["_progress/tile"][:].sum())
        assert not store.is_complete(g, "tile")  # never marked complete while incomplete
    assert 0 < killed_after < g["_progress/tile"].shape[0]
    stats = tile_slide(s.path, target, cfg)
    assert stats["resumed"]
    ref, got = store.open_store(tmp_path / "ref.zarr"), store.open_store(target)
    for name in ("patches", "coords", "grid_ij", "tissue_fraction", "thumbnail", "tissue_mask"):
        np.testing.assert_array_equal(ref[name][:], got[name][:], err_msg=name)
    assert store.is_complete(got, "tile")


def test_demo_end_to_end_dice(tmp_path):
    """The demo path on small generated slides: fit on one, run on another, Dice vs truth."""
    from wsipipe.config import PipelineConfig
    from wsipipe.run.pipeline import run_demo

    result = run_demo(tmp_path / "demo", PipelineConfig(), size=(9000, 7000))
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["ground_truth"]["tumor_dice"] >= 0.8, summary["ground_truth"]
    assert summary["decision"] == "tumor" and summary["n_patches"] > 100
    for name in ("heatmap.png", "tumor_mask.png", "tumor.geojson", "heatmap.npy"):
        assert (result.out_dir / name).stat().st_size > 0
    geo = json.loads((result.out_dir / "tumor.geojson").read_text())
    assert geo["features"] and all(
        f["properties"]["classification"]["name"] == "Tumor" and f["properties"]["objectType"] == "annotation"
        for f in geo["features"]
    )
