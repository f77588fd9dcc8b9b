"""Slides end to end in this process (tile -> infer -> stitch -> report), and the embedded demo.

Thin orchestration over the stage modules; the CLI and the Prefect flows call these.
:func:`run_slides` overlaps slides: up to ``orchestration.slides_in_flight`` slide jobs at
once, each stage kind behind its own gate (:class:`GatedRunner`), so slide n+1 tiles while
slide n infers, and no two slides tile or run the model at the same time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from wsipipe.config import PipelineConfig
from wsipipe.run.job import STAGES, Runner, SlideJob, Stage, StageOutcome, StageProgress, direct, output_dir, run_job
from wsipipe.run.names import weights_path
from wsipipe.run.rows import SlideResult
from wsipipe.tiles import store

__all__ = ["GatedRunner", "SlideOutputs", "StageEvent", "StageProgress", "add_ground_truth_dice", "run_demo", "run_slide",
           "run_slides"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOutputs:
    out_dir: Path
    store: Path
    summary: dict


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig,
    model_path: str | Path | None = None,
    client=None,
    progress: StageProgress | None = None,
) -> SlideOutputs:
    """Tile, classify and stitch one slide into ``out_dir/<name>-<id>/``, then write its report.html
    (the slide job of wsipipe.run.job, every stage in this process).

    Each stage is skipped when its outputs exist for the same inputs, so a rerun is cheap."""
    from wsipipe.models.inference import resolve_device, resolve_precision
    from wsipipe.models.model import load_model

    slide_path = Path(slide_path)
    weights = weights_path(model_path, cfg)
    # Fail fast on bad weights or architecture, before any tiling work.
    net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    resolve_precision(cfg.inference.precision, resolve_device(cfg.inference.device))
    job = SlideJob(slide_path, output_dir(slide_path, out_dir, cfg), cfg, weights, net, info, client=client, progress=progress)
    row = run_job(job, direct)
    log.info("%s: done in %.1f s -> %s", slide_path.name, row.seconds, job.slide_dir)
    return SlideOutputs(out_dir=job.slide_dir, store=job.store, summary=row.summary or {})


@dataclass(frozen=True)
class StageEvent:
    """A stage of one slide starting or ending, in the order the gated runner saw them."""

    slide: str  # the slide's output folder name
    stage: str
    edge: str  # "start" | "end"


@dataclass
class GatedRunner:
    """A runner over ``inner`` (default :func:`direct`) that lets one slide at a time through
    each stage kind: the tile stage uses every core and the infer stage owns the accelerator,
    so two slides never tile or infer at once, while one slide's tiling overlaps another's
    inference. ``events``, when given, receives a :class:`StageEvent` as each stage starts
    (gate held) and ends."""

    inner: Runner = direct
    events: list[StageEvent] | None = None
    _gates: dict[str, threading.Lock] = field(default_factory=lambda: {s.name: threading.Lock() for s in STAGES})
    _record: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stage: Stage, job: SlideJob) -> StageOutcome:
        with self._gates.setdefault(stage.name, threading.Lock()):
            self._event(job, stage, "start")
            try:
                return self.inner(stage, job)
            finally:
                self._event(job, stage, "end")

    def _event(self, job: SlideJob, stage: Stage, edge: str) -> None:
        if self.events is not None:
            with self._record:
                self.events.append(StageEvent(job.name, stage.name, edge))


def run_slides(
    slides: Sequence[str | Path],
    out_dir: str | Path,
    cfg: PipelineConfig,
    model_path: str | Path | None = None,
    progress: Callable[[Path], StageProgress | None] | None = None,
    events: list[StageEvent] | None = None,
) -> list[SlideResult]:
    """Every slide's job in this process, up to ``cfg.orchestration.slides_in_flight`` at once
    through one :class:`GatedRunner`; one row per slide, in the order given.

    The model is loaded once (a bad weights file fails here, before any work) and shared: the
    infer gate keeps its use to one slide at a time. A slide that fails is a ``failed`` row
    with its one-line error; the others go on. ``progress(slide)``: the slide's stage
    callback (the CLI labels its bars with the slide). ``events``: see :class:`GatedRunner`."""
    from wsipipe.models.inference import resolve_device, resolve_precision
    from wsipipe.models.model import load_model

    weights = weights_path(model_path, cfg)
    net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    resolve_precision(cfg.inference.precision, resolve_device(cfg.inference.device))
    runner = GatedRunner(events=events)

    def one(slide: Path) -> SlideResult:
        t0 = time.perf_counter()
        slide_dir = None
        try:
            slide_dir = output_dir(slide, out_dir, cfg)
            job = SlideJob(slide, slide_dir, cfg, weights, net, info, progress=progress(slide) if progress else None)
            row = run_job(job, runner)
            log.info("%s: done in %.1f s -> %s", slide.name, row.seconds, slide_dir)
            return row
        except Exception as exc:  # one bad slide (or a bug in it) is a row, not the end of the batch
            log.debug("%s failed", slide, exc_info=True)
            return SlideResult.make(slide, "failed", name=slide_dir.name if slide_dir else None, error=exc,
                                    out_dir=slide_dir, seconds=time.perf_counter() - t0)

    paths = [Path(s) for s in slides]
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(len(paths), cfg.orchestration.slides_in_flight)) as pool:
        return list(pool.map(one, paths))


def add_ground_truth_dice(slide_dir: Path, geojson_path: Path) -> dict:
    """Dice of the predicted tumor polygons against a ground-truth GeoJSON, added to summary.json."""
    from shapely.geometry import MultiPolygon

    from wsipipe.geojson import read_geojson

    from wsipipe.files import write_atomic
    from wsipipe.geometry import dice

    truth = read_geojson(geojson_path).get("Tumor", MultiPolygon())
    predicted = read_geojson(slide_dir / "tumor.geojson").get("Tumor", MultiPolygon())
    summary_path = slide_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["ground_truth"] = {"geojson": str(geojson_path), "tumor_dice": round(dice(predicted, truth), 4)}
    write_atomic(summary_path, json.dumps(summary, indent=2))
    return summary


def train_demo_model(
    slide_path: Path, geojson_path: Path, work_dir: Path, cfg: PipelineConfig, epochs: int = 3,
    progress: StageProgress | None = None,
) -> Path:
    """Fit the classifier on labelled patches of one generated slide; returns the weights file."""
    import numpy as np

    from wsipipe.geojson import read_geojson
    from wsipipe.models.model import save_weights
    from wsipipe.tiles.tiling import read_store_patches, tile_slide
    from wsipipe.learn.train import fit_classifier, label_patches

    store_path = work_dir / "train-patches.zarr"
    tile_slide(slide_path, store_path, cfg, progress=(lambda d, n: progress("tile (train)", d, n)) if progress else None)
    group = store.open_store(store_path)
    meta = store.meta(group)["tile"]
    tumor = read_geojson(geojson_path)["Tumor"]
    labels = label_patches(np.asarray(store.array(group, "coords")[:]), meta["patch_size_l0"], tumor)
    keep = np.flatnonzero(labels >= 0)
    patches = read_store_patches(group, keep, store_path)  # stored, or from the slide (tile.store_patches: false)
    model = fit_classifier(
        patches, labels[keep], arch=cfg.model.arch_for_training, num_classes=cfg.model.num_classes or 1, epochs=epochs,
        progress=(lambda d, n: progress("train", d, n)) if progress else None,
    )
    arch = cfg.model.arch_for_training
    weights = work_dir / f"demo-{arch}.safetensors"
    save_weights(model, weights, arch, cfg.model.num_classes or 1, {"trained_on": slide_path.name})
    return weights


def run_demo(out_dir: str | Path, cfg: PipelineConfig, progress: StageProgress | None = None, size=(12000, 9000)) -> SlideOutputs:
    """The embedded default: generate a training and a test slide, fit, run, score against truth."""
    from wsipipe.slides.synth import write_synthetic_slide

    out_dir = Path(out_dir)
    slides = out_dir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    width, height = size

    def generated(name: str, seed: int) -> Path:
        path = slides / f"{name}-{width}x{height}.svs"
        if not (path.exists() and path.with_suffix(".geojson").exists()):  # deterministic: reuse
            write_synthetic_slide(path, width, height, mpp=0.5, seed=seed)
        return path

    train, test = generated("demo-train", 1), generated("demo-test", 2)
    weights = out_dir / "model" / f"demo-{cfg.model.arch_for_training}.safetensors"
    if not weights.exists():
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        weights = train_demo_model(train, train.with_suffix(".geojson"), out_dir / "model", cfg, progress=progress)
    result = run_slide(test, out_dir / "results", cfg, weights, progress=progress)
    summary = add_ground_truth_dice(result.out_dir, test.with_suffix(".geojson"))
    return SlideOutputs(out_dir=result.out_dir, store=result.store, summary=summary)
