"""`wsipipe run` over several slides overlaps them: slide n+1 tiles while slide n infers, the
model loaded once, each stage kind one slide at a time; outputs identical to one-at-a-time runs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from wsipipe.config import load_config
from wsipipe.models.model import build_model, save_weights
from wsipipe.run.job import direct
from wsipipe.run.pipeline import StageEvent, run_slide, run_slides
from wsipipe.slides.synth import write_synthetic_slide
from wsipipe.tiles import store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap-in")
    slides = [write_synthetic_slide(tmp / f"s{seed}.svs", 2400, 1800, mpp=0.5, seed=seed, n_tissue=1, n_tumor=1).path
              for seed in (3, 4, 5)]
    torch.manual_seed(0)
    weights = tmp / "tiny.safetensors"
    save_weights(build_model("mobilenet_v3_small", 1).eval(), weights, "mobilenet_v3_small", 1)  # cheap on CPU
    config = tmp / "cpu.yaml"
    # Small patches at 1 µm/px: every stage runs for real, in a fraction of the default's time.
    config.write_text("tile:\n  mpp: 1.0\n  patch_size: 64\ninference:\n  device: cpu\n  precision: fp32\n  batch_size: 32\n")
    return slides, weights, config


def _normalised(value, out_root: Path):
    """summary.json without what differs between runs by nature: timings and paths."""
    if isinstance(value, dict):
        return {k: _normalised(v, out_root) for k, v in value.items()
                if k not in ("seconds", "images_per_s") and not k.endswith("_s")}
    if isinstance(value, list):
        return [_normalised(v, out_root) for v in value]
    return value.replace(str(out_root), "<out>") if isinstance(value, str) else value


def _outputs(slide_dir: Path) -> dict:
    """What a slide's run decides: probabilities, mask and heatmap bytes, the normalised summary."""
    summary = _normalised(json.loads((slide_dir / "summary.json").read_text()), slide_dir.parent)
    probs = store.array(store.open_store(slide_dir / "patches.zarr"), "probabilities")[:]
    return {"summary": json.dumps(summary, sort_keys=True), "probs": probs.tobytes(),
            **{f: (slide_dir / f).read_bytes() for f in ("tumor_mask.png", "heatmap.png")}}


def _span(events: list[StageEvent], slide: str, stage: str) -> tuple[int, int]:
    at = [i for i, e in enumerate(events) if e.slide == slide and e.stage == stage]
    assert [events[i].edge for i in at] == ["start", "end"], (slide, stage, events)
    return at[0], at[1]


@pytest.mark.timeout(600)
def test_slides_overlap_and_match_one_at_a_time(inputs, tmp_path):
    slides, weights, config = inputs
    cfg = load_config(config, {"orchestration.slides_in_flight": 2})
    events: list[StageEvent] = []
    rows = run_slides(slides, tmp_path / "overlap", cfg, weights, events=events)
    assert [r.status for r in rows] == ["ok"] * 3, [r.error for r in rows]
    assert [Path(r.slide) for r in rows] == slides

    # One slide at a time through each stage kind ...
    for stage in ("tile", "infer"):
        edges = [e.edge for e in events if e.stage == stage]
        assert edges == ["start", "end"] * len(slides), (stage, edges)
    # ... and the second slide's tiling began before the first one finished inferring.
    first, second = [e.slide for e in events if e.stage == "tile" and e.edge == "start"][:2]
    assert _span(events, second, "tile")[0] < _span(events, first, "infer")[1], events

    for slide, row in zip(slides, rows, strict=True):
        alone = run_slide(slide, tmp_path / "alone", cfg, weights).out_dir
        assert _outputs(Path(row.out_dir)) == _outputs(alone), slide.name


@pytest.mark.timeout(600)
def test_cli_run_over_slides_with_one_broken(inputs, tmp_path, slides_dir):
    """The command: summaries per slide, a broken slide a failure line, the others' outputs written."""
    slides, weights, config = inputs
    broken = slides_dir / "broken.svs"
    args = [sys.executable, "-m", "wsipipe.cli", "run", slides[0], broken, slides[1], "--model", weights,
            "--out", tmp_path / "out", "-c", config]
    res = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=500, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert "1 of 3 slides failed" in res.stderr and "broken.svs" in res.stderr and "Traceback" not in res.stderr
    for slide in (slides[0], slides[1]):
        (done,) = (tmp_path / "out").glob(f"{slide.stem}-*/summary.json")
        assert json.loads(done.read_text())["slide"]["name"] == slide.name
    # Summaries and folders printed in the slides' order; the failure names the broken file.
    assert -1 < res.stdout.find(f"{slides[0].name}:") < res.stdout.find(f"{slides[1].name}:"), res.stdout
    (failed,) = [line for line in res.stderr.splitlines() if line.startswith("failed: ")]
    assert str(broken) in failed, res.stderr


def test_the_next_slide_tiles_while_one_infers(inputs, tmp_path):
    """An ordering property, not a timing: slide 1's inference waits until slide 2's tiling has
    started. Were the slides run one after the other, slide 2 would never start tiling and this
    would fail."""
    slides, weights, config = inputs
    second_tiling = threading.Event()

    def runner(stage, job):
        if (job.slide, stage.name) == (slides[1], "tile"):
            second_tiling.set()
        if (job.slide, stage.name) == (slides[0], "infer"):
            assert second_tiling.wait(timeout=120), "slide 2 never started tiling while slide 1 was about to infer"
        return direct(stage, job)

    cfg = load_config(config, {"orchestration.slides_in_flight": 2})
    rows = run_slides(slides[:2], tmp_path / "out", cfg, weights, runner=runner)
    assert [r.status for r in rows] == ["ok", "ok"], [r.error for r in rows]


def test_rows_come_back_in_order_as_each_slide_is_done(inputs, tmp_path):
    slides, weights, config = inputs
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    done: list[tuple[str, str, str | None]] = []
    rows = run_slides([slides[0], empty, slides[1]], tmp_path / "out", load_config(config), weights,
                      on_done=lambda row, exc: done.append((Path(row.slide).name, row.status, type(exc).__name__ if exc else None)))
    assert [(Path(r.slide).name, r.status) for r in rows] == [(slides[0].name, "ok"), ("empty.svs", "failed"), (slides[1].name, "ok")]
    assert done == [(slides[0].name, "ok", None), ("empty.svs", "failed", "SlideOpenError"), (slides[1].name, "ok", None)]
    assert "empty.svs" in (rows[1].error or "")
