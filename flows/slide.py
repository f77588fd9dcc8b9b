"""``process-slide``: tile -> infer -> stitch -> report for one slide, each stage a Prefect task.

Stages retry on transient I/O errors (never on a typed wsipipe error such as a corrupt
slide), time out after ``orchestration.stage_timeout_s``, and skip themselves when their
outputs exist for the same inputs (markers in the slide's Zarr store).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (offline-safe Prefect settings before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from wsipipe.config import PipelineConfig, load_config
from wsipipe.errors import WsipipeError
from wsipipe.run.archive import artifact_key, parse_overrides, slide_markdown
from wsipipe.run.cluster import dask_scheduler
from wsipipe.run.job import STAGES, SlideJob, Stage, StageOutcome, output_dir, run_job, run_stage
from wsipipe.run.names import run_model
from wsipipe.run.pipeline import ACCELERATOR_GATE
from wsipipe.run.rows import SlideResult


class _NoThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's warning that a task with a timeout runs in a worker thread, where the
    timeout cannot interrupt a blocking call. Every stage of an archive run runs in a thread
    of the flow's task runner (one per slide in flight), so it came once per stage and slide,
    always the same; the timeout's reach is documented instead (docs/orchestration.md:
    ``orchestration.stage_timeout_s`` is a hang detector, enforced between blocking calls)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in str(record.msg)


logging.getLogger("prefect.task_runs").addFilter(_NoThreadTimeoutNotice())


def _transient(task, task_run, state) -> bool:
    """Retry only I/O hiccups (network filesystems, busy disks); a bad slide, bad config, a
    full output volume (OutputWriteError) or a timeout would fail the same way again."""
    try:
        state.result()
    except WsipipeError:
        return False
    except TimeoutError:
        return False
    except OSError:
        return True
    except BaseException:
        return False
    return False


def _run(stage: Stage, job: SlideJob, label: str) -> StageOutcome:
    log = get_run_logger()
    if stage.accelerator:
        # One inference at a time in this process (the gate `wsipipe run` uses too); the
        # Prefect concurrency tag bounds it across processes.
        with ACCELERATOR_GATE:
            outcome = run_stage(stage, job)
    else:
        outcome = run_stage(stage, job)
    log.info("slide=%s stage=%s: %s", label, stage.name, outcome.note)
    return outcome


# One Prefect task per stage of wsipipe.run.job.STAGES.
_TASKS = {
    stage.name: task(name=stage.name, task_run_name=f"{stage.name} {{label}}", cache_policy=NO_CACHE,
                     retry_condition_fn=_transient)(_run)
    for stage in STAGES
}


def prefect_runner(cfg: PipelineConfig):
    """The runner of the flows: each stage a Prefect task with the configured retries and
    timeout; the accelerator stage carries the GPU concurrency tag."""
    orch = cfg.orchestration

    def runner(stage: Stage, job: SlideJob) -> StageOutcome:
        tags = [orch.gpu_tag] if stage.accelerator else []
        staged = _TASKS[stage.name].with_options(
            retries=orch.stage_retries, retry_delay_seconds=orch.retry_delay_s, timeout_seconds=orch.stage_timeout_s, tags=tags,
        )
        return staged(stage, job, label=job.name)

    return runner


def run_slide_job(slide: str | Path, out: str | Path, cfg: PipelineConfig, net, info, skip_done: bool = False) -> SlideResult:
    """The slide's job (wsipipe.run.job: lock, leftovers, stages, row) with each stage a Prefect task."""
    slide = Path(slide)
    job = SlideJob(slide, output_dir(slide, out, cfg), cfg, Path(info.path or ""), net, info)
    return run_job(job, prefect_runner(cfg), skip_done=skip_done, logger=get_run_logger())


def publish_slide(row: SlideResult) -> None:
    """The slide's markdown artifact (patch count, score, tumor area, timings, outputs)."""
    create_markdown_artifact(
        slide_markdown(row), key=artifact_key("wsipipe-slide", row.name or Path(row.slide).stem),
        description=f"wsipipe: {Path(row.slide).name} {row.status}",
    )


def load_run_inputs(model: str | None, config: str | None, overrides: dict[str, Any] | None):
    """Config (YAML <- overrides, validated before any work) and the model, loaded once."""
    from wsipipe.models.model import load_model

    weights, cfg = run_model(model, load_config(config, parse_overrides(overrides)))
    net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    return cfg, net, info


@flow(name="process-slide")
def process_slide(
    slide: str, out: str, model: str | None = None, config: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict:
    """Tile, classify and stitch one slide into ``out/<name>-<id8>/``.

    ``config`` is a YAML file (e.g. configs/default.yaml); ``overrides`` dotted fields such
    as ``{"tile.mpp": 1.0}``. Invalid values fail before any work, naming the field."""
    cfg, net, info = load_run_inputs(model, config, overrides)
    with dask_scheduler(cfg) as cfg:
        row = run_slide_job(slide, out, cfg, net, info)
    publish_slide(row)
    return row.as_dict()
