"""Running slides on a dask.distributed cluster, with inference routed to GPU workers.

A client comes from ``cfg.dask``: ``scheduler_address`` connects to an existing cluster
(``dask scheduler`` + ``dask worker``, dask-jobqueue, dask-kubernetes); otherwise a
LocalCluster of worker processes sized to this machine is started and closed with it.

:func:`run_slides` makes three tasks per slide, each a whole stage on one worker:
``tile`` on a CPU worker, ``infer`` on a worker that advertises the ``GPU`` resource
(``dask worker --resources GPU=1``), ``stitch`` on a CPU worker. A slide is the unit of
parallelism (no data moves between workers but paths: the output folder must be on a
filesystem every worker sees). When the cluster has no GPU workers, inference runs on
any worker; when it has only GPU workers, so does tiling. A GPU worker runs one
inference at a time (each task claims its whole ``GPU=1``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path
from collections.abc import Iterable, Iterator

from wsipipe.config import DaskConfig, PipelineConfig
from wsipipe.errors import ConfigError, WsipipeError

GPU = "GPU"  # the worker resource name that marks a GPU worker


@contextlib.contextmanager
def connect(address: str, timeout: str = "20s") -> Iterator:
    """A client of the scheduler at ``address``; a scheduler that can't be reached is a ConfigError."""
    from distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(None, f"dask.scheduler_address={address!r}: cannot reach the scheduler ({exc})") from None
    with client:
        yield client


@contextlib.contextmanager
def scheduler_client(cfg: DaskConfig) -> Iterator:
    """A client of ``dask.scheduler_address`` for the block, or None when none is configured
    (the tiler then runs its chunk tasks on threads in this process)."""
    if not cfg.scheduler_address:
        yield None
        return
    with connect(cfg.scheduler_address) as client:
        yield client


@contextlib.contextmanager
def dask_client(cfg: DaskConfig) -> Iterator:
    """The cluster ``cfg`` names, or a LocalCluster of one single-threaded worker process per core."""
    if cfg.scheduler_address:
        with connect(cfg.scheduler_address) as client:
            yield client
        return
    from distributed import Client

    with local_cluster(cfg, processes=True) as cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def local_cluster(cfg: DaskConfig, processes: bool) -> Iterator:
    """A LocalCluster of ``dask.num_workers`` single-threaded workers (default one per core):
    threads in this process, or processes listening on the loopback only."""
    from distributed import LocalCluster

    n = cfg.num_workers or os.cpu_count() or 1
    where = {"host": "127.0.0.1"} if processes else {}  # threads talk in-process (inproc://)
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=None, **where) as cluster:
        yield cluster


@contextlib.contextmanager
def dask_scheduler(cfg: PipelineConfig) -> Iterator[PipelineConfig]:
    """Yield ``cfg`` with ``dask.scheduler_address`` set: the configured scheduler as is, or a
    LocalCluster that lives for the block (threads in this process unless
    ``orchestration.local_cluster_processes``). The Prefect flows open one per archive run and
    hand its address to every slide; ``wsipipe.tiles.tiling`` submits its chunk tasks there."""
    if cfg.dask.scheduler_address:
        yield cfg
        return
    with local_cluster(cfg.dask, cfg.orchestration.local_cluster_processes) as cluster:
        local = cfg.model_copy(deep=True)
        local.dask.scheduler_address = cluster.scheduler_address
        yield local


def split_workers(client) -> tuple[list[str], list[str]]:
    """(CPU worker addresses, GPU worker addresses) from the scheduler's view of its workers."""
    try:  # newer distributed lists only a few workers unless asked for all
        workers = client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:
        workers = client.scheduler_info()["workers"]
    gpu = sorted(a for a, w in workers.items() if (w.get("resources") or {}).get(GPU, 0) >= 1)
    cpu = sorted(a for a in workers if a not in gpu)
    return cpu, gpu


def run_slides(
    slides: Iterable[str | Path],
    out_dir: str | Path,
    cfg: PipelineConfig,
    model_path: str | Path | None,
    client,
) -> list[dict]:
    """Every slide through tile -> infer -> stitch on ``client``'s workers; one row per slide.

    Rows follow the archive row format (slide, name, status, error, out_dir, summary,
    seconds) plus ``workers``: the address each stage ran on. A slide that fails is a
    ``failed`` row with the one-line error; the others go on. ``skipped`` = every stage
    was already complete for the same slide, config and model."""
    from wsipipe.run.pipeline import weights_path

    weights = weights_path(model_path, cfg).resolve()
    out_dir = Path(out_dir).resolve()
    cpu, gpu = split_workers(client)
    on_cpu = {"workers": cpu, "allow_other_workers": False} if cpu else {}
    on_gpu = {"resources": {GPU: 1}} if gpu else {}

    slides = [Path(s).resolve() for s in slides]
    chains = []
    for i, slide in enumerate(slides):
        tag = f"{i}-{slide.name}"
        # pure=False: a rerun must run again (the stages themselves skip finished work).
        tiled = client.submit(_tile_task, slide, out_dir, cfg, key=f"tile-{tag}-{time.time_ns()}", pure=False, **on_cpu)
        inferred = client.submit(
            _infer_task, tiled, weights, cfg, key=f"infer-{tag}-{time.time_ns()}", pure=False, **on_gpu
        )
        stitched = client.submit(_stitch_task, inferred, cfg, key=f"stitch-{tag}-{time.time_ns()}", pure=False, **on_cpu)
        chains.append(stitched)
    return [_row(slide, fut) for slide, fut in zip(slides, chains)]


def _row(slide: Path, fut) -> dict:
    try:
        state = fut.result()
    except Exception as exc:  # a worker died or a bug: still one row, not a lost archive
        return _failed_row(slide, f"{type(exc).__name__}: {exc}".splitlines()[0], 0.0, {})
    if state.get("error"):
        return _failed_row(slide, state["error"], state["seconds"], state["workers"], state.get("out_dir"))
    return {
        "slide": str(slide), "name": Path(state["out_dir"]).name,
        "status": "skipped" if all(state["skipped"].values()) else "ok", "error": None,
        "out_dir": state["out_dir"], "summary": state["summary"], "seconds": round(state["seconds"], 3),
        "workers": state["workers"],
    }


def _failed_row(slide: Path, error: str, seconds: float, workers: dict, out_dir: str | None = None) -> dict:
    return {
        "slide": str(slide), "name": Path(out_dir).name if out_dir else None, "status": "failed", "error": error,
        "out_dir": out_dir, "summary": None, "seconds": round(seconds, 3), "workers": workers,
    }


# ---------------------------------------------------------------- tasks (run on the workers)
# Each takes and returns a small dict ("state") of paths and stats. Typed errors are turned
# into a one-line "error" there and passed along, so later stages of that slide are no-ops.


def _worker_threads() -> int:
    from distributed import get_worker

    return max(1, int(get_worker().state.nthreads))


def _stage(state: dict, name: str, work) -> dict:
    if state.get("error"):
        return state
    from distributed import get_worker

    t0 = time.perf_counter()
    state = {**state, "workers": {**state["workers"], name: get_worker().address}}
    try:
        state = work(state)
    except WsipipeError as exc:
        state = {**state, "error": str(exc).splitlines()[0]}
    state["seconds"] += time.perf_counter() - t0
    return state


def _local_cfg(cfg: PipelineConfig) -> PipelineConfig:
    """Inside a task: stay on this worker, with as many threads as it has."""
    dask = cfg.dask.model_copy(update={"scheduler_address": None, "num_workers": _worker_threads()})
    return cfg.model_copy(update={"dask": dask})


def _tile_task(slide: Path, out_dir: Path, cfg: PipelineConfig) -> dict:
    from wsipipe.run.pipeline import slide_output_name
    from wsipipe.slides.slide import open_slide
    from wsipipe.tiles.tiling import tile_slide

    def work(state: dict) -> dict:
        with open_slide(slide, cfg.mpp_override) as s:
            slide_dir = out_dir / slide_output_name(slide, s.identity)
        stats = tile_slide(slide, slide_dir / "patches.zarr", _local_cfg(cfg))
        return {**state, "out_dir": str(slide_dir), "skipped": {"tile": bool(stats.get("skipped"))}}

    return _stage({"slide": str(slide), "workers": {}, "seconds": 0.0, "skipped": {}}, "tile", work)


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int, arch: str | None, num_classes: int | None):
    from wsipipe.models.model import load_model

    return load_model(path, arch, num_classes)


def _infer_task(state: dict, weights: Path, cfg: PipelineConfig) -> dict:
    import torch

    from wsipipe.models.inference import infer_store

    def work(state: dict) -> dict:
        try:
            mtime = weights.stat().st_mtime_ns
        except OSError:
            mtime = 0  # load_model names the missing file
        model, info = _cached_model(str(weights), mtime, cfg.model.arch, cfg.model.num_classes)
        threads = torch.get_num_threads()
        torch.set_num_threads(_worker_threads())  # a 1-thread worker must not spread over every core
        try:
            stats = infer_store(Path(state["out_dir"]) / "patches.zarr", model, info, cfg.inference)
        finally:
            torch.set_num_threads(threads)
        return {**state, "skipped": {**state["skipped"], "infer": bool(stats.get("skipped"))}}

    return _stage(state, "infer", work)


def _stitch_task(state: dict, cfg: PipelineConfig) -> dict:
    from wsipipe.outputs.report import write_slide_report
    from wsipipe.outputs.stitch import stitch_store

    def work(state: dict) -> dict:
        slide_dir = Path(state["out_dir"])
        summary = stitch_store(slide_dir / "patches.zarr", slide_dir, cfg.stitch, qc_cfg=cfg.qc, export=cfg.export)
        write_slide_report(slide_dir, cfg.qc, only_if_changed=True)
        return {**state, "summary": summary}

    return _stage(state, "stitch", work)
