"""Slides on a real dask.distributed cluster: a `dask scheduler` and two `dask worker`
processes on 127.0.0.1, one of them advertising `--resources GPU=1`. Inference must run on
that worker, tiling and stitching on the other, and the outputs must equal a local run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import shapely
import torch
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from typer.testing import CliRunner

from wsipipe.tiles import store
from wsipipe.cli import app
from wsipipe.run.client import connect
from wsipipe.run.cluster import dask_client, run_slides, split_workers
from wsipipe.config import DaskConfig, load_config
from wsipipe.errors import ConfigError
from wsipipe.geojson import read_geojson
from wsipipe.models.model import build_model, save_weights
from wsipipe.run.pipeline import run_slide
from wsipipe.slides.synth import write_synthetic_slide

DASK = [sys.executable, "-m", "dask"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, GPU worker name, CPU worker name) of real processes on 127.0.0.1."""
    logs = tmp_path_factory.mktemp("dask-logs")
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--no-dashboard"]
    procs = []

    def start(name, *args):
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([*DASK, *args], stdout=log, stderr=subprocess.STDOUT, env=env))

    start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], *common)
    worker = ["worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1", *common]
    start("gpu", *worker, "--name", "gpu-worker", "--resources", "GPU=1")
    start("cpu", *worker, "--name", "cpu-worker")
    try:
        deadline = time.time() + 90
        while True:  # the scheduler may not be listening yet
            try:
                with connect(address) as client:
                    client.wait_for_workers(2, timeout=60)
                break
            except (ConfigError, OSError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster-in")
    slides = [
        write_synthetic_slide(tmp / f"s{seed}.svs", 3000, 2400, mpp=0.5, seed=seed, n_tissue=1, n_tumor=1).path
        for seed in (3, 4)
    ]
    torch.manual_seed(0)
    weights = tmp / "tiny.safetensors"
    save_weights(build_model("mobilenet_v3_small", 1).eval(), weights, "mobilenet_v3_small", 1)  # cheap on CPU
    cfg = load_config(None, {"inference.device": "cpu", "inference.precision": "fp32", "inference.batch_size": 32})
    return slides, weights, cfg


def test_inference_runs_on_the_gpu_worker_and_outputs_equal_a_local_run(cluster, inputs, tmp_path):
    slides, weights, cfg = inputs
    with dask_client(DaskConfig(scheduler_address=cluster)) as client:
        cpu, gpu = split_workers(client)
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        rows = [r.as_dict() for r in run_slides(slides, tmp_path / "cluster", cfg, weights, client)]
    assert [names[a] for a in gpu] == ["gpu-worker"] and [names[a] for a in cpu] == ["cpu-worker"]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    for row in rows:
        assert set(row) >= {"slide", "name", "status", "error", "out_dir", "summary", "seconds"}
        assert names[row["workers"]["infer"]] == "gpu-worker"
        assert names[row["workers"]["tile"]] == "cpu-worker" and names[row["workers"]["stitch"]] == "cpu-worker"

    for slide, row in zip(slides[:1], rows[:1], strict=True):  # one local reference keeps the test short
        local = run_slide(slide, tmp_path / "local", cfg, weights)
        remote = row["out_dir"]
        assert local.out_dir.name == row["name"]
        a, b = store.open_store(local.store), store.open_store(f"{remote}/patches.zarr")
        assert a["patches"].shape[0] > 20
        np.testing.assert_array_equal(a["patches"][:], b["patches"][:])
        np.testing.assert_allclose(a["probabilities"][:], b["probabilities"][:], atol=1e-6)
        np.testing.assert_allclose(np.load(local.out_dir / "heatmap.npy"), np.load(f"{remote}/heatmap.npy"), atol=1e-6)
        ta = read_geojson(local.out_dir / "tumor.geojson").get("Tumor", shapely.MultiPolygon())
        tb = read_geojson(f"{remote}/tumor.geojson").get("Tumor", shapely.MultiPolygon())
        assert shapely.symmetric_difference(ta, tb).area < 1e-6
        assert row["summary"]["decision"] == local.summary["decision"]
        # The OME-Zarr of a real slide: scale x shape spans the slide's physical size.
        image = next(iter(Reader(parse_url(f"{remote}/heatmap.ome.zarr"))()))
        scale = image.metadata["coordinateTransformations"][0][0]["scale"]
        extent_um = np.array(image.data[0].shape) * np.array(scale)
        slide_um = np.array([2400, 3000]) * 0.5
        cell_um = scale[0]
        assert np.all(extent_um >= slide_um - cell_um) and np.all(extent_um <= slide_um + 2 * cell_um)


def test_cli_run_with_scheduler_reports_skipped_rerun_and_failures(cluster, inputs, tmp_path):
    slides, weights, _ = inputs
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    args = ["run", *map(str, slides[:1]), "--model", str(weights), "--out", str(tmp_path / "o"), "--scheduler", cluster]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    flat = " ".join(first.output.split())  # rich wraps long lines at spaces
    assert "infer on tcp://127.0.0.1" in flat
    again = CliRunner().invoke(app, [*args[:2], str(broken), *args[2:]])
    assert again.exit_code == 2, again.output
    flat = " ".join(again.output.split())
    assert "skipped in" in flat and "broken.svs" in flat and "1 of 2 slides failed" in flat


def test_unreachable_scheduler_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot reach the scheduler"), connect(f"tcp://127.0.0.1:{_free_port()}", timeout="2s"):
        pass


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_local_cluster_serves_http_on_the_loopback_only(processes):
    """dask.dashboard_address (default 127.0.0.1:0): the scheduler's and the workers' HTTP
    servers (dashboard, /health) listen on the loopback, not on the host's network address."""
    import urllib.request

    from distributed import Client

    from wsipipe.run.cluster import local_cluster

    with local_cluster(DaskConfig(num_workers=1), processes=processes) as cluster, Client(cluster) as client:
        bound = [sock.getsockname() for sock in cluster.scheduler.http_server._sockets.values()]
        assert bound and {host for host, _ in bound} == {"127.0.0.1"}, bound
        with urllib.request.urlopen(f"http://127.0.0.1:{bound[0][1]}/health", timeout=10) as resp:
            assert resp.read() == b"ok"
        hosts = client.run(lambda dask_worker: sorted({s.getsockname()[0] for s in dask_worker.http_server._sockets.values()}))
        assert hosts and all(h == ["127.0.0.1"] for h in hosts.values()), hosts
