"""wsipipe.run.archive without Prefect: scanning, manifests, the on-disk done check, result rows
and the artifact text the flows publish."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from wsipipe.run import archive
from wsipipe.config import load_config
from wsipipe.errors import ConfigError, SlideOpenError
from wsipipe.models.model import build_model, load_model, save_weights
from wsipipe.run.names import weights_path
from wsipipe.run.pipeline import run_slide
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


def test_scan_glob_and_single_file(tmp_path):
    a = _touch(tmp_path / "x" / "a.svs")
    _touch(tmp_path / "x" / "b.tiff")
    assert archive.scan_archive(str(tmp_path / "**" / "*.svs")) == [a]
    assert archive.scan_archive(a) == [a]
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
    assert archive.scan_archive(manifest) == [manifest.parent / "../s/one.svs", absolute]
    bad = tmp_path / "bad.csv"
    bad.write_text("case,stain\nc1,HE\n")
    with pytest.raises(ConfigError, match=r"bad\.csv.*no slide column"):
        archive.read_manifest(bad)
    with pytest.raises(ConfigError, match="manifest not found"):
        archive.read_manifest(tmp_path / "none.csv")


def test_rows_counts_message_and_artifacts():
    ok = archive.result_row("/a/x.svs", "ok", name="x-1", out_dir="/o/x-1", seconds=1.23456,
                            summary={"n_patches": 12, "slide_score": {"top_k_mean": 0.8, "max": 0.9},
                                     "decision": "tumor", "tumor_area_mm2": 1.5, "seconds": {"tile": 2.0},
                                     "files": {"summary": "summary.json"}, "store": "/o/x-1/patches.zarr"})
    failed = archive.result_row("/a/y.svs", "failed", error=SlideOpenError("/a/y.svs", "not a slide\nsecond line"))
    skipped = archive.result_row("/a/z.svs", "skipped", name="z-2", out_dir="/o/z-2")
    rows = [ok, failed, skipped]
    assert set(ok) == {"slide", "name", "status", "error", "out_dir", "summary", "seconds"}
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
    assert not archive.any_to_compute([slide], out, cfg, info)

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
    assert not archive.any_to_compute([tmp_path / "corrupt.svs"], out, cfg, info)  # fails before tiling
    assert archive.any_to_compute([tmp_path / "corrupt.svs", slide], out, cfg, info)  # heatmap.png is gone


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
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["archive-report.html", archive.RESULTS_FILE]
    assert not list(out.glob("unreadable*"))
    (row,) = archive.read_results(out)
    assert row["status"] == "failed" and "unreadable.svs" in row["error"] and row["out_dir"] is None
