"""Running slides on a dask.distributed cluster, with inference routed to GPU workers.

A client comes from ``cfg.dask``: ``scheduler_address`` connects to an existing cluster
(``dask scheduler`` + ``dask worker``, dask-jobqueue, dask-kubernetes); otherwise a
LocalCluster of worker processes sized to this machine is started and closed with it.

:func:`run_slides` runs each slide's job (wsipipe.run.job: lock, leftovers, stages, row)
with a Dask runner: each stage is one task on one worker, ``infer`` on a worker that
advertises the ``GPU`` resource (``dask worker --resources GPU=1``), the others on a CPU
worker. This process holds each slide folder's lock while its tasks run. A slide is the unit of
parallelism (no data moves between workers but paths: the output folder must be on a
filesystem every worker sees). When the cluster has no GPU workers, inference runs on
any worker; when it has only GPU workers, so does tiling. A GPU worker runs one
inference at a time (each task claims its whole ``GPU=1``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from wsipipe.config import DaskConfig, PipelineConfig
from wsipipe.run.client import connect
from wsipipe.run.job import SlideJob, Stage, StageOutcome, output_dir, run_job, run_stage
from wsipipe.run.names import run_model
from wsipipe.run.rows import SlideResult

__all__ = ["GPU", "dask_client", "dask_scheduler", "local_cluster", "run_slides", "split_workers"]

GPU = "GPU"  # the worker resource name that marks a GPU worker


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
    threads in this process, or processes listening on the loopback only.

    The scheduler and every worker serve HTTP at ``dask.dashboard_address`` (default the
    loopback on a free port). distributed starts these servers even with the dashboard off
    (``dashboard_address=None`` means port 8787 on the host's network address), so the
    address is always given."""
    from distributed import LocalCluster

    n = cfg.num_workers or os.cpu_count() or 1
    where = {"host": "127.0.0.1"} if processes else {}  # threads talk in-process (inproc://)
    http = cfg.dashboard_address
    with LocalCluster(
        n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=http, worker_dashboard_address=http,
        **where,
    ) as cluster:
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
    force: bool = False,
) -> list[SlideResult]:
    """Every slide's job on ``client``'s workers (one task per stage); one row per slide.

    Rows carry ``workers``: the address each stage ran on. A slide that fails is a
    ``failed`` row with the one-line error; the others go on. ``skipped`` = every stage
    was already complete for the same slide, config and model. ``force``: run at settings that
    disagree with the model card (see :func:`wsipipe.run.names.with_card_resolution`)."""
    weights, cfg = run_model(model_path, cfg, force)
    weights = weights.resolve()
    out_dir = Path(out_dir).resolve()
    runner = DaskRunner(client)
    slides = [Path(s).resolve() for s in slides]

    def one(slide: Path) -> SlideResult:
        t0 = time.perf_counter()
        slide_dir = None
        try:
            slide_dir = output_dir(slide, out_dir, cfg)
            return run_job(SlideJob(slide, slide_dir, cfg, weights), runner)
        except Exception as exc:  # a bad slide, a worker died or a bug: still one row, not a lost archive
            return SlideResult.make(
                slide, "failed", name=slide_dir.name if slide_dir else None, error=exc, out_dir=slide_dir,
                seconds=time.perf_counter() - t0, workers=runner.workers(slide),
            )

    if not slides:
        return []
    # One driver thread per slide: it holds the slide's lock while its stage tasks run.
    with ThreadPoolExecutor(max_workers=min(len(slides), 64)) as pool:
        return list(pool.map(one, slides))


class DaskRunner:
    """The runner of ``wsipipe run --scheduler``: each stage one task, on a GPU worker for the
    accelerator stage (when the cluster has one), else on the CPU workers."""

    def __init__(self, client):
        self.client = client
        cpu, gpu = split_workers(client)
        self.on_cpu = {"workers": cpu, "allow_other_workers": False} if cpu else {}
        self.on_gpu = {"resources": {GPU: 1}} if gpu else {}
        self._where: dict[tuple[Path, str], str] = {}

    def __call__(self, stage: Stage, job: SlideJob) -> StageOutcome:
        remote = replace(job, net=None, info=None, client=None, progress=None)  # the worker loads the model itself
        place = self.on_gpu if stage.accelerator else self.on_cpu
        # pure=False: a rerun must run again (the stages themselves skip finished work).
        fut = self.client.submit(
            _on_worker, stage, remote, key=f"{stage.name}-{job.name}-{time.time_ns()}", pure=False, **place
        )
        outcome = fut.result()
        self._where[(job.slide, stage.name)] = outcome.worker
        return outcome

    def workers(self, slide: Path) -> dict[str, str]:
        return {stage: addr for (s, stage), addr in self._where.items() if s == slide}


# ---------------------------------------------------------------- on the workers


def _worker_threads() -> int:
    from distributed import get_worker

    return max(1, int(get_worker().state.nthreads))


def _on_worker(stage: Stage, job: SlideJob) -> StageOutcome:
    """A stage on this worker, with as many threads as it has (tiling and torch alike)."""
    import torch
    from distributed import get_worker

    threads = _worker_threads()
    dask = job.cfg.dask.model_copy(update={"scheduler_address": None, "num_workers": threads})
    job = replace(job, cfg=job.cfg.model_copy(update={"dask": dask}))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # a 1-thread worker must not spread over every core
    try:
        outcome = run_stage(stage, job)
    finally:
        torch.set_num_threads(before)
    return replace(outcome, worker=get_worker().address)
