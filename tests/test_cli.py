"""The command line as a user meets it: real processes, real files, exit codes and stderr."""

from __future__ import annotations

import json
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
        assert res.stderr.startswith("wsipipe error: "), (path, res.stderr)  # no empty line first, one prefix
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


def test_stage_commands_and_run_with_a_failing_slide(slides_dir, tmp_path, json_run):
    """tile -> infer -> stitch as separate commands; `run` over a good and a broken slide (json_run)."""
    weights = json_run["weights"]
    good = slides_dir / "cmu-1-small-region.svs"
    store_path = tmp_path / "cmu.zarr"
    assert run("tile", good, "--out", store_path).returncode == 0
    res = run("infer", store_path, "--model", weights)
    assert res.returncode == 0, res.stderr
    res = run("stitch", store_path, "--out", tmp_path / "stitched")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "stitched" / "summary.json").read_text())
    assert summary["n_patches"] > 0 and summary["provenance"]["model"]["sha256"]

    res = json_run["res"]
    assert res.returncode == 2
    assert "1 of 2 slides failed" in res.stderr and "broken.svs" in res.stderr
    outputs = list(json_run["out"].glob("cmu-1-small-region-*/summary.json"))
    assert len(outputs) == 1 and json.loads(outputs[0].read_text())["slide"]["name"] == good.name


# ------------------------------------------------ outputs a colleague can read, rows a script can read

RUN_SETS = ["--set", "export.ome_tiff_mask=true", "--set", "qc.report_patches=2"]  # every kind of output, a small report


def _umasked(umask: str, *args, columns: int = 60):
    """The real command under ``umask`` (the shell sets it, as a user's login does), piped, narrow."""
    import shlex

    env = {**os.environ, "COLUMNS": str(columns)}
    line = " ".join(shlex.quote(str(a)) for a in [*WSIPIPE, *args])
    return subprocess.run(["sh", "-c", f"umask {umask} && exec {line}"], capture_output=True, text=True, timeout=300, env=env)


def _modes(root: Path) -> dict[str, set[str]]:
    """Permission bits of everything under ``root`` (itself included): {"f": {...}, "d": {...}}."""
    found: dict[str, set[str]] = {"f": set(), "d": {oct(root.stat().st_mode & 0o777)}}
    for path in root.rglob("*"):
        found["d" if path.is_dir() else "f"].add(oct(path.stat().st_mode & 0o777))
    return found


@pytest.fixture(scope="module")
def json_run(tmp_path_factory, slides_dir):
    """One real `wsipipe run --json` over a good and a broken slide, under umask 027, stdout piped."""
    from wsipipe.models.model import build_model, save_weights

    tmp = tmp_path_factory.mktemp("json-run")
    weights = tmp / "w.safetensors"
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    out = tmp / "out"
    good, broken = slides_dir / "cmu-1-small-region.svs", slides_dir / "broken.svs"
    res = _umasked("027", "run", good, broken, "--model", weights, "--out", out, "--mpp", "2", "--json", *RUN_SETS)
    return {"res": res, "out": out, "weights": weights, "good": good, "broken": broken}


def test_run_json_rows_and_outputs_readable_as_the_umask_says(json_run):
    res, out = json_run["res"], json_run["out"]
    assert res.returncode == 2, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]  # nothing but JSON lines on stdout
    assert [(Path(r["slide"]).name, r["status"]) for r in rows] == [("cmu-1-small-region.svs", "ok"), ("broken.svs", "failed")]
    ok, failed = rows
    assert Path(ok["out_dir"]).parent == out and ok["decision"] in ("tumor", "normal") and ok["error"] is None
    assert ok["slide_score"]["top_k_mean"] is not None and ok["tumor_area_mm2"] is not None
    assert "tissue_small" in ok["qc_flags"] and ok["needs_review"] is True
    assert failed["out_dir"] is None and "broken.svs" in failed["error"] and "not a slide format" in failed["error"]
    assert "1 of 2 slides failed" in res.stderr
    slide_dir = Path(ok["out_dir"])
    written = {p.name for p in slide_dir.iterdir()}
    assert {"heatmap.png", "heatmap.npy", "report.html", "summary.json", "tumor.geojson", "heatmap.ome.zarr",
            "tumor_mask.ome.tif", "patches.zarr"} <= written, written
    # umask 027: group may read, others nothing; no file left private (mkstemp's 0600, mkdtemp's 0700).
    assert _modes(out) == {"f": {"0o640"}, "d": {"0o750"}}


def _summary_line(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if "decision" in ln]
    return line


def test_stitch_under_umask_022_and_summaries_unwrapped_in_a_pipe(json_run):
    """A second writer (stitch) under another umask: files 0644, folders 0755; its summary line is
    one line on a 60-column pipe (rich wrapped it at the width before)."""
    import shutil

    (store_path,) = json_run["out"].glob("cmu-1-small-region-*/patches.zarr")
    store_path = Path(shutil.copytree(store_path, json_run["out"].parent / "copy.zarr"))  # stitch marks its store
    out = json_run["out"].parent / "restitched"
    res = _umasked("022", "stitch", store_path, "--out", out, "--threshold", "0.3", *RUN_SETS)
    assert res.returncode == 0, res.stderr
    assert _modes(out) == {"f": {"0o644"}, "d": {"0o755"}}
    line = _summary_line(res.stdout)
    assert len(line) > 60 and "(top-k mean" in line and "tumor area" in line, res.stdout
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.3  # --threshold reaches stitch


def _cli(*args):
    from typer.testing import CliRunner

    from wsipipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _tree(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_other_resolution_is_refused_without_force_and_dry_run_says_why(json_run):
    """A rerun into the same --out at another level-0 mpp names both and changes nothing; a model
    or threshold change is an ordinary rerun; --dry-run writes nothing and says why per slide."""
    out, good, weights = json_run["out"], json_run["good"], json_run["weights"]
    common = ["--model", weights, "--out", out, "--mpp", "2", *RUN_SETS]
    before = _tree(out)
    res = _cli("run", good, *common, "--mpp-override", "0.25")
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"wsipipe error: {out}/cmu-1-small-region-"), line
    assert "mpp 0.499 (file) at tile.mpp 2" in line and "this run asks mpp 0.25 (override)" in line and "--force" in line

    def verdicts(*extra):
        res = _cli("run", good, json_run["broken"], *common, "--dry-run", *extra)
        assert res.exit_code == 0, res.output
        return [ln.split("  ")[0] for ln in res.stdout.splitlines()]

    skip, fail = verdicts()
    assert skip == "would skip (up to date)"
    assert fail.startswith(f"would fail (SlideOpenError: {json_run['broken']}: not a slide format OpenSlide can read")
    conflict = verdicts("--mpp-override", "0.25")[0]
    assert conflict.startswith("would fail (ResolutionConflict: ") and "mpp 0.25 (override)" in conflict
    assert verdicts("--mpp-override", "0.25", "--force")[0] == "would process (changed: slide file or tissue/tile settings)"
    assert verdicts("--threshold", "0.9")[0].startswith("would process (changed: outputs")
    assert verdicts("--mpp-override", "0.499")[0].startswith("would process (")  # the file's own mpp: not refused
    assert verdicts("--mpp", "4")[0].startswith("would process (changed: ")
    assert _tree(out) == before
    # The real process: a dry run decides without torch, Prefect or Dask's distributed.
    code = (
        "import json, sys\nfrom wsipipe.cli import main\n"
        f"sys.argv = ['wsipipe', 'run', {str(good)!r}, '--model', {str(weights)!r}, '--out', {str(out)!r}, '--dry-run', "
        f"'--mpp', '2', {', '.join(map(repr, RUN_SETS))}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print(json.dumps([m for m in ('torch', 'prefect', 'distributed') if m in sys.modules]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("would skip (up to date)") and res.stdout.splitlines()[-1] == "[]", res.stdout


def test_tile_into_a_store_of_another_resolution_needs_force(slides_dir, tmp_path):
    store_path = tmp_path / "t.zarr"
    slide = slides_dir / "cmu-1-small-region.svs"
    assert _cli("tile", slide, "--out", store_path, "--mpp", "2").exit_code == 0
    res = _cli("tile", slide, "--out", store_path, "--mpp", "2", "--mpp-override", "0.8")
    assert res.exit_code == 2 and "holds a result made with mpp 0.499 (file)" in res.stderr, res.output
    res = _cli("tile", slide, "--out", store_path, "--mpp", "2", "--mpp-override", "0.8", "--force")
    assert res.exit_code == 0, res.output
    from wsipipe.tiles import store

    assert store.meta(store.open_store(store_path))["slide"]["mpp"] == 0.8


def test_no_tissue_has_the_one_error_prefix_and_exit_3(tmp_path):
    from wsipipe.slides.synth import write_synthetic_slide

    glass = write_synthetic_slide(tmp_path / "glass.svs", 3000, 2000, seed=1, n_tissue=0, n_tumor=0).path
    res = _cli("tile", glass, "--out", tmp_path / "glass.zarr")
    assert res.exit_code == 3, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"wsipipe error: {glass}") and "no tissue" in line


def test_config_show_names_where_each_value_came_from(tmp_path):
    import yaml

    from wsipipe.config import load_config

    config = tmp_path / "site.yaml"
    config.write_text("tile:\n  mpp: 1.0\nqc:\n  mpp_range: [0.2, 3.0]\n")
    res = _cli("config", "show", "--config", config, "--set", "tile.mpp=2", "--set", "mpp_default=0.25")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "  mpp: 2.0  # from --set" in lines and "mpp_default: 0.25  # from --set" in lines
    assert "  mpp_range: [0.2, 3.0]  # from site.yaml" in lines and "  patch_size: 224  # default" in lines
    assert "mpp_override: null  # default" in lines
    assert load_config(None, yaml.safe_load(res.stdout)) == load_config(config, {"tile.mpp": 2, "mpp_default": 0.25})
    shown = json.loads(_cli("config", "show", "--config", config, "--json").stdout)
    assert shown["tile.mpp"] == {"value": 1.0, "source": "from site.yaml"}
    assert shown["stitch.threshold"] == {"value": None, "source": "default"}
