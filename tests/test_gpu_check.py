"""bench/gpu_check.sh --cpu-smoke: the one-shot GPU check runs end to end on the CPU, so the script
a GPU machine runs once cannot rot unnoticed. Every section of its JSON is there, with sane values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a minute of subprocesses: make test runs it, make test-fast leaves it out

SECTIONS = ("install", "cuda_tests", "decode", "inference", "embedding", "end_to_end")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, slides_dir) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "gpu-check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"wrote {out}" in res.stdout and "wsipipe GPU check (cpu-smoke)" in res.stdout
    return json.loads(out.read_text())


def test_every_section_is_there_and_says_what_it_did(smoke):
    assert smoke["mode"] == "cpu-smoke" and smoke["plan"]["device"] == "cpu"
    for name in SECTIONS:
        assert smoke[name]["status"] in {"ok", "partial", "skipped", "passed"}, (name, smoke[name])
        assert smoke[name]["section_seconds"] >= 0
    # What needs CUDA is skipped with a note, never silently.
    assert smoke["install"]["status"] == "skipped" and "current interpreter" in smoke["install"]["note"]
    assert smoke["install"]["python"] == sys.executable and smoke["install"]["torch"]
    assert smoke["cuda_tests"]["status"] == "skipped" and "GPU" in smoke["cuda_tests"]["note"]
    assert 0 < smoke["seconds"] < 600


def test_device_decode_is_exact_on_the_cpu(smoke):
    rows = [r for r in smoke["decode"]["rows"] if r["status"] == "ok"]
    assert {r["slide"] for r in rows} >= {"mosaic-0.svs", "cmu-1-small-region.svs"}
    for r in rows:
        assert r["colour_agrees"] and r["tiles"] > 0
        assert (r["max_abs_diff"], r["mean_abs_diff"]) == (0, 0.0)  # libjpeg-turbo both ways
        assert r["device_tiles_per_s"] > 0 and r["cpu_one_thread_tiles_per_s"] > 0


def test_inference_rows_compare_the_store_with_the_model_alone(smoke):
    rows = smoke["inference"]["rows"]
    methods = {r["method"] for r in rows}
    assert {"model alone (in-memory tensors)", "wsipipe infer_store (Zarr -> probabilities)",
            "model alone, NCHW (no channels_last)"} <= methods
    for r in rows:
        assert r["median"] > 0 and r["ratio_vs_model"] > 0 and r["batch"] == 8
    assert smoke["inference"]["machine"]["gpu"] is None


def test_embedding_is_measured_next_to_inference_on_the_same_store(smoke):
    emb = smoke["embedding"]
    assert emb["status"] == "ok" and emb["patches"] == 16 and emb["batch"] == 8, emb
    assert min(emb["embed_patches_per_s"] + emb["infer_patches_per_s"]) > 0 and emb["embed_vs_infer"] > 0


def test_end_to_end_runs_the_pipeline_on_generated_slides(smoke):
    e2e = smoke["end_to_end"]
    assert len(e2e["slides"]) == 2
    for s in e2e["slides"]:
        assert s["mpp"] == 0.25 and 0.05 < s["tissue_fraction"] < 0.9 and s["bytes"] > 0
    rows = {r["variant"]: r for r in e2e["rows"]}
    assert set(rows) == {"two-stage", "fused, tile.decode cpu", "fused, tile.decode device"}
    two = rows["two-stage"]
    assert two["status"] == "ok", two
    assert two["slides"] == 2 and two["patches"] > 0 and two["slides_per_hour"] > 0
    assert two["peak_gpu_memory_mib"] is None  # no nvidia-smi here
    for r in rows.values():  # each row ran, or says why not
        assert r["status"] == "ok" or r["note"], r
