"""One slide's job, written once: lock, leftovers, write-error mapping, stage order, skip
logic and the result row. Where each stage runs is the runner's business.

A runner is any callable ``runner(stage, job) -> StageOutcome`` that runs
``run_stage(stage, job)`` somewhere: :func:`direct` in this process (``wsipipe run``), a
Prefect task (``flows/slide.py``), a Dask task on a chosen worker
(``wsipipe.run.cluster``). :func:`run_job` holds the slide folder's lock for the whole job
in the calling process, so every runner writes a slide's folder one run at a time.

Adding a stage is one edit: a function ``(job) -> StageOutcome`` and an entry in :data:`STAGES`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wsipipe.config import PipelineConfig
from wsipipe.errors import NoTissueError, writing_outputs
from wsipipe.locks import clear_leftovers, folder_lock
from wsipipe.run.client import scheduler_client
from wsipipe.run.names import check_resolution, slide_output_name
from wsipipe.run.rows import SlideResult
from wsipipe.slides.slide import open_slide_for

log = logging.getLogger(__name__)

# (stage name, done, total) -> None; the CLI maps it onto rich progress bars.
StageProgress = Callable[[str, int, int], None]


@dataclass
class SlideJob:
    """What one slide's stages need. ``net``/``info``: the model loaded by the caller; when
    None, the infer stage loads (and caches) ``weights`` where it runs. ``client``: the Dask
    client the tiler submits to (else ``cfg.dask.scheduler_address``, else threads)."""

    slide: Path
    slide_dir: Path
    cfg: PipelineConfig
    weights: Path
    net: Any = None
    info: Any = None
    client: Any = None
    progress: StageProgress | None = None

    @property
    def store(self) -> Path:
        return self.slide_dir / "patches.zarr"

    @property
    def name(self) -> str:
        return self.slide_dir.name

    def bar(self, stage: str):
        progress = self.progress
        return (lambda done, total: progress(stage, done, total)) if progress else None

    def model(self):
        if self.net is not None:
            return with_card(self.net, self.info)
        try:
            # A model folder's own mtime does not change when a file in it is rewritten.
            files = [p for p in self.weights.iterdir() if p.is_file()] if self.weights.is_dir() else [self.weights]
            mtime = max((p.stat().st_mtime_ns for p in files), default=0)
        except OSError:
            mtime = 0  # load_model names the missing file
        return with_card(*_cached_model(str(self.weights), mtime, self.cfg.model.arch, self.cfg.model.num_classes))


@dataclass(frozen=True)
class StageOutcome:
    skipped: bool | None = None  # None: the stage does not say
    note: str = ""  # one log line
    summary: dict | None = None  # the stitch stage's summary.json
    worker: str | None = None  # where it ran (Dask)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[SlideJob], StageOutcome]
    accelerator: bool = False  # inference: the GPU worker / the GPU concurrency tag


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int, arch: str | None, num_classes: int | None):
    from wsipipe.models.model import load_model

    return with_card(*load_model(path, arch, num_classes))


def with_card(net: Any, info: Any) -> tuple[Any, Any]:
    """``(net, info)`` with the model card beside the weights attached to ``info`` when its loader
    attached none (inference follows ``info.card``: normalisation, stain, class names)."""
    from wsipipe.models.carded import with_model_card

    return net, with_model_card(info)


# ---------------------------------------------------------------------------- the stages


def tile(job: SlideJob) -> StageOutcome:
    from wsipipe.tiles.tiling import tile_slide

    try:
        if job.client is not None:
            stats = tile_slide(job.slide, job.store, job.cfg, client=job.client, progress=job.bar("tile"))
        else:
            with scheduler_client(job.cfg.dask) as client:
                stats = tile_slide(job.slide, job.store, job.cfg, client=client, progress=job.bar("tile"))
    except NoTissueError as exc:  # the slide still gets a report page: its thumbnail and why
        from wsipipe.outputs.report import write_no_tissue_report

        try:
            write_no_tissue_report(job.slide_dir, job.slide, exc, job.cfg)
        except Exception as page_error:  # the slide's error is the no-tissue one, page or not
            log.warning("%s: no report page for the slide without tissue: %s", job.slide_dir, page_error)
        raise
    done = bool(stats.get("skipped"))
    return StageOutcome(skipped=done, note=f"{stats['n_patches']} patches" + (" (already done)" if done else ""))


def infer(job: SlideJob) -> StageOutcome:
    from wsipipe.models.inference import infer_store

    net, info = job.model()
    # slide/readers: a store tiled with tile.store_patches false reads its patches from the slide here.
    stats = infer_store(job.store, net, info, job.cfg.inference, progress=job.bar("infer"), slide_path=job.slide,
                        readers=job.cfg.dask.num_workers)
    return StageOutcome(skipped=bool(stats.get("skipped")),
                        note=f"model {info.arch} ({info.sha256[:12]}), {stats['n']} patches, {stats['computed']} computed")


def stitch(job: SlideJob) -> StageOutcome:
    from wsipipe.outputs.stitch import stitch_summary

    cfg = job.cfg
    summary = stitch_summary(job.store, job.slide_dir, cfg.stitch, progress=job.bar("stitch"), qc_cfg=cfg.qc, export=cfg.export)
    note = f"{summary.decision}, top-k mean {summary.slide_score.top_k_mean}, tumor {summary.tumor_area_mm2} mm²"
    return StageOutcome(summary=summary.as_dict(), note=note)


def mil(job: SlideJob) -> StageOutcome:
    """The slide-level MIL model of ``mil.model`` (none: nothing to do): embeds the patches with
    its encoder unless the store has them, writes attention.png and summary.json's ``mil``."""
    if job.cfg.mil.model is None:
        return StageOutcome(note="no MIL model")
    from wsipipe.outputs.summary import load_summary
    from wsipipe.run.mil import apply_mil

    section = apply_mil(job.store, job.slide_dir, job.cfg.mil.model, job.cfg.inference, progress=job.bar("embed"),
                        slide_path=job.slide, readers=job.cfg.dask.num_workers, ome_zarr=job.cfg.export.ome_zarr)
    note = f"MIL {section['label']} (p {section['probability']:.3f}), {section['embedded']} patches embedded"
    return StageOutcome(skipped=section["skipped"], summary=load_summary(job.slide_dir).as_dict(),
                        note=note + (" (already done)" if section["skipped"] else ""))


def report(job: SlideJob) -> StageOutcome:
    from wsipipe.outputs.report import write_slide_report

    return StageOutcome(note=str(write_slide_report(job.slide_dir, job.cfg.qc, only_if_changed=True)))


STAGES: tuple[Stage, ...] = (
    Stage("tile", tile), Stage("infer", infer, accelerator=True), Stage("stitch", stitch),
    Stage("mil", mil, accelerator=True), Stage("report", report),
)


def run_stage(stage: Stage, job: SlideJob) -> StageOutcome:
    """One stage wherever a runner placed it; a full or read-only output volume is an
    OutputWriteError there (so no retry logic mistakes it for a transient I/O error)."""
    with writing_outputs(job.slide_dir):
        return stage.run(job)


class Runner(Protocol):
    def __call__(self, stage: Stage, job: SlideJob, /) -> StageOutcome: ...


def direct(stage: Stage, job: SlideJob) -> StageOutcome:
    """The runner of ``wsipipe run``: every stage in this process."""
    return run_stage(stage, job)


# ---------------------------------------------------------------------------- the job


def output_dir(slide: str | Path, out_root: str | Path, cfg: PipelineConfig, guard: bool = False) -> Path:
    """The slide's output folder (opens the slide: its identity is in the name). Nothing is
    created: a slide that cannot be opened or whose tiles do not decode raises its
    SlideOpenError / SlideReadError here, before any folder, lock or store exists.

    ``guard``: a folder holding a result made with another level-0 resolution raises
    :class:`~wsipipe.run.names.ResolutionConflict` (the callers' ``--force`` turns it off)."""
    slide = Path(slide)
    with open_slide_for(slide, cfg) as opened:
        check_decodes(opened, cfg)
        slide_dir = Path(out_root) / slide_output_name(slide, opened.identity)
        if guard:
            check_resolution(slide_dir / "patches.zarr", opened, cfg.tile.mpp, slide_dir)
        return slide_dir


def check_decodes(opened, cfg: PipelineConfig) -> None:
    """Decode one pixel of the first and last tile of the coarsest level (the thumbnail tissue
    detection reads) and, unless ``tile.on_corrupt_tile`` is skip, of level 0: a file OpenSlide
    opens but whose tile data is corrupt or cut short fails in milliseconds, as a
    SlideReadError naming the file."""
    levels = [opened.level_count - 1]
    if cfg.tile.on_corrupt_tile == "fail" and levels[0] != 0:
        levels.append(0)
    for level in levels:
        width, height = opened.level_dimensions[level]
        for x, y in ((0, 0), (width - 1, height - 1)):
            opened.read_level(level, x, y, 1, 1)


def run_job(job: SlideJob, runner: Runner = direct, skip_done: bool = False, logger: Any = None) -> SlideResult:
    """The slide's stages in order through ``runner``, under the slide folder's lock, after
    clearing leftovers of writers killed mid-write. Errors propagate (the caller decides
    whether a failure is a row or an exit); write errors are OutputWriteError.

    ``skip_done``: when the outputs on disk were made from this slide, config and model
    (``job.info`` needed), no stage runs and the row is ``skipped``. Otherwise the row is
    ``skipped`` when every stage that says so found its work done. ``logger``: where the
    lock wait and the skip are logged (the flows pass Prefect's run logger)."""
    from wsipipe.run.archive import done_outputs

    logger = logger or log
    t0 = time.perf_counter()
    with writing_outputs(job.slide_dir), folder_lock(job.slide_dir) as held:
        if held.waited_s:
            logger.info("slide=%s stage=lock: waited %.1f s for another run writing it", job.name, held.waited_s)
        if skip_done:
            done = done_outputs(job.slide, job.slide_dir.parent, job.cfg, with_card(None, job.info)[1])
            if done is not None:
                logger.info("slide=%s stage=check: outputs up to date, skipped", job.name)
                return SlideResult.make(job.slide, "skipped", name=job.name, out_dir=job.slide_dir, summary=done[1],
                                        seconds=time.perf_counter() - t0)
        clear_leftovers(job.slide_dir)  # a writer killed mid-write; we hold the lock, so none is live
        outcomes = [runner(stage, job) for stage in STAGES]
    summary = next((o.summary for o in reversed(outcomes) if o.summary is not None), None)
    said = [o.skipped for o in outcomes if o.skipped is not None]
    workers = {s.name: o.worker for s, o in zip(STAGES, outcomes, strict=True) if o.worker is not None} or None
    return SlideResult.make(
        job.slide, "skipped" if said and all(said) else "ok", name=job.name, out_dir=job.slide_dir, summary=summary,
        seconds=time.perf_counter() - t0, workers=workers,
    )

