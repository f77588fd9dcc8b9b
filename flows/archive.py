"""``process-archive``: every new or changed slide of a folder, glob or CSV manifest.

A slide whose outputs already exist for the same slide identity, config hash and model hash
is skipped (decided from disk, see wsipipe.run.archive.done_outputs). A failing slide becomes a
"failed" row with its error; the others go on. The run ends Failed, with a message giving the
counts, when any slide failed, and publishes a table artifact of all slides either way.
"""

from __future__ import annotations

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

from flows.slide import load_run_inputs, publish_slide, run_slide_job
from wsipipe.config import PipelineConfig
from wsipipe.run.archive import (
    any_to_compute, archive_error, archive_message, archive_settings, archive_table, scan_archive, slide_config,
    status_counts, write_archive_files,
)
from wsipipe.run.cluster import dask_scheduler
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
        row = SlideResult.make(slide, "failed", error=archive_error(exc), seconds=time.perf_counter() - t0)
        log.error("slide=%s stage=failed: %s", Path(slide).name, row.error)
    if row.status != "skipped":
        # A skipped slide's artifact would only repeat the last one: a nightly run over an
        # archive of thousands would add thousands of artifact versions with nothing new.
        publish_slide(row)
    return row.as_dict()


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
    overrides: dict[str, Any] | None = None,
):
    """Process what is new or changed in ``archive`` (folder, glob or .csv manifest) into ``out``.

    Returns the result rows (wsipipe.run.archive; also written to ``out/archive-results.json``);
    a Failed state naming the counts when any slide failed."""
    log = get_run_logger()
    cfg, net, info = load_run_inputs(model, config, overrides)
    slides = scan_archive(archive)
    settings = archive_settings(archive)  # per-slide manifest columns, e.g. mpp
    log.info("archive %s: %d slides, model %s, %d in flight", archive, len(slides), info.sha256[:12],
             cfg.orchestration.slides_in_flight)
    Path(out).mkdir(parents=True, exist_ok=True)
    # A run with nothing new starts no cluster.
    cluster = dask_scheduler(cfg) if any_to_compute(slides, out, cfg, info, settings) else nullcontext(cfg)
    with cluster as cfg:
        rows = _bounded(
            lambda s: slide_task.submit(str(s), out, slide_config(cfg, settings.get(s)), net, info), slides,
            cfg.orchestration.slides_in_flight,
        )
    message = archive_message(rows)
    report = write_archive_files(rows, out)
    create_table_artifact(archive_table(rows), key="wsipipe-archive", description=f"wsipipe {archive}: {message}")
    create_markdown_artifact(archive_markdown(rows, report), key="wsipipe-archive-report", description=str(report))
    log.info("%s", message)
    if status_counts(rows)["failed"]:
        # The rows ride along: a caller reads this run's rows from the state, not from
        # archive-results.json, which a concurrent run over the same folder may have rewritten.
        return Failed(message=message, data=rows)
    return rows
