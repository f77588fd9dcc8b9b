"""`wsipipe run` over several slides overlaps them: slide n+1 tiles while slide n infers, the
model loaded once, each stage kind one slide at a time; outputs identical to one-at-a-time runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsipipe.config import load_config
from wsipipe.models.model import build_model, save_weights
from wsipipe.run.pipeline import StageEvent, run_slide, run_slides
from wsipipe.slides.synth import write_synthetic_slide
from wsipipe.tiles import store

ROOT = Path(__file__).resolve().parents[1]
CPU = {"inference.device": "cpu", "inference.precision": "fp32", "inference.batch_size": 32}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overlap-in")
    slides = [write_synthetic_slide(tmp / f"s{seed}.svs", 3000, 2400, mpp=0.5, seed=seed, n_tissue=1, n_tumor=1).path
              for seed in (3, 4, 5)]
    torch.manual_seed(0)
    weights = tmp / "tiny.safetensors"
    save_weights(build_model("mobilenet_v3_small", 1).eval(), weights, "mobilenet_v3_small", 1)  # cheap on CPU
    config = tmp / "cpu.yaml"
    config.write_text("inference:\n  device: cpu\n  precision: fp32\n  batch_size: 32\n")
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
        assert slide.name in res.stdout
