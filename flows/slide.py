"""``process-slide``: tile -> infer -> stitch -> report for one slide, each stage a Prefect task.

Stages retry on transient I/O errors (never on a typed wsipipe error such as a corrupt
slide), time out after ``orchestration.stage_timeout_s``, and skip themselves when their
outputs exist for the same inputs (markers in the slide's Zarr store).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (offline-safe Prefect settings before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from wsipipe.run.archive import artifact_key, parse_overrides, result_row, slide_markdown, slide_output_dir
from wsipipe.run.cluster import dask_scheduler, scheduler_client
from wsipipe.config import PipelineConfig, load_config
from wsipipe.errors import WsipipeError
from wsipipe.locks import clear_leftovers, folder_lock
from wsipipe.run.pipeline import slide_output_name, weights_path
from wsipipe.slides.slide import open_slide

# One inference at a time in this process (the Prefect tag bounds it across processes).
_ACCELERATOR = threading.Lock()


def _transient(task, task_run, state) -> bool:
    """Retry only I/O hiccups (network filesystems, busy disks); a bad slide, bad config or
    a timeout would fail the same way again."""
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


def _stage(name: str):
    return task(
        name=name, task_run_name=f"{name} {{label}}", cache_policy=NO_CACHE, retry_condition_fn=_transient,
    )


@_stage("tile")
def tile_stage(slide: str, store_path: str, cfg: PipelineConfig, label: str) -> dict:
    from wsipipe.tiles.tiling import tile_slide

    log = get_run_logger()
    log.info("slide=%s stage=tile: tiling on dask %s", label, cfg.dask.scheduler_address)
    with scheduler_client(cfg.dask) as client:
        stats = tile_slide(slide, store_path, cfg, client=client)
    log.info("slide=%s stage=tile: %s patches%s", label, stats["n_patches"], " (already done)" if stats.get("skipped") else "")
    return stats


@_stage("infer")
def infer_stage(store_path: str, net, info, cfg: PipelineConfig, label: str) -> dict:
    from wsipipe.models.inference import infer_store

    log = get_run_logger()
    with _ACCELERATOR:
        log.info("slide=%s stage=infer: model %s (%s)", label, info.arch, info.sha256[:12])
        stats = infer_store(store_path, net, info, cfg.inference)
    log.info("slide=%s stage=infer: %s patches, %s computed", label, stats["n"], stats["computed"])
    return stats


@_stage("stitch")
def stitch_stage(store_path: str, slide_dir: str, cfg: PipelineConfig, label: str) -> dict:
    from wsipipe.outputs.stitch import stitch_store

    log = get_run_logger()
    summary = stitch_store(store_path, slide_dir, cfg.stitch, qc_cfg=cfg.qc, export=cfg.export)
    log.info(
        "slide=%s stage=stitch: %s, top-k mean %s, tumor %s mm²", label, summary["decision"],
        summary["slide_score"].get("top_k_mean"), summary["tumor_area_mm2"],
    )
    return summary


@_stage("report")
def report_stage(slide_dir: str, cfg: PipelineConfig, label: str) -> str:
    from wsipipe.outputs.report import write_slide_report

    path = write_slide_report(slide_dir, cfg.qc, only_if_changed=True)
    get_run_logger().info("slide=%s stage=report: %s", label, path)
    return str(path)


def run_stages(slide: str | Path, out: str | Path, cfg: PipelineConfig, net, info) -> dict:
    """The stage tasks for one slide; returns an "ok" result row. Errors propagate. The caller
    holds the slide folder's lock (wsipipe.locks)."""
    t0 = time.perf_counter()
    slide = Path(slide)
    with open_slide(slide, cfg.mpp_override) as opened:
        name = slide_output_name(slide, opened.identity)
    slide_dir = Path(out) / name
    store_path = str(slide_dir / "patches.zarr")
    orch = cfg.orchestration
    opts = dict(retries=orch.stage_retries, retry_delay_seconds=orch.retry_delay_s, timeout_seconds=orch.stage_timeout_s)
    tile_stage.with_options(**opts)(str(slide), store_path, cfg, label=name)
    infer_stage.with_options(**opts, tags=[orch.gpu_tag])(store_path, net, info, cfg, label=name)
    summary = stitch_stage.with_options(**opts)(store_path, str(slide_dir), cfg, label=name)
    report_stage.with_options(**opts)(str(slide_dir), cfg, label=name)
    return result_row(slide, "ok", name=name, out_dir=slide_dir, summary=summary, seconds=time.perf_counter() - t0)


def publish_slide(row: dict) -> None:
    """The slide's markdown artifact (patch count, score, tumor area, timings, outputs)."""
    create_markdown_artifact(
        slide_markdown(row), key=artifact_key("wsipipe-slide", row.get("name") or Path(row["slide"]).stem),
        description=f"wsipipe: {Path(row['slide']).name} {row['status']}",
    )


def load_run_inputs(model: str | None, config: str | None, overrides: dict[str, Any] | None):
    """Config (YAML <- overrides, validated before any work) and the model, loaded once."""
    from wsipipe.models.model import load_model

    cfg = load_config(config, parse_overrides(overrides))
    net, info = load_model(weights_path(model, cfg), cfg.model.arch, cfg.model.num_classes)
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
    slide_dir = slide_output_dir(slide, out, cfg)
    with dask_scheduler(cfg) as cfg, folder_lock(slide_dir):  # one run at a time per slide
        clear_leftovers(slide_dir)
        row = run_stages(slide, out, cfg, net, info)
    publish_slide(row)
    return row
