"""Slides end to end in this process (tile -> infer -> stitch -> report), and the embedded demo.

Thin orchestration over the stage modules; the CLI and the Prefect flows call these.
:func:`run_slides` overlaps slides: up to ``orchestration.slides_in_flight`` slide jobs at
once, each stage kind behind its own gate (:class:`GatedRunner`), so slide n+1 tiles while
slide n infers, and no two slides tile or run the model at the same time.
"""

from __future__ import annotations

import heapq
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from wsipipe.config import PipelineConfig
from wsipipe.run.job import STAGES, Runner, SlideJob, Stage, StageOutcome, StageProgress, direct, output_dir, run_job
from wsipipe.run.names import run_model
from wsipipe.run.rows import SlideResult
from wsipipe.tiles import store

__all__ = ["ACCELERATOR_GATE", "GatedRunner", "SlideOutputs", "StageEvent", "StageProgress", "add_ground_truth_dice", "run_demo",
           "run_slide", "run_slides"]

log = logging.getLogger(__name__)

# One accelerator stage at a time in this process, whichever runner runs it (``wsipipe run``'s
# slides in flight, the Prefect flows' slide tasks): the model owns the GPU, and two slides
# inferring at once would only split it and double its memory.
ACCELERATOR_GATE = threading.Lock()


@dataclass(frozen=True)
class SlideOutputs:
    out_dir: Path
    store: Path
    summary: dict
    status: str = "ok"  # "skipped" when every stage found its work done


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig,
    model_path: str | Path | None = None,
    client=None,
    progress: StageProgress | None = None,
    force: bool = False,
) -> SlideOutputs:
    """Tile, classify and stitch one slide into ``out_dir/<name>-<id>/``, then write its report.html
    (the slide job of wsipipe.run.job, every stage in this process).

    Each stage is skipped when its outputs exist for the same inputs, so a rerun is cheap. A
    folder holding a result made with another level-0 resolution is refused
    (:class:`~wsipipe.run.names.ResolutionConflict`) unless ``force``."""
    slide_path = Path(slide_path)
    weights, cfg = run_model(model_path, cfg, force)
    slide_dir = output_dir(slide_path, out_dir, cfg, guard=not force)  # an unreadable slide fails here, before torch loads
    from wsipipe.models.inference import resolve_device, resolve_precision
    from wsipipe.models.model import load_model

    # Fail fast on bad weights or architecture, before any tiling work.
    net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    resolve_precision(cfg.inference.precision, resolve_device(cfg.inference.device))
    job = SlideJob(slide_path, slide_dir, cfg, weights, net, info, client=client, progress=progress)
    row = run_job(job, direct)
    log.info("%s: done in %.1f s -> %s", slide_path.name, row.seconds, job.slide_dir)
    return SlideOutputs(out_dir=job.slide_dir, store=job.store, summary=row.summary or {}, status=row.status)


@dataclass(frozen=True)
class StageEvent:
    """A stage of one slide starting or ending, in the order the gated runner saw them."""

    slide: str  # the slide's output folder name
    stage: str
    edge: str  # "start" | "end"


class _Gate:
    """A lock granted to the waiting slide that comes first in the batch (lowest rank): slides
    pass each stage in their order, so their results come out in that order too."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = False
        self._waiting: list[int] = []  # heap of ranks

    @contextmanager
    def held(self, rank: int) -> Iterator[None]:
        with self._changed:
            heapq.heappush(self._waiting, rank)
            self._changed.wait_for(lambda: not self._busy and self._waiting[0] == rank)
            heapq.heappop(self._waiting)
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


@dataclass
class GatedRunner:
    """A runner over ``inner`` (default :func:`direct`) that lets one slide at a time through
    each stage kind: the tile stage uses every core and the infer stage owns the accelerator
    (and, within the process, holds :data:`ACCELERATOR_GATE`), so two slides never tile or infer
    at once, while one slide's tiling overlaps another's inference. Slides waiting at a gate pass
    it in ``rank(job)`` order. ``events``, when given, receives a :class:`StageEvent` as each
    stage starts (gate held) and ends; both are logged too.

    A slide holds no gate between its stages, so slides never wait on each other in a cycle."""

    inner: Runner = direct
    events: list[StageEvent] | None = None
    rank: Callable[[SlideJob], int] = lambda job: 0
    _gates: dict[str, _Gate] = field(default_factory=lambda: {s.name: _Gate() for s in STAGES})
    _record: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, stage: Stage, job: SlideJob) -> StageOutcome:
        gate = self._gates.setdefault(stage.name, _Gate())
        with gate.held(self.rank(job)), ACCELERATOR_GATE if stage.accelerator else nullcontext():
            self._event(job, stage, "start")
            try:
                return self.inner(stage, job)
            finally:
                self._event(job, stage, "end")

    def _event(self, job: SlideJob, stage: Stage, edge: str) -> None:
        log.info("slide=%s stage=%s: %s", job.name, stage.name, edge)
        if self.events is not None:
            with self._record:
                self.events.append(StageEvent(job.name, stage.name, edge))


# (the slide's row, its exception when it failed) -> None; called in the calling thread.
SlideDone = Callable[[SlideResult, BaseException | None], None]


def run_slides(
    slides: Sequence[str | Path],
    out_dir: str | Path,
    cfg: PipelineConfig,
    model_path: str | Path | None = None,
    progress: Callable[[Path], StageProgress | None] | None = None,
    events: list[StageEvent] | None = None,
    on_done: SlideDone | None = None,
    runner: Runner = direct,
    force: bool = False,
) -> list[SlideResult]:
    """Every slide's job in this process, up to ``cfg.orchestration.slides_in_flight`` at once
    through one :class:`GatedRunner` over ``runner``; one row per slide, in the order given.

    The model is loaded once (a bad weights file fails here, before any work) and shared: the
    infer gate keeps its use to one slide at a time. A slide that fails is a ``failed`` row
    with its one-line error; the others go on. ``on_done(row, error)`` is called in the calling
    thread, in the slides' order, as soon as a slide and every slide before it have finished
    (the CLI prints as it goes). ``progress(slide)``: the slide's stage callback (the CLI labels
    its bars with the slide). ``events``: see :class:`GatedRunner`. ``force``: see :func:`run_slide`.

    The slides run on daemon threads: an interrupt in the calling thread ends the process
    without waiting for the slides in flight, which resume from what they wrote (each under
    its folder's lock, leftovers cleared)."""
    from wsipipe.models.inference import resolve_device, resolve_precision
    from wsipipe.models.model import load_model

    weights, cfg = run_model(model_path, cfg, force)
    net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    resolve_precision(cfg.inference.precision, resolve_device(cfg.inference.device))
    paths = [Path(s) for s in slides]
    order = {path: i for i, path in reversed(list(enumerate(paths)))}  # a slide given twice: its first place
    gated = GatedRunner(inner=runner, events=events, rank=lambda job: order.get(job.slide, 0))

    def one(slide: Path) -> tuple[SlideResult, BaseException | None]:
        t0 = time.perf_counter()
        slide_dir = None
        try:
            slide_dir = output_dir(slide, out_dir, cfg, guard=not force)
            job = SlideJob(slide, slide_dir, cfg, weights, net, info, progress=progress(slide) if progress else None)
            row = run_job(job, gated)
            log.info("%s: done in %.1f s -> %s", slide.name, row.seconds, slide_dir)
            return row, None
        except Exception as exc:  # one bad slide (or a bug in it) is a row, not the end of the batch
            log.debug("%s failed", slide, exc_info=True)
            return SlideResult.make(slide, "failed", name=slide_dir.name if slide_dir else None, error=exc,
                                    out_dir=slide_dir, seconds=time.perf_counter() - t0), exc

    return _in_flight(one, paths, min(len(paths), cfg.orchestration.slides_in_flight), on_done)


def _in_flight(one: Callable[[Path], tuple[SlideResult, BaseException | None]], paths: list[Path], workers: int,
               on_done: SlideDone | None) -> list[SlideResult]:
    """``one(path)`` for every path on ``workers`` daemon threads; rows handed to ``on_done``
    (in this thread) and returned in the paths' order."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(paths)):
        todo.put(i)
    finished: queue.SimpleQueue[tuple[int, SlideResult, BaseException | None]] = queue.SimpleQueue()

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            finished.put((i, *one(paths[i])))

    for k in range(workers):
        threading.Thread(target=work, name=f"wsipipe-slide-{k}", daemon=True).start()
    waiting: dict[int, tuple[SlideResult, BaseException | None]] = {}
    rows: list[SlideResult] = []
    while len(rows) < len(paths):
        i, row, exc = finished.get()
        waiting[i] = (row, exc)
        while len(rows) in waiting:
            row, exc = waiting.pop(len(rows))
            if on_done:
                on_done(row, exc)
            rows.append(row)
    return rows


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
    num_classes = cfg.model.num_classes or 1
    info = save_weights(model, weights, arch, num_classes, {"trained_on": slide_path.name})
    write_demo_card(model, patches, info.sha256, arch, num_classes, meta, slide_path.name, work_dir, cfg.train.seed)
    return weights


def write_demo_card(model, patches, sha256: str, arch: str, num_classes: int, tile: dict, slide_name: str,
                    work_dir: Path, seed: int = 0) -> Path:
    """card.json beside the demo weights: what the model is and what it was trained on, with the
    training patches' feature-space reference that flags slides outside it."""
    from wsipipe.files import write_atomic
    from wsipipe.config import AugmentConfig
    from wsipipe.learn.augment import Augmenter
    from wsipipe.learn.train import training_domain
    from wsipipe.models.card import CARD_FILE, ModelCard

    card = ModelCard(
        arch=arch, num_classes=num_classes, classes=["normal", "tumor"] if num_classes == 1 else [],
        weights_sha256=sha256, mpp=float(tile["mpp"]), patch_size=int(tile["patch_size"]),
        training_data=f"generated slides: {slide_name} (synthetic H&E-like, wsipipe.slides.synth)",
        # with the default augmentation's stain and colour range: other slides of the same kind vary that much
        domain=training_domain(model, patches, seed=seed, augmenter=Augmenter(AugmentConfig())),
    )
    return write_atomic(work_dir / CARD_FILE, card.to_json())


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
