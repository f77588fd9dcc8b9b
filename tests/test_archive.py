"""wsipipe.run.archive: scanning, manifests and their per-slide columns, the on-disk done check,
result rows and their timestamps, the folder's index, the artifact text the flows publish; and
`wsipipe archive` / `wsipipe run` through the CLI for per-slide mpp and the missing-mpp hint."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from wsipipe.run import archive
from wsipipe.config import load_config
from wsipipe.errors import ConfigError, MissingMppError, SlideOpenError
from wsipipe.models.model import build_model, load_model, save_weights
from wsipipe.run.names import weights_path
from wsipipe.run.pipeline import run_slide
from wsipipe.run.plan import decide
from wsipipe.slides.synth import write_synthetic_slide

TINY = {"tile.mpp": 2.0, "tile.patch_size": 64, "dask.num_workers": 1}


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_scan_folder_recursive_filters_and_dedupes_dicom(tmp_path):
    a = _touch(tmp_path / "b" / "a.svs")
    c = _touch(tmp_path / "c.NDPI")
    d1 = _touch(tmp_path / "dicom" / "1.dcm")
    _touch(tmp_path / "dicom" / "2.dcm")  # same slide as 1.dcm
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.svs")
    assert archive.scan_archive(tmp_path) == sorted([a, c, d1])


def test_scan_glob_and_single_file(tmp_path, monkeypatch):
    a = _touch(tmp_path / "x" / "a.svs")
    _touch(tmp_path / "x" / "b.tiff")
    assert archive.scan_archive(str(tmp_path / "**" / "*.svs")) == [a]
    assert archive.scan_archive(a) == [a]
    # Given relative, slides are still named absolutely (rows read the same from any folder).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.csv").write_text("slide\nx/a.svs\n")
    for source in ("x/*.svs", "x/a.svs", "m.csv", "./x/../x/a.svs"):
        assert archive.scan_archive(source) == [a], source
    assert archive.scan_archive("x") == [a, tmp_path / "x" / "b.tiff"]
    with pytest.raises(ConfigError, match="archive not found"):
        archive.scan_archive(tmp_path / "missing")


def test_manifest_relative_paths_comments_and_missing_files(tmp_path):
    manifest = tmp_path / "lists" / "batch.csv"
    manifest.parent.mkdir()
    absolute = _touch(tmp_path / "abs.svs")
    manifest.write_text(
        "case,Slide,stain\n# comment line\nc1,../s/one.svs,HE\n\nc2," + str(absolute) + ",HE\nc1,../s/one.svs,HE\n"
    )
    # Missing files are kept: they become failed rows naming the file, never a silent gap.
    assert archive.scan_archive(manifest) == [tmp_path / "s" / "one.svs", absolute]
    bad = tmp_path / "bad.csv"
    bad.write_text("case,stain\nc1,HE\n")
    with pytest.raises(ConfigError, match=r"bad\.csv.*no slide column"):
        archive.read_manifest(bad)
    with pytest.raises(ConfigError, match="manifest not found"):
        archive.read_manifest(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match=r"empty\.csv: manifest is empty"):
        archive.read_manifest(tmp_path / "empty.csv")


def test_rows_counts_message_and_artifacts():
    ok = archive.result_row("/a/x.svs", "ok", name="x-1", out_dir="/o/x-1", seconds=1.23456,
                            summary={"n_patches": 12, "slide_score": {"top_k_mean": 0.8, "max": 0.9},
                                     "decision": "tumor", "tumor_area_mm2": 1.5, "seconds": {"tile": 2.0},
                                     "files": {"summary": "summary.json"}, "store": "/o/x-1/patches.zarr"})
    failed = archive.result_row("/a/y.svs", "failed", error=SlideOpenError("/a/y.svs", "not a slide\nsecond line"))
    skipped = archive.result_row("/a/z.svs", "skipped", name="z-2", out_dir="/o/z-2")
    rows = [ok, failed, skipped]
    assert set(ok) == {"slide", "name", "status", "error", "out_dir", "summary", "seconds", "started", "finished"}
    assert failed["error"] == "SlideOpenError: /a/y.svs: not a slide second line" and ok["seconds"] == 1.235
    assert archive.status_counts(rows) == {"ok": 1, "skipped": 1, "failed": 1}
    assert archive.archive_message(rows) == "3 slides: 1 ok, 1 skipped, 1 failed"
    with pytest.raises(ValueError, match="status"):
        archive.result_row("/a", "done")

    table = archive.archive_table(rows)
    assert [r["status"] for r in table] == ["ok", "failed", "skipped"]
    assert table[0]["patches"] == 12 and table[0]["tumor_area_mm2"] == 1.5 and table[1]["error"].startswith("SlideOpen")
    md = archive.slide_markdown(ok)
    assert "| patches | 12 |" in md and "| tile seconds | 2.0 |" in md and "/o/x-1/summary.json" in md
    assert "not a slide" in archive.slide_markdown(failed)
    assert archive.artifact_key("wsipipe-slide", "CMU_1.small-3f2a") == "wsipipe-slide-cmu-1-small-3f2a"


def test_parse_overrides_and_config_field_errors():
    assert archive.parse_overrides(["tile.mpp=1.0", "dask.scheduler_address=tcp://h:8786", "model.arch=resnet18"]) == {
        "tile.mpp": 1.0, "dask.scheduler_address": "tcp://h:8786", "model.arch": "resnet18"}
    assert archive.parse_overrides({"tile.mpp": 2}) == {"tile.mpp": 2} and archive.parse_overrides(None) == {}
    with pytest.raises(ConfigError, match="FIELD=VALUE"):
        archive.parse_overrides(["tile.mpp"])
    with pytest.raises(ConfigError, match="orchestration.slides_in_flight"):
        load_config(None, {"orchestration.slides_in_flight": 0})
    with pytest.raises(ConfigError, match="model.weights"):
        weights_path(None, load_config(None, {"train.registry": "/nonexistent/registry"}))


def test_weights_default_to_the_registry_production_model(tmp_path):
    """No --model and no model.weights: the version promoted in the registry is what runs."""
    from wsipipe.models.model import build_model, file_sha256, save_weights
    from wsipipe.learn.registry import promote, register

    trained = tmp_path / "trained"
    save_weights(build_model("resnet18", 1), trained / "model.safetensors", "resnet18", 1)
    card = {"arch": "resnet18", "num_classes": 1, "test_metrics": {"auc": 0.9}, "test_split_id": "s",
            "weights_sha256": file_sha256(trained / "model.safetensors")}
    (trained / "card.json").write_text(json.dumps(card))
    registry = tmp_path / "models"
    cfg = load_config(None, {"train.registry": str(registry)})
    with pytest.raises(ConfigError, match="promote a model"):
        weights_path(None, cfg)  # registered nothing yet
    version = register(registry, trained)
    with pytest.raises(ConfigError):
        weights_path(None, cfg)  # registered, not promoted
    promote(registry, version)
    assert weights_path(None, cfg) == registry / version / "model.safetensors"
    assert weights_path(tmp_path / "explicit.safetensors", cfg) == tmp_path / "explicit.safetensors"


def test_results_file_roundtrip(tmp_path):
    rows = [archive.result_row("/a/x.svs", "skipped", name="x")]
    archive.write_results(rows, tmp_path)
    assert archive.read_results(tmp_path) == rows


def test_done_outputs_follows_slide_config_and_model_on_disk(tmp_path, slides_dir):
    slide = write_synthetic_slide(tmp_path / "s.svs", 3000, 2000, mpp=0.5, seed=5).path
    torch.manual_seed(0)
    weights = tmp_path / "m.safetensors"
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    _, info = load_model(weights)
    cfg = load_config(None, TINY)
    out = tmp_path / "out"

    assert archive.done_outputs(slide, out, cfg, info) is None  # nothing yet
    result = run_slide(slide, out, cfg, weights)
    done = archive.done_outputs(slide, out, cfg, info)
    assert done is not None and done[0] == result.out_dir and done[1] == result.summary
    assert [r.status if r else None for r in decide([slide], out, cfg, info)] == ["skipped"]

    # A fresh load of everything from disk (new process state) agrees.
    assert archive.done_outputs(slide, out, load_config(None, TINY), load_model(weights)[1]) is not None
    # Other tile settings, stitch settings or model: not done.
    assert archive.done_outputs(slide, out, load_config(None, {**TINY, "tile.patch_size": 48}), info) is None
    assert archive.done_outputs(slide, out, load_config(None, {**TINY, "stitch.threshold": 0.3}), info) is None
    torch.manual_seed(1)
    other = save_weights(build_model("resnet18", 1), tmp_path / "m2.safetensors", "resnet18", 1)
    assert archive.done_outputs(slide, out, cfg, other) is None
    # Settings that change no output (batch size, Dask, orchestration) keep it done.
    same = load_config(None, {**TINY, "inference.batch_size": 7, "dask.num_workers": 2,
                              "orchestration.slides_in_flight": 5})
    assert archive.done_outputs(slide, out, same, info) is not None
    # A missing output file: not done.
    os.remove(result.out_dir / "heatmap.png")
    assert archive.done_outputs(slide, out, cfg, info) is None
    # A corrupt file raises its own typed error (the flow records it as a failed row).
    shutil.copy(slides_dir / "broken.svs", tmp_path / "corrupt.svs")
    with pytest.raises(SlideOpenError, match="corrupt.svs"):
        archive.done_outputs(tmp_path / "corrupt.svs", out, cfg, info)
    # Decided before any work: the corrupt slide fails, the slide missing heatmap.png is to process.
    failed, todo = decide([tmp_path / "corrupt.svs", slide], out, cfg, info)
    assert failed is not None and failed.status == "failed" and "corrupt.svs" in (failed.error or "")
    assert todo is None


# --------------------------------------------------------------------------- per-slide manifest columns


def test_manifest_mpp_column_sets_each_slides_mpp_override(tmp_path, caplog):
    manifest = tmp_path / "m.csv"
    manifest.write_text("case,Slide,MPP,stain\nc1,a.svs,0.25,HE\nc2,b.svs,,HE\n# note\nc3,c.svs, 0.5 ,HE\nc1,a.svs,0.25,HE\n")
    a, b, c = (tmp_path / n for n in ("a.svs", "b.svs", "c.svs"))
    assert archive.scan_archive(manifest) == [a, b, c]
    with caplog.at_level(logging.INFO, logger="wsipipe.run.archive"):
        settings = archive.archive_settings(manifest)
    assert settings == {a: {"mpp_override": 0.25}, c: {"mpp_override": 0.5}}  # an empty cell: none
    assert [r.getMessage() for r in caplog.records] == [f"{manifest}: columns ignored: case, stain (per-slide columns: mpp)"]
    assert archive.archive_settings(tmp_path) == {} and archive.archive_settings(str(tmp_path / "*.svs")) == {}

    everyone = load_config(None, {"mpp_override": 0.3})  # --set mpp_override=0.3: every slide without its own
    assert archive.slide_config(everyone, settings.get(a)).mpp_override == 0.25
    assert archive.slide_config(everyone, settings.get(b)) is everyone and everyone.mpp_override == 0.3


@pytest.mark.parametrize("cell", ["abc", "0", "-0.5", "inf", "5000", "0.25um"])
def test_manifest_bad_mpp_names_manifest_row_and_column(tmp_path, cell):
    bad = tmp_path / "bad.csv"
    bad.write_text(f"slide,mpp\nx.svs,0.5\n\ny.svs,{cell}\n")
    with pytest.raises(ConfigError, match=rf"bad\.csv: row 4, column 'mpp': '{re.escape(cell)}'"):
        archive.archive_settings(bad)


def test_manifest_same_slide_with_two_resolutions_is_an_error(tmp_path):
    bad = tmp_path / "twice.csv"
    bad.write_text("slide,mpp\nx.svs,0.5\nx.svs,0.25\n")
    with pytest.raises(ConfigError, match=r"twice\.csv: row 3: x\.svs is listed again \(first in row 2\)"):
        archive.archive_settings(bad)


def test_missing_mpp_hint_follows_the_command():
    error = MissingMppError("/s/x.svs", "no resolution in the file")
    assert "--mpp-override" in str(error)  # wsipipe run / tile
    hinted = archive.archive_error(error)
    assert isinstance(hinted, MissingMppError) and str(hinted).startswith("/s/x.svs: no resolution in the file; ")
    assert "mpp column" in str(hinted) and "--mpp-default" in str(hinted)
    assert str(pickle.loads(pickle.dumps(hinted))) == str(hinted)  # crosses Dask/Prefect boundaries whole
    other = SlideOpenError("/s/y.svs", "not a slide")
    assert archive.archive_error(other) is other


# --------------------------------------------------------------------------- timestamps and the index


def test_rows_carry_wall_clock_timestamps():
    end = datetime(2026, 1, 31, 2, 0, 5, tzinfo=UTC)
    row = archive.result_row("/a/x.svs", "ok", seconds=5.5, finished=end)
    assert row["started"] == "2026-01-31T01:59:59.500+00:00" and row["finished"] == "2026-01-31T02:00:05.000+00:00"
    before = datetime.now(UTC)
    row = archive.result_row("/a/x.svs", "failed", error="boom", seconds=2.0)
    after = datetime.now(UTC)
    started, finished = datetime.fromisoformat(row["started"]), datetime.fromisoformat(row["finished"])
    assert before - timedelta(milliseconds=1) <= finished <= after and finished - started == timedelta(seconds=2)
    old = {k: v for k, v in row.items() if k not in ("started", "finished")}  # a row of an older run
    assert archive.SlideResult.of(old).started is None and archive.SlideResult.of(old).as_dict()["finished"] is None


T0 = datetime(2026, 1, 31, 2, 0, tzinfo=UTC)


def fake_outputs(out, name, slide, decision="tumor", score=0.9):
    """A slide output folder as the pipeline leaves it, for the index: summary.json and report.html."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"slide": {"path": str(slide), "name": Path(slide).name}, "decision": decision,
               "slide_score": {"top_k_mean": score}, "tumor_area_mm2": 1.5,
               "qc": {"flags": [{"code": "tissue_small"}], "needs_review": True}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "report.html").write_text("<!DOCTYPE html><title>slide</title>")
    return folder, summary


def row_at(out, slide, status, minutes, seconds=30.0):
    """A row of ``slide`` finishing ``minutes`` after T0; ok/skipped rows point at its output folder."""
    name = Path(slide).stem
    if status == "failed":
        return archive.result_row(slide, "failed", error=f"SlideOpenError: {slide}: boom", seconds=seconds,
                                  finished=T0 + timedelta(minutes=minutes))
    folder, summary = fake_outputs(out, name, slide)
    return archive.result_row(slide, status, name=name, out_dir=folder, summary=summary, seconds=seconds,
                              finished=T0 + timedelta(minutes=minutes))


def test_index_merges_runs_over_different_subsets(tmp_path):
    out = tmp_path / "out"
    a, b, c, d = (str(tmp_path / "slides" / f"{n}.svs") for n in "abcd")
    archive.write_archive_files([row_at(out, a, "ok", 1), row_at(out, b, "ok", 2), row_at(out, c, "failed", 3)], out)
    archive.write_archive_files([row_at(out, a, "skipped", 61), row_at(out, c, "ok", 62), row_at(out, d, "failed", 63)], out)
    assert len(archive.read_results(out)) == 3  # the last run's rows only
    index = {e["slide"]: e for e in archive.read_index(out)}
    assert list(index) == sorted([a, b, c, d])  # the union, one entry per slide path
    assert {k: e["status"] for k, e in index.items()} == {a: "skipped", b: "ok", c: "ok", d: "failed"}
    stamp = lambda m: (T0 + timedelta(minutes=m)).isoformat(timespec="milliseconds")  # noqa: E731
    # skipped: the latest status, yet the output computed in the first run stays linked and current
    assert index[a]["when"] == stamp(61) and index[a]["processed"] == stamp(1) and index[a]["current"]
    assert index[a]["out_dir"] == str(out / "a") and index[a]["decision"] == "tumor" and index[a]["flags"] == ["tissue_small"]
    assert index[c]["processed"] == stamp(62) and index[c]["error"] is None and index[c]["current"]
    assert index[d]["out_dir"] is None and index[d]["processed"] is None and "boom" in index[d]["error"]

    # b fails later: its earlier output stays linked, marked as not current.
    archive.write_archive_files([row_at(out, b, "failed", 120)], out)
    # An overlapping run finishing its older rows last does not hide the newer status.
    archive.write_archive_files([row_at(out, c, "failed", 50)], out)
    index = {e["slide"]: e for e in archive.read_index(out)}
    assert index[b]["status"] == "failed" and index[b]["out_dir"] == str(out / "b") and not index[b]["current"]
    assert index[b]["processed"] == stamp(2) and index[b]["decision"] == "tumor"
    assert index[c]["status"] == "ok" and index[c]["when"] == stamp(62)
    page = (out / "archive-index.html").read_text()
    assert page.count('<a href="b/report.html">open</a> <span class="stale">earlier run</span>') == 1
    assert '<a href="a/report.html">open</a></td>' in page


def test_corrupt_or_missing_index_is_rebuilt_from_slide_folders(tmp_path, caplog):
    out = tmp_path / "out"
    fake_outputs(out, "old-1", tmp_path / "old.svs")  # processed before the index existed
    fake_outputs(out, "older-2", tmp_path / "older.svs")
    (out / "junk").mkdir()
    (out / "junk" / "summary.json").write_text("{not json")
    new = str(tmp_path / "new.svs")
    archive.write_archive_files([row_at(out, new, "ok", 1)], out)
    assert [e["slide"] for e in archive.read_index(out)] == sorted([str(tmp_path / "old.svs"), str(tmp_path / "older.svs"), new])
    (out / archive.INDEX_FILE).write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING, logger="wsipipe.run.archive"):
        archive.write_archive_files([row_at(out, new, "skipped", 5)], out)
    assert [r.getMessage() for r in caplog.records] == [
        f"{out / archive.INDEX_FILE}: unreadable or not an index; rebuilt from 3 slide folders' summary.json"]
    index = {e["slide"]: e for e in archive.read_index(out)}
    assert len(index) == 3 and index[new]["status"] == "skipped" and index[new]["current"]
    assert index[str(tmp_path / "old.svs")]["out_dir"] == str(out / "old-1")


# --------------------------------------------------------------------------- through the CLI

WSIPIPE = [sys.executable, "-m", "wsipipe.cli"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "m.safetensors"
    save_weights(build_model("resnet18", 1), path, "resnet18", 1)
    return path


def cli(*args, timeout=600):
    env = {**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*WSIPIPE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_run_without_mpp_hints_at_mpp_override(slides_dir, tmp_path, tiny_weights):
    res = cli("run", slides_dir / "tcga-cr-7395-01a-01-ts1.svs", "--out", tmp_path / "o", "--model", tiny_weights)
    assert res.returncode == 2, res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "tcga-cr-7395-01a-01-ts1.svs: no resolution in the file" in line and "--mpp-override" in line
    assert "manifest" not in line and "unexpected" not in line


def test_archive_bad_manifest_value_fails_before_any_work(tmp_path, tiny_weights):
    manifest = tmp_path / "batch.csv"
    manifest.write_text("slide,mpp\na.svs,0.5\nb.svs,fast\n")
    res = cli("archive", manifest, "--out", tmp_path / "o", "--model", tiny_weights, timeout=120)
    assert res.returncode == 2 and not (tmp_path / "o").exists(), res.stdout + res.stderr
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert f"{manifest}: row 3, column 'mpp': 'fast'" in line and "unexpected" not in line


def test_archive_per_slide_mpp_hint_and_index_through_the_cli(slides_dir, tmp_path, tiny_weights, monkeypatch):
    """One `wsipipe archive` over a manifest: the slide given an mpp cell is processed at that
    mpp, the same slide without one fails with the archive's hint (not run's --mpp-override),
    and the folder's index adds this run's slides to an earlier run's. Then --dry-run, and the
    slide at another mpp: refused unless --force."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", slides / "given.svs")
    shutil.copy(slides_dir / "tcga-cr-7395-01a-01-ts1.svs", slides / "nompp.svs")
    shutil.copy(slides_dir / "broken.svs", slides / "broken.svs")
    (slides / "batch.csv").write_text("slide,mpp,case\ngiven.svs,0.25,c1\nnompp.svs,,c2\nbroken.svs,,c3\n")
    out = tmp_path / "out"
    earlier = str(slides / "earlier.svs")
    archive.write_archive_files([row_at(out, earlier, "ok", 1)], out)  # an earlier run of another subset

    res = cli("archive", slides / "batch.csv", "--out", out, "--model", tiny_weights, *[f"--set={k}={v}" for k, v in TINY.items()])
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "3 slides: 1 ok, 0 skipped, 2 failed" in res.stdout
    rows = {Path(r["slide"]).name: r for r in archive.read_results(out)}
    hint = rows["nompp.svs"]["error"]
    assert hint.startswith(f"MissingMppError: {slides / 'nompp.svs'}: no resolution in the file")
    assert "add an mpp column" in hint and "--mpp-override" not in hint
    assert hint in " ".join(res.stdout.split())  # the CLI prints the row's error
    summary = json.loads((Path(rows["given.svs"]["out_dir"]) / "summary.json").read_text())
    assert summary["slide"]["mpp"] == 0.25 and "mpp_override" in [f["code"] for f in summary["qc"]["flags"]]
    report = (out / "archive-report.html").read_text()
    assert "1 processed in" in report and 'href="archive-index.html"' in report

    index = {Path(e["slide"]).name: e for e in archive.read_index(out)}
    assert {n: e["status"] for n, e in index.items()} == {
        "earlier.svs": "ok", "given.svs": "ok", "nompp.svs": "failed", "broken.svs": "failed"}
    assert index["given.svs"]["out_dir"] == rows["given.svs"]["out_dir"] and index["given.svs"]["current"]
    assert index["earlier.svs"]["out_dir"] == str(out / "earlier")

    # In-process from here (each decided before any Prefect run): --dry-run says what a rerun
    # would do and writes nothing; the same slide at another mpp is refused unless --force.
    from typer.testing import CliRunner

    from wsipipe.cli import app

    def invoke(*args):
        sets = [f"--set={k}={v}" for k, v in TINY.items()]
        return CliRunner().invoke(app, ["archive", *map(str, args), "--out", str(out), "--model", str(tiny_weights), *sets],
                                  env={"COLUMNS": "250"})

    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("*")}
    res = invoke(slides / "batch.csv", "--dry-run")
    assert res.exit_code == 0, res.output
    verdicts = {Path(line.split("  ")[-1]).name: line.split("  ")[0] for line in res.stdout.splitlines()}
    assert verdicts["given.svs"] == "would skip (up to date)", verdicts
    assert verdicts["nompp.svs"].startswith("would fail (MissingMppError: ") and "add an mpp column" in verdicts["nompp.svs"]
    assert verdicts["broken.svs"].startswith("would fail (SlideOpenError: ")
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("*")} == before

    (slides / "other.csv").write_text("slide,mpp\ngiven.svs,0.3\nbroken.svs,\n")
    monkeypatch.chdir(slides)  # a relative manifest: the rows still name slides absolutely
    res = invoke("other.csv")
    assert res.exit_code == 2, res.output
    rows = {Path(r["slide"]).name: r for r in archive.read_results(out)}
    assert rows["given.svs"]["slide"] == str(slides / "given.svs") and rows["given.svs"]["status"] == "failed"
    error = rows["given.svs"]["error"]
    assert error.startswith("ResolutionConflict: ") and "mpp 0.25 (override)" in error and "mpp 0.3 (override)" in error
    assert json.loads((Path(index["given.svs"]["out_dir"]) / "summary.json").read_text())["slide"]["mpp"] == 0.25
    res = invoke("other.csv", "--dry-run", "--force")
    assert res.stdout.splitlines()[0].startswith("would process (changed: "), res.output


def test_unreadable_slide_leaves_no_output_folder_through_the_cli(tmp_path, slides_dir):
    """A slide OpenSlide opens but whose tiles do not decode fails as one line naming it, before
    any folder, lock or store of its own exists: through `wsipipe run` and `wsipipe archive`
    (which decides it without starting Prefect or loading the model)."""
    import subprocess
    import sys
    from pathlib import Path

    wsipipe = Path(sys.executable).parent / "wsipipe"
    slide = tmp_path / "slides" / "unreadable.svs"
    slide.parent.mkdir()
    shutil.copy(slides_dir / "openslide-fixtures" / "unreadable.svs", slide)
    torch.manual_seed(0)
    weights = save_weights(build_model("resnet18", 1), tmp_path / "m.safetensors", "resnet18", 1).path

    run_out = tmp_path / "run-out"
    done = subprocess.run([str(wsipipe), "run", str(slide), "--out", str(run_out), "--model", str(weights)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SlideReadError" not in done.stderr and "unreadable.svs" in done.stderr and "unexpected" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not run_out.exists()

    out = tmp_path / "archive-out"
    done = subprocess.run([str(wsipipe), "archive", str(slide.parent), "--out", str(out), "--model", str(weights)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "1 slides: 0 ok, 0 skipped, 1 failed" in done.stdout and "SlideReadError" in done.stdout
    # The run's report and rows and the folder's index: no slide folder, no store, no lock file.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["archive-report.html", archive.RESULTS_FILE, "archive-index.html", archive.INDEX_FILE])
    assert not list(out.glob("unreadable*"))
    (row,) = archive.read_results(out)
    assert row["status"] == "failed" and "unreadable.svs" in row["error"] and row["out_dir"] is None
