"""One slide job, every runner: `wsipipe run` (in process), `wsipipe run --scheduler` (Dask
worker processes on 127.0.0.1) and the Prefect flow `process-slide` (ephemeral, private
PREFECT_HOME) give the same outputs for the same slide, and each holds the slide folder's
lock: while this test holds it, every runner reports that it waits and writes nothing."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsipipe.config import DaskConfig
from wsipipe.locks import LOCK_NAME, folder_lock
from wsipipe.models.model import build_model, save_weights
from wsipipe.run.cluster import local_cluster
from wsipipe.run.names import slide_output_name
from wsipipe.slides.slide import open_slide
from wsipipe.slides.synth import write_synthetic_slide
from wsipipe.tiles import store

ROOT = Path(__file__).resolve().parents[1]
WAITING = "stage=lock: another run is writing it; waiting"

# Each runner in its own process, with the lock module's log on stderr (the line that says
# it found the slide folder locked and waits).
PRELUDE = """
import logging, sys
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
for name in ("wsipipe.locks", "wsipipe.run.job"):
    logging.getLogger(name).addHandler(handler)
    logging.getLogger(name).setLevel(logging.INFO)
"""
CLI = PRELUDE + "from wsipipe.cli import main\nsys.argv[0] = 'wsipipe'\nmain()\n"
FLOW = PRELUDE + """
import json
from flows.slide import process_slide
slide, out, model, config = sys.argv[1:5]
state = process_slide(slide, out, model=model, config=config, return_state=True)
print("ROW " + json.dumps({"type": state.type.value, "row": state.result(raise_on_failure=False)}, default=str))
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runners-in")
    slide = write_synthetic_slide(tmp / "s.svs", 3000, 2400, mpp=0.5, seed=3, n_tissue=1, n_tumor=1).path
    torch.manual_seed(0)
    weights = tmp / "tiny.safetensors"
    save_weights(build_model("mobilenet_v3_small", 1).eval(), weights, "mobilenet_v3_small", 1)  # cheap on CPU
    config = tmp / "cpu.yaml"
    config.write_text("inference:\n  device: cpu\n  precision: fp32\n  batch_size: 32\n")
    with open_slide(slide) as opened:
        name = slide_output_name(slide, opened.identity)
    return slide, weights, config, name


def _normalised(summary: dict, out_root: Path) -> dict:
    """summary.json without what differs between runs by nature: timings and paths."""
    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items() if k not in ("seconds", "images_per_s") and not k.endswith("_s")}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str):
            return value.replace(str(out_root), "<out>")
        return value

    return walk(summary)


def _features(path: Path) -> dict:
    """The GeoJSON without its features' ids (a fresh UUID per write, as QuPath expects)."""
    collection = json.loads(path.read_text())
    collection["features"] = [{k: v for k, v in f.items() if k != "id"} for f in collection["features"]]
    assert collection["features"], path
    return collection


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before waiting on the lock:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never waited on the slide lock:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.timeout(600)
def test_every_runner_holds_the_slide_lock_and_gives_the_same_outputs(inputs, tmp_path):
    slide, weights, config, name = inputs
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with local_cluster(DaskConfig(num_workers=2), processes=True) as cluster:
        run = ["run", str(slide), "--model", str(weights), "--config", str(config), "--out"]
        commands = {
            "direct": [sys.executable, "-c", CLI, *run, str(tmp_path / "direct")],
            "scheduler": [sys.executable, "-c", CLI, *run, str(tmp_path / "scheduler"), "--scheduler", cluster.scheduler_address],
            "prefect": [sys.executable, "-c", FLOW, str(slide), str(tmp_path / "prefect"), str(weights), str(config)],
        }
        slide_dirs = {runner: tmp_path / runner / name for runner in commands}
        procs, logs = {}, {}
        with contextlib.ExitStack() as stack:
            for runner, cmd in commands.items():
                stack.enter_context(folder_lock(slide_dirs[runner]))  # held by this test process
                logs[runner] = tmp_path / f"{runner}.log"
                out = stack.enter_context(open(logs[runner], "w"))
                procs[runner] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            for runner, proc in procs.items():
                _wait_for(proc, logs[runner], WAITING, timeout=240)
            time.sleep(1.0)  # a runner that went past the lock would be writing by now
            for runner, slide_dir in slide_dirs.items():
                assert procs[runner].poll() is None, runner
                assert [p.name for p in slide_dir.iterdir()] == [LOCK_NAME], (runner, list(slide_dir.iterdir()))
        # Released: each runner goes on and finishes.
        for runner, proc in procs.items():
            assert proc.wait(timeout=400) == 0, f"{runner}:\n{logs[runner].read_text()[-4000:]}"
    for runner in commands:
        assert "waited" in logs[runner].read_text(), runner  # run_job: "waited N s for another run writing it"
    flow_row = json.loads(next(line[4:] for line in logs["prefect"].read_text().splitlines() if line.startswith("ROW ")))
    assert flow_row["type"] == "COMPLETED" and flow_row["row"]["status"] == "ok" and flow_row["row"]["name"] == name

    ref = slide_dirs["direct"]
    ref_summary = _normalised(json.loads((ref / "summary.json").read_text()), tmp_path / "direct")
    ref_probs = store.array(store.open_store(ref / "patches.zarr"), "probabilities")[:]
    assert ref_summary["n_patches"] > 20
    for runner in ("scheduler", "prefect"):
        other = slide_dirs[runner]
        summary = _normalised(json.loads((other / "summary.json").read_text()), tmp_path / runner)
        assert summary == ref_summary, runner
        for file in ("tumor_mask.png", "heatmap.png"):
            assert (other / file).read_bytes() == (ref / file).read_bytes(), (runner, file)
        assert _features(other / "tumor.geojson") == _features(ref / "tumor.geojson"), runner
        np.testing.assert_array_equal(np.load(other / "heatmap.npy"), np.load(ref / "heatmap.npy"))
        np.testing.assert_array_equal(store.array(store.open_store(other / "patches.zarr"), "probabilities")[:], ref_probs)



def _full_disk(job):
    raise OSError(errno.ENOSPC, "No space left on device", str(job.slide_dir / "heatmap.png"))


def test_a_full_disk_is_an_output_write_error_where_any_runner_runs_a_stage_and_is_never_retried(tmp_path):
    """run_stage is what every runner calls (in process, in a Prefect task, on a Dask worker)."""
    import asyncio

    from prefect.states import exception_to_failed_state

    from flows.slide import _transient
    from wsipipe.config import load_config
    from wsipipe.errors import OutputWriteError
    from wsipipe.run.job import SlideJob, Stage, run_stage

    job = SlideJob(tmp_path / "s.svs", tmp_path / "out" / "s-1", load_config(None), tmp_path / "w.safetensors")
    with pytest.raises(OutputWriteError, match="heatmap.png.*cannot write output") as raised:
        run_stage(Stage("stitch", _full_disk), job)
    assert not _transient(None, None, asyncio.run(exception_to_failed_state(raised.value)))
