"""The command line as a user meets it: real processes, real files, exit codes and stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WSIPIPE = [sys.executable, "-m", "wsipipe.cli"]


def run(*args, cwd=None, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*WSIPIPE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.mark.parametrize("cmd", ["synth", "tile", "infer", "stitch", "run", "demo"])
def test_help_explains_every_option(cmd):
    res = run(cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout and "--help" in res.stdout


def _broken_inputs(slides_dir: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    data = (slides_dir / "cmu-1-small-region.svs").read_bytes()
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(data[: len(data) // 3])
    return [
        (slides_dir / "broken.svs", "not a slide format"),
        (slides_dir / "openslide-fixtures" / "unopenable.tiff", "Unsupported TIFF compression"),
        (slides_dir / "openslide-fixtures" / "unreadable.svs", "failed"),
        (slides_dir / "pathml-small_dicom.dcm", "image flavor"),
        (slides_dir / "pathml-smalltif.tif", "not a slide format"),
        (slides_dir / "kidney-48-5.tif", "not a slide format"),
        (slides_dir / "tcga-cr-7395-01a-01-ts1.svs", "mpp"),
        (truncated, ""),
        (tmp_path / "missing.svs", "file not found"),
    ]


def test_bad_inputs_one_clear_line_and_nothing_marked_complete(slides_dir, tmp_path):
    from wsipipe.tiles import store

    for i, (path, problem) in enumerate(_broken_inputs(slides_dir, tmp_path)):
        out = tmp_path / f"out{i}.zarr"
        res = run("tile", path, "--out", out, "--min-tissue", "0")
        assert res.returncode not in (0, 1), (path, res.returncode, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, (path, res.stderr)
        assert str(path) in lines[0] and problem in lines[0], lines[0]
        assert "Traceback" not in res.stderr
        if (out / "zarr.json").exists():
            assert not store.is_complete(store.open_store(out), "tile"), path


def test_invalid_option_names_field_and_value(slides_dir, tmp_path):
    res = run("tile", slides_dir / "cmu-1-small-region.svs", "--out", tmp_path / "x.zarr", "--patch-size", "-5")
    assert res.returncode == 2
    assert "tile.patch_size=-5" in res.stderr
    assert not (tmp_path / "x.zarr").exists()  # failed before any work


def test_tile_then_rerun(slides_dir, tmp_path):
    out = tmp_path / "cmu.zarr"
    first = run("tile", slides_dir / "cmu-1-small-region.svs", "--out", out)
    assert first.returncode == 0, first.stderr
    assert "patches" in first.stdout
    again = run("tile", slides_dir / "cmu-1-small-region.svs", "--out", out)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_debug_shows_traceback(slides_dir, tmp_path):
    res = run("--debug", "tile", slides_dir / "broken.svs", "--out", tmp_path / "b.zarr")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_stage_commands_and_run_with_a_failing_slide(slides_dir, tmp_path):
    """tile -> infer -> stitch as separate commands, then `run` over a good and a broken slide."""
    import json

    from wsipipe.models.model import build_model, save_weights

    weights = tmp_path / "w.safetensors"
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    good = slides_dir / "cmu-1-small-region.svs"
    store_path = tmp_path / "cmu.zarr"
    assert run("tile", good, "--out", store_path).returncode == 0
    res = run("infer", store_path, "--model", weights)
    assert res.returncode == 0, res.stderr
    res = run("stitch", store_path, "--out", tmp_path / "stitched")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "stitched" / "summary.json").read_text())
    assert summary["n_patches"] > 0 and summary["provenance"]["model"]["sha256"]

    res = run("run", good, slides_dir / "broken.svs", "--model", weights, "--out", tmp_path / "runs")
    assert res.returncode == 2
    assert "1 of 2 slides failed" in res.stderr and "broken.svs" in res.stderr
    outputs = list((tmp_path / "runs").glob("cmu-1-small-region-*/summary.json"))
    assert len(outputs) == 1 and json.loads(outputs[0].read_text())["slide"]["name"] == good.name
