"""``process-archive``: every new or changed slide of a folder, glob or CSV manifest.

A slide whose outputs already exist for the same slide identity, config hash and model hash
is skipped (decided from disk, see wsipipe.run.archive.done_outputs). A failing slide becomes a
"failed" row with its error; the others go on. The run ends Failed, with a message giving the
counts, when any slide failed, and publishes a table artifact of all slides either way.

Before any work, each slide is decided from disk (wsipipe.run.plan): up to date, unreadable, or
to process. The model is loaded and the Dask cluster started only when some slide is to
process; only those slides become ``slide`` tasks.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (offline-safe Prefect settings before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.slide import publish_slide, run_slide_job
from wsipipe.config import PipelineConfig, load_config
from wsipipe.errors import NoTissueError
from wsipipe.models.identity import weights_identity
from wsipipe.run.archive import (
    archive_error, archive_message, archive_settings, archive_table, parse_overrides, scan_archive, slide_config,
    status_counts, write_archive_files,
)
from wsipipe.run.cluster import dask_scheduler
from wsipipe.run.job import output_dir
from wsipipe.run.names import run_model
from wsipipe.run.plan import decide
from wsipipe.run.rows import SlideResult
from wsipipe.outputs.report import archive_markdown


@task(name="slide", task_run_name="slide {slide}", cache_policy=NO_CACHE)
def slide_task(slide: str, out: str, cfg: PipelineConfig, net, info) -> dict:
    """One slide: skipped when done, else its stages; never raises (errors become the row).

    One run at a time per slide (the job holds the slide folder's lock): a second run over
    the same output folder waits, then finds the outputs done."""
    log = get_run_logger()
    t0 = time.perf_counter()
    try:
        row = run_slide_job(slide, out, cfg, net, info, skip_done=True)
    except Exception as exc:  # one slide's failure, whatever it is, must not stop the archive
        # A slide without tissue has a report page in its folder (its thumbnail and why): the row links to it.
        out_dir = output_dir(slide, out, cfg) if isinstance(exc, NoTissueError) else None
        row = SlideResult.make(slide, "failed", error=archive_error(exc), out_dir=out_dir, seconds=time.perf_counter() - t0)
        log.error("slide=%s stage=failed: %s", Path(slide).name, row.error)
    if row.status != "skipped":
        # A skipped slide's artifact would only repeat the last one: a nightly run over an
        # archive of thousands would add thousands of artifact versions with nothing new.
        publish_slide(row)
    return row.as_dict()


class ArchiveFailed(Exception):
    """The data of a failed archive run's state: ``str()`` is the state's message, ``rows`` this
    run's rows. Prefect turns a Failed state's data into the exception it raises when the
    state's result is asked for (the flow's own process does, at its end): data that is not an
    exception (the rows themselves) ends that process with a TypeError dumping them. This one is
    raised instead, and :class:`_NoTracebackForArchiveFailed` keeps its traceback out of the logs."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows

    def __reduce__(self):  # picklable with its rows (a persisted result)
        return (type(self), (str(self), self.rows))


class _NoTracebackForArchiveFailed(logging.Filter):
    """Drops the records that log an :class:`ArchiveFailed` with its traceback. In a deployment
    run Prefect's engine asks the final state for its result, which raises the state's data, and
    logs that as an "unexpected exception" with a traceback (on the worker's output and, through
    the API, in `prefect deployment run --watch`). A failed slide is the run's expected ending,
    already told by the state's message, the rows and the artifacts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ArchiveFailed))


for _name in ("prefect.flow_runs", "prefect.engine"):  # run_flow's error_logger; the engine's own
    logging.getLogger(_name).addFilter(_NoTracebackForArchiveFailed())


def _bounded(submit, items: list, limit: int) -> list:
    """Submit ``items`` with at most ``limit`` in flight; results in the items' order."""
    futures: list = []
    running: list = []
    for item in items:
        if len(running) >= limit:
            finished = next(as_completed(running))
            running.remove(finished)
        future = submit(item)
        futures.append(future)
        running.append(future)
    return [f.result() for f in futures]


@flow(name="process-archive", task_runner=ThreadPoolTaskRunner(max_workers=256))  # type: ignore[arg-type]  # prefect stub generics
def process_archive(
    archive: str, out: str, model: str | None = None, config: str | None = None,
    overrides: dict[str, Any] | None = None, force: bool = False,
):
    """Process what is new or changed in ``archive`` (folder, glob or .csv manifest) into ``out``.
    A slide whose folder holds a result made with another level-0 resolution fails (naming both)
    unless ``force``.

    Returns the result rows (wsipipe.run.archive; also written to ``out/archive-results.json``);
    when any slide failed, a Failed state naming the counts whose data is an
    :class:`ArchiveFailed` carrying the rows."""
    log = get_run_logger()
    cfg = load_config(config, parse_overrides(overrides))
    slides = scan_archive(archive)
    settings = archive_settings(archive)  # per-slide manifest columns, e.g. mpp
    weights, cfg = run_model(model, cfg, force)  # with the model card's threshold, resolution and patch size
    info = weights_identity(weights, cfg.model.arch, cfg.model.num_classes)
    decided = decide(slides, out, cfg, info, settings, force)
    todo = [slide for slide, row in zip(slides, decided, strict=True) if row is None]
    net = None
    if todo:  # a run with nothing to process loads no model (no torch) and starts no cluster
        from wsipipe.models.model import load_model

        net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    log.info("archive %s: %d slides, model %s, %d to process, %d in flight", archive, len(slides),
             info.sha256[:12] if info else weights.name, len(todo), cfg.orchestration.slides_in_flight)
    Path(out).mkdir(parents=True, exist_ok=True)
    for row in decided:
        if row is not None:
            _log_decided(log, row)
            if row.status == "failed":  # an up-to-date slide's artifact would only repeat the last one
                publish_slide(row)
    cluster = dask_scheduler(cfg) if todo else nullcontext(cfg)
    with cluster as cfg:
        computed = iter(_bounded(
            lambda s: slide_task.submit(str(s), out, slide_config(cfg, settings.get(s)), net, info), todo, cfg.orchestration.slides_in_flight
        ))
    rows = [row.as_dict() if row is not None else next(computed) for row in decided]
    message = archive_message(rows)
    report = write_archive_files(rows, out)
    create_table_artifact(archive_table(rows), key="wsipipe-archive", description=f"wsipipe {archive}: {message}")
    create_markdown_artifact(archive_markdown(rows, report), key="wsipipe-archive-report", description=str(report))
    log.info("%s", message)
    if status_counts(rows)["failed"]:
        # The rows ride along in the exception: a caller reads this run's rows from the state,
        # not from archive-results.json, which a concurrent run may have rewritten.
        return Failed(message=message, data=ArchiveFailed(message, rows))
    return rows


def _log_decided(log, row: SlideResult) -> None:
    label = row.name or Path(row.slide).name
    if row.status == "failed":
        log.error("slide=%s stage=failed: %s", label, row.error)
    else:
        log.info("slide=%s stage=check: outputs up to date, skipped", label)
