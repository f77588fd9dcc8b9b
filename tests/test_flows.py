"""The Prefect flows for real: a Prefect server on 127.0.0.1, a process work pool, the
deployments of prefect.yaml, a worker, `prefect deployment run`; and the archive flow on a
dask.distributed scheduler + two workers started as processes. Everything started here is
stopped here, by PID."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from wsipipe.tiles import store
from wsipipe.run.archive import RESULTS_FILE
from wsipipe.models.model import build_model, save_weights
from wsipipe.slides.synth import write_synthetic_slide

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"tile.mpp": 2.0, "tile.patch_size": 64, "dask.num_workers": 1}
OUTPUT_FILES = ("summary.json", "heatmap.png", "tumor_mask.png", "tumor.geojson", "heatmap.npy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    # Own session: stopping it by its PID also stops what it spawned (its process group).
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGINT (Prefect's worker ignores SIGTERM), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _wait_until(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def _api(env: dict, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _healthy(env: dict) -> bool:
    try:
        return _api(env, "/health") is True
    except OSError:
        return False


def _prefect(env: dict, *args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory, slides_dir) -> dict:
    """3 slides (generated, real CMU-1 region, corrupt) and a tiny random-init model."""
    base = tmp_path_factory.mktemp("archive")
    slides = base / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "generated.svs", 3000, 2000, mpp=0.5, seed=11)
    shutil.copy(slides_dir / "cmu-1-small-region.svs", slides / "cmu-1-small-region.svs")
    shutil.copy(slides_dir / "broken.svs", slides / "corrupt.svs")
    torch.manual_seed(0)
    weights = base / "tiny-resnet18.safetensors"
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    return {"base": base, "slides": slides, "model": weights}


def start_server(home: Path) -> tuple[subprocess.Popen, dict]:
    """A real Prefect server (SQLite in ``home``, private PREFECT_HOME) on a free port, healthy;
    returns the process and the environment that points clients at it (also used by bench/)."""
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PWD": str(ROOT),  # prefect.yaml's pull step: this checkout
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # poll for the run at once, not every 10 s
    }
    log = home / "server.log"
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        _wait_until(lambda: _healthy(env), 180, "the Prefect server", log)  # minutes on 2 busy cores
    except BaseException:
        _stop(server)
        raise
    return server, env


def deploy_and_start_worker(env: dict, home: Path) -> subprocess.Popen:
    """Process pool, `prefect deploy --all` from prefect.yaml, and a worker on the pool."""
    _prefect(env, "work-pool", "create", "wsipipe", "--type", "process", "--overwrite")  # the session's server may have it
    deployed = _prefect(env, "--no-prompt", "deploy", "--all")
    assert "process-archive/nightly" in deployed and "process-slide/on-demand" in deployed
    home.mkdir(parents=True, exist_ok=True)
    return _start([str(BIN / "prefect"), "worker", "start", "--pool", "wsipipe"], env, home / "worker.log")


def run_deployment(env: dict, params: dict, name: str = "process-archive/nightly", watched: list | None = None) -> str:
    """The flow run's id; ``watched`` gets what `--watch` printed."""
    out = _prefect(env, "deployment", "run", name, "--params", json.dumps(params),
                   "--watch", "--watch-interval", "1", "--watch-timeout", "240", timeout=300,
                   check=False)  # exits non-zero when the run ends Failed; the state is checked below
    if watched is not None:
        watched.append(out)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out[-2000:]
    return match.group(1)


def _flow_run_artifacts(env: dict, flow_run_id: str) -> dict[str, dict]:
    arts = _api(env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in arts if a.get("key")}


@pytest.fixture(scope="module")
def deployed_runs(prefect_server, archive_dir):
    """Pool + deploy --all + worker, then the nightly deployment run twice over the archive."""
    env, home = prefect_server["env"], prefect_server["dir"] / "flows"  # this module's worker log
    worker = deploy_and_start_worker(env, home)
    out = archive_dir["base"] / "out-local"
    params = {"archive": str(archive_dir["slides"]), "out": str(out), "model": str(archive_dir["model"]),
              "overrides": TINY}
    watched: list[str] = []
    try:
        first = run_deployment(env, params, watched=watched)
        first_rows = json.loads((out / RESULTS_FILE).read_text())
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*") if p.name in ("summary.json", "patches.zarr")}
        stamps.update({p: p.stat().st_mtime_ns for p in out.glob("*/patches.zarr/*/zarr.json")})
        second = run_deployment(env, params, watched=watched)
        second_rows = json.loads((out / RESULTS_FILE).read_text())
        slide_params = {**params, "slide": str(archive_dir["slides"] / "generated.svs")}
        del slide_params["archive"]
        one = run_deployment(env, slide_params, "process-slide/on-demand", watched=watched)
        yield {"env": env, "out": out, "runs": (first, second), "rows": (first_rows, second_rows),
               "stamps": stamps, "slide_run": one, "watched": watched, "worker_log": home / "worker.log"}
    finally:
        _stop(worker)


def test_deployment_run_processes_good_slides_and_reports_the_corrupt_one(deployed_runs):
    env, out = deployed_runs["env"], deployed_runs["out"]
    first_id = deployed_runs["runs"][0]
    run = _api(env, f"/flow_runs/{first_id}")
    assert run["state"]["type"] == "FAILED"
    assert run["state"]["message"] == "3 slides: 2 ok, 0 skipped, 1 failed"
    deployment = _api(env, f"/deployments/{run['deployment_id']}")
    assert deployment["name"] == "nightly" and deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

    rows = {Path(r["slide"]).name: r for r in deployed_runs["rows"][0]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "generated.svs": "ok", "cmu-1-small-region.svs": "ok", "corrupt.svs": "failed"}
    assert "SlideOpenError" in rows["corrupt.svs"]["error"] and "corrupt.svs" in rows["corrupt.svs"]["error"]
    for name in ("generated.svs", "cmu-1-small-region.svs"):
        slide_dir = Path(rows[name]["out_dir"])
        assert all((slide_dir / f).is_file() for f in OUTPUT_FILES), sorted(os.listdir(slide_dir))
        group = store.open_store(slide_dir / "patches.zarr")
        assert all(store.is_complete(group, s) for s in ("tile", "infer", "stitch"))
        n = group["coords"].shape[0]
        summary = json.loads((slide_dir / "summary.json").read_text())
        assert n > 0 and group["probabilities"].shape == (n,) and summary["n_patches"] == n
        assert rows[name]["summary"]["slide"]["identity"] == summary["slide"]["identity"]

    # What the server holds: the archive's table artifact and one markdown artifact per slide.
    artifacts = _flow_run_artifacts(env, first_id)
    table = {Path(r["slide"]).name: r for r in json.loads(artifacts["wsipipe-archive"]["data"])}
    assert table["corrupt.svs"]["status"] == "failed" and "SlideOpenError" in table["corrupt.svs"]["error"]
    assert table["generated.svs"]["status"] == "ok" and table["generated.svs"]["patches"] > 0
    gen = rows["generated.svs"]["name"]
    slide_md = artifacts[f"wsipipe-slide-{gen}"]["data"]
    assert f"| patches | {rows['generated.svs']['summary']['n_patches']} |" in slide_md and "tumor.geojson" in slide_md
    assert "Error:" in artifacts["wsipipe-slide-corrupt"]["data"]
    # The QA reports: one per good slide, one for the archive, linked from an artifact.
    for name in ("generated.svs", "cmu-1-small-region.svs"):
        assert "slide score" in (Path(rows[name]["out_dir"]) / "report.html").read_text().lower()
    archive_html = (Path(out) / "archive-report.html").read_text()
    assert "corrupt.svs" in archive_html and "SlideOpenError" in archive_html
    report_md = artifacts["wsipipe-archive-report"]["data"]
    assert "archive-report.html" in report_md and "| 3 | 2 | 0 | 1 |" in report_md

    # Logs carry the slide and the stage.
    logs = _api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [first_id]}}, "limit": 200})
    assert any(f"slide={gen} stage=infer" in entry["message"] for entry in logs)


def test_failed_archive_runs_end_with_their_message_and_no_traceback(deployed_runs):
    """What the worker (and the flow processes it starts) and `prefect deployment run --watch`
    print for the two Failed archive runs and the Completed slide run: the final states, the
    runs' messages (the worker shows their logs), no traceback, no exception dumping the rows."""
    watched = deployed_runs["watched"]
    worker = deployed_runs["worker_log"].read_text(errors="replace")
    assert len(watched) == 3
    for text in (worker, *watched):
        assert "Traceback" not in text and "TypeError" not in text and "Unexpected result" not in text, text[-4000:]
    assert "finished in state 'Failed'" in watched[0] and "finished in state 'Failed'" in watched[1]
    assert "Completed" in watched[2]
    for message in ("3 slides: 2 ok, 0 skipped, 1 failed", "3 slides: 0 ok, 2 skipped, 1 failed"):
        assert message in worker, worker[-4000:]


def test_second_deployment_run_processes_nothing_new(deployed_runs):
    env = deployed_runs["env"]
    second_id = deployed_runs["runs"][1]
    run = _api(env, f"/flow_runs/{second_id}")
    assert run["state"]["type"] == "FAILED"  # the corrupt slide is still there and still reported
    assert run["state"]["message"] == "3 slides: 0 ok, 2 skipped, 1 failed"
    rows = {Path(r["slide"]).name: r["status"] for r in deployed_runs["rows"][1]}
    assert rows == {"generated.svs": "skipped", "cmu-1-small-region.svs": "skipped", "corrupt.svs": "failed"}
    # Nothing was rewritten: summaries and the stores' metadata keep their modification times.
    assert deployed_runs["stamps"] and all(p.stat().st_mtime_ns == t for p, t in deployed_runs["stamps"].items())
    table = json.loads(_flow_run_artifacts(env, second_id)["wsipipe-archive"]["data"])
    assert sorted(r["status"] for r in table) == ["failed", "skipped", "skipped"]
    # No task ran in the second run: every slide was decided from disk before any work (the
    # same query finds the first run's stage tasks).
    def stages(run_id: str) -> list[str]:
        tasks = _api(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 50})
        return [t["name"].split()[0] for t in tasks]

    assert {"tile", "infer", "stitch", "report"} <= set(stages(deployed_runs["runs"][0]))
    assert stages(second_id) == []
    logs = _api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": [second_id]}}, "limit": 200})
    assert sum("outputs up to date, skipped" in entry["message"] for entry in logs) == 2


def test_slide_deployment_reuses_complete_stages(deployed_runs):
    """process-slide/on-demand on an already processed slide: its stages run and find their outputs."""
    env, one = deployed_runs["env"], deployed_runs["slide_run"]
    run = _api(env, f"/flow_runs/{one}")
    assert run["state"]["type"] == "COMPLETED"
    tasks = _api(env, "/task_runs/filter", {"flow_runs": {"id": {"any_": [one]}}, "limit": 50})
    assert sorted(t["name"].split()[0] for t in tasks) == ["infer", "mil", "report", "stitch", "tile"]
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    assert all(p.stat().st_mtime_ns == t for p, t in deployed_runs["stamps"].items())  # nothing recomputed
    (key,) = [k for k in _flow_run_artifacts(env, one) if k.startswith("wsipipe-slide-generated")]
    assert "| patches |" in _flow_run_artifacts(env, one)[key]["data"]


def test_archive_on_dask_processes_matches_local_run(deployed_runs, archive_dir, tmp_path):
    """Same archive through `wsipipe archive --scheduler` on `dask scheduler` + 2 `dask worker`s."""
    env = deployed_runs["env"]
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = []
    try:
        procs.append(_start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                             "--no-dashboard"], env, tmp_path / "scheduler.log"))
        for i in range(2):
            procs.append(_start([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                 "--no-dashboard", "--name", f"w{i}"], env, tmp_path / f"worker{i}.log"))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            out = tmp_path / "out-dask"
            cmd = [str(BIN / "wsipipe"), "archive", str(archive_dir["slides"]), "--out", str(out),
                   "--model", str(archive_dir["model"]), "--scheduler", address,
                   *[f"--set={k}={v}" for k, v in TINY.items()]]
            done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
            assert done.returncode == 2, done.stdout + done.stderr  # the corrupt slide fails, the others don't
            assert "3 slides: 2 ok, 0 skipped, 1 failed" in done.stdout
            ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
            assert "wsipipe-tile" in ran  # the chunks were tiled on this cluster (key prefix of tiling's chunk tasks)
    finally:
        for p in reversed(procs):
            _stop(p)

    local = {r["name"]: r for r in deployed_runs["rows"][0] if r["status"] == "ok"}
    remote = {r["name"]: r for r in json.loads((out / RESULTS_FILE).read_text()) if r["status"] == "ok"}
    assert local.keys() == remote.keys() and len(local) == 2
    for name in local:
        a = store.open_store(Path(local[name]["out_dir"]) / "patches.zarr")
        b = store.open_store(Path(remote[name]["out_dir"]) / "patches.zarr")
        for array in ("coords", "patches", "tissue_fraction"):
            np.testing.assert_array_equal(a[array][:], b[array][:], err_msg=f"{name}/{array}")
        np.testing.assert_allclose(a["probabilities"][:], b["probabilities"][:], rtol=0, atol=1e-6)
        sa, sb = local[name]["summary"], remote[name]["summary"]
        for key in ("n_patches", "n_tumor_patches", "slide_score", "decision", "tumor_area_mm2", "n_tumor_regions"):
            assert sa[key] == sb[key], (name, key)


def test_stage_retries_only_transient_io_errors():
    """The retry condition of every stage: I/O hiccups retry; typed, timeout and other errors don't."""
    import asyncio

    from prefect.states import exception_to_failed_state

    from flows.slide import _transient
    from wsipipe.errors import SlideOpenError, SlideReadError

    def decided(exc: BaseException) -> bool:
        try:
            raise exc
        except BaseException as raised:
            return _transient(None, None, asyncio.run(exception_to_failed_state(raised)))

    assert decided(OSError(5, "Input/output error")) and decided(ConnectionResetError())
    assert not decided(SlideReadError("/s.svs", "corrupt tile")) and not decided(SlideOpenError("/s.svs", "not a slide"))
    assert not decided(TimeoutError("stage timed out")) and not decided(ValueError("bug"))


def _flow_run_ids(env: dict) -> set[str]:
    return {r["id"] for r in _api(env, "/flow_runs/filter", {"limit": 200})}


def test_archive_cli_logs_warnings_only_unless_verbose_and_skips_prefect_when_nothing_is_new(
    deployed_runs, archive_dir, tmp_path
):
    """`wsipipe archive` against the server, on a copy of the deployment's outputs with a new
    stitch threshold (a flow run: stitch reruns on a LocalCluster; tile and infer are reused, so
    the rows say skipped): the default prints warnings and errors only; --verbose brings back the
    INFO lines of wsipipe, Prefect and distributed, whose HTTP servers listen on the loopback. A
    rerun with nothing new starts no Prefect run and prints the same rows."""
    env = deployed_runs["env"]
    out = tmp_path / "out"
    shutil.copytree(deployed_runs["out"], out)

    def archive(*flags: str, threshold: float) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "wsipipe"), *flags, "archive", str(archive_dir["slides"]), "--out", str(out),
               "--model", str(archive_dir["model"]), *[f"--set={k}={v}" for k, v in TINY.items()],
               f"--set=stitch.threshold={threshold}"]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stdout + done.stderr  # the corrupt slide
        return done

    before = _flow_run_ids(env)
    quiet = archive(threshold=0.3)
    assert "3 slides: 0 ok, 2 skipped, 1 failed" in quiet.stdout
    assert len(_flow_run_ids(env) - before) == 1  # it ran the flow
    lines = quiet.stderr.splitlines()
    assert not [ln for ln in lines if "distributed." in ln or ln.startswith("INFO")], quiet.stderr
    assert "Traceback" not in quiet.stderr and "worker thread" not in quiet.stderr
    assert any("corrupt.svs" in ln for ln in lines) and len(lines) <= 6, quiet.stderr

    verbose = archive("--verbose", threshold=0.4)
    assert "3 slides: 0 ok, 2 skipped, 1 failed" in verbose.stdout
    assert "INFO distributed." in verbose.stderr and "stage=stitch" in verbose.stderr
    # distributed prints the thread cluster's inproc host in these lines, not where its HTTP
    # servers listen (the loopback: tests/test_cluster.py); the old default was port 8787.
    served = [ln for ln in verbose.stderr.splitlines() if "dashboard at" in ln]
    assert served and not [ln for ln in served if ":8787" in ln], served
    assert "worker thread" not in verbose.stderr and "Traceback" not in verbose.stderr

    runs = _flow_run_ids(env)
    again = archive(threshold=0.4)
    assert "3 slides: 0 ok, 2 skipped, 1 failed" in again.stdout and again.stderr == ""
    assert _flow_run_ids(env) == runs  # decided before Prefect: no flow run
    assert {r["status"] for r in json.loads((out / RESULTS_FILE).read_text())} == {"skipped", "failed"}
