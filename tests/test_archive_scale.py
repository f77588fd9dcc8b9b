"""The nightly deployment over an archive of 11 small slides (some corrupt), for real: a
Prefect server on 127.0.0.1, a process work pool and worker, `prefect deployment run`,
SIGKILL of the worker and the flow-run process mid-run, a new worker, a rerun. Every good
slide ends done exactly once and equal to an uninterrupted run, every corrupt slide failed
with its error, no temporary file is left. bench/bench_archive_scale.py is the same at 1 000."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archive_scale import (
    CORRUPT_KINDS, check_exactly_once, compare_outputs, interrupted, kill_mid_run, make_archive, start_worker,
    submit_deployment, tiny_model, wait_flow_run,
)
from test_flows import _api, _stop, deploy_and_start_worker, run_deployment
from wsipipe.run.archive import RESULTS_FILE, archive_message

pytestmark = pytest.mark.slow

N = 11  # 5 good slides and one of each corrupt kind
OVERRIDES = {"tile.mpp": 1.0, "tile.patch_size": 64, "dask.num_workers": 1, "orchestration.slides_in_flight": 2}


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory, prefect_server):
    base = tmp_path_factory.mktemp("archive-scale")
    archive = make_archive(base / "slides", N, 2048, 1536, processes=2)
    model = tiny_model(base / "tiny-resnet18.safetensors")

    env, home = prefect_server["env"], base / "prefect"  # the session's server; this module's worker logs
    worker = None
    out = base / "out"
    params = {"archive": str(archive.folder), "out": str(out), "model": str(model), "overrides": OVERRIDES}
    try:
        worker = deploy_and_start_worker(env, home)
        killed_id = submit_deployment(env, params)
        done_before = kill_mid_run(env, worker, killed_id, out, after_done=max(2, len(archive.good) // 3), timeout=400)
        cut = interrupted(archive, out)
        worker = start_worker(env, home / "worker.log")
        rerun_id = run_deployment(env, params)
        rerun = wait_flow_run(env, rerun_id, 60)
        killed = _api(env, f"/flow_runs/{killed_id}")
        # The uninterrupted outputs, from `wsipipe run`'s own path (no Prefect) in this process:
        # the slides cut by the kill, the first slide done before it and the last good slide.
        from wsipipe.config import load_config
        from wsipipe.run.pipeline import run_slides

        first_done = next(s for s in archive.good if str(s) in done_before)
        compared = sorted({*cut, first_done, archive.good[-1]})
        reference = base / "reference"
        ref_rows = run_slides(compared, reference, load_config(None, OVERRIDES), model)
        assert all(r.status == "ok" for r in ref_rows), [r.error for r in ref_rows if r.status != "ok"]
        yield {"archive": archive, "out": out, "reference": reference, "compared": compared, "done_before": done_before,
               "rerun": rerun, "killed": killed, "rows": json.loads((out / RESULTS_FILE).read_text()),
               "worker_log": (home / "worker.log").read_text(errors="replace")}
    finally:
        _stop(worker)


def test_the_archive_has_each_kind_of_corrupt_slide(scale_run):
    archive = scale_run["archive"]
    assert len(archive.slides) == N and sorted(set(archive.corrupt.values())) == sorted(CORRUPT_KINDS)


def test_killed_run_then_rerun_processes_every_good_slide_exactly_once(scale_run):
    archive, rows, done_before = scale_run["archive"], scale_run["rows"], scale_run["done_before"]
    assert 0 < len(done_before) < len(archive.good)  # the kill came mid-run
    assert scale_run["killed"]["state"]["type"] not in ("COMPLETED", "FAILED")  # the killed run never finished
    assert check_exactly_once(archive, scale_run["out"], rows, done_before) == []
    statuses = {r["slide"]: r["status"] for r in rows}
    assert sum(statuses[s] == "skipped" for s in done_before) == len(done_before)
    # The rerun's final state names the counts; failed because the corrupt slides still are.
    state = scale_run["rerun"]["state"]
    assert state["type"] == "FAILED" and state["message"] == archive_message(rows)
    assert f"{len(archive.corrupt)} failed" in state["message"]


def test_outputs_after_the_kill_equal_an_uninterrupted_run(scale_run):
    assert compare_outputs(scale_run["reference"], scale_run["out"], scale_run["compared"]) == []


def test_corrupt_slides_fail_with_their_own_error(scale_run):
    rows = {Path(r["slide"]).name: r for r in scale_run["rows"]}
    for slide, kind in scale_run["archive"].corrupt.items():
        row = rows[slide.name]
        assert row["status"] == "failed" and str(slide) in row["error"], row
        assert (CORRUPT_KINDS[kind] or "Error") in row["error"], (kind, row["error"])


def test_worker_output_has_no_traceback(scale_run):
    # A failed slide is a row and the run's Failed state, not a traceback in the worker's log.
    assert "Traceback" not in scale_run["worker_log"], scale_run["worker_log"][-3000:]
