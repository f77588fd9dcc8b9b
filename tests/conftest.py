"""Shared fixtures. Real slide files live in ../shared/data beside the project root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One OpenMP/MKL thread for torch, here and in every subprocess a test starts (workers, CLI runs),
# unless the caller sets otherwise. On the two shared cores tests run on, torch's default of one
# thread per core spins against Dask's threads and other processes: the small training tests took
# 84 s with it and 6 s without. Results do not depend on the thread count; the benchmarks in
# bench/ measure speed with the default.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SLIDES = SHARED / "slides"

# `make test-fast` (pytest -m "not slow") is the edit loop: pure functions, the store, QC,
# stitching, readers and the CLI's argument handling. These modules tile whole slides, train
# models, or start servers, clusters, browsers and subprocess pipelines; `make test` runs them.
SLOW_MODULES = {
    "test_archive", "test_archive_scale", "test_augment", "test_bench_peers", "test_cli", "test_cluster", "test_concurrency", "test_fast_read",
    "test_faults", "test_flows", "test_fused", "test_model", "test_patch_codec", "test_pipeline", "test_pretrain", "test_report",
    "test_retrain", "test_run_overlap", "test_runners", "test_synth", "test_tiling", "test_train", "test_training_cli",
    "test_training_commands",
    "test_training_flows",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    if not SLIDES.is_dir():
        pytest.fail(f"real test slides not found at {SLIDES} (../shared/data beside the project root)")
    return SLIDES


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server on 127.0.0.1 for the session (private PREFECT_HOME, SQLite in a
    temporary folder), stopped by PID at the end: the flow tests and the archive-at-scale test
    each deploy and start their own worker on it, so the server's start is paid once."""
    from archive_scale import start_server_retrying
    from test_flows import _stop

    home = tmp_path_factory.mktemp("prefect")
    server, env = start_server_retrying(home)
    try:
        yield {"env": env, "dir": home}
    finally:
        _stop(server)


@pytest.fixture(scope="session")
def labelled_slides(tmp_path_factory):
    """Three small generated slides (own layouts and tumors), tiled into 64-px patches at
    1 µm/px and labelled Normal/Tumor from their ground-truth GeoJSON: shared by the
    training-side tests (patch sets, augmentation, pretraining, retraining)."""
    from wsipipe.config import load_config
    from wsipipe.learn.patchsets import label_store
    from wsipipe.slides.synth import write_synthetic_slide
    from wsipipe.tiles.tiling import tile_slide

    root = tmp_path_factory.mktemp("labelled")
    cfg = load_config(None, {"tile.mpp": 1.0, "tile.patch_size": 64, "tile.chunk_patches": 32})
    slides, stores = [], []
    for seed in (11, 12, 13):
        s = write_synthetic_slide(root / f"gen{seed}.svs", 5000, 3750, mpp=0.5, seed=seed, n_tissue=2, n_tumor=2)
        store_path = root / f"gen{seed}.zarr"
        tile_slide(s.path, store_path, cfg)
        label_store(store_path, s.geojson_path, ["Normal", "Tumor"])
        slides.append(s)
        stores.append(store_path)
    return {"slides": slides, "stores": stores, "cfg": cfg, "root": root}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests run torch on one thread: on a shared 2-core machine, two OpenMP threads
    spin against each other and other processes (measured 5-8x slower steps under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
