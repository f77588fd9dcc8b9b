"""Which Dask cluster tiling runs on: an existing scheduler, or a LocalCluster for a block of work.

The flows open one cluster per run and hand its address to every slide through
``cfg.dask.scheduler_address``; ``wsipipe.tiling`` then submits its chunk tasks there. The
same address can be a Slurm (dask-jobqueue) or Kubernetes (dask-kubernetes) scheduler.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from wsipipe.config import PipelineConfig


@contextmanager
def dask_scheduler(cfg: PipelineConfig) -> Iterator[PipelineConfig]:
    """Yield ``cfg`` with ``dask.scheduler_address`` set: the configured scheduler as is, or a
    LocalCluster that lives for the block: ``dask.num_workers`` workers (default one per core),
    threads in this process unless ``orchestration.local_cluster_processes``."""
    if cfg.dask.scheduler_address:
        yield cfg
        return
    from distributed import LocalCluster

    workers = cfg.dask.num_workers or os.cpu_count() or 1
    processes = cfg.orchestration.local_cluster_processes
    # Threads talk in-process (inproc://); worker processes over TCP on the loopback only.
    where = {"host": "127.0.0.1"} if processes else {}
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None, **where
    ) as cluster:
        local = cfg.model_copy(deep=True)
        local.dask.scheduler_address = cluster.scheduler_address
        yield local
