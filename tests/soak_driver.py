"""The long-lived process of the soak test (tests/test_concurrency.py): processes one small
archive ROUNDS times on a Dask scheduler with two `dask worker` processes, SIGKILLing the
worker seen running a tile task in every round (and starting a replacement at once, which
joins while the round goes on), and prints one JSON line per round with its own open file
descriptors, RSS and the temporary files left in the output tree.

    python tests/soak_driver.py ARCHIVE_DIR OUT_DIR WEIGHTS ROUNDS

Every round must redo real work: the rounds alternate ``tile.chunk_patches`` between two
values, which changes the tile identity (not the patches), so every slide's store is rebuilt
in place, in the same output folders, each round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from wsipipe.run.archive import scan_archive
from wsipipe.config import load_config
from wsipipe.locks import stale_temps
from wsipipe.run.pipeline import run_slide

BASE = {"tile.mpp": 2.0, "tile.patch_size": 32, "inference.device": "cpu", "inference.precision": "fp32",
        "inference.batch_size": 64, "export.ome_zarr": False}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def temps_in(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for d in [out, *[p for p in out.iterdir() if p.is_dir()]]
            for p in stale_temps(d)]


def start_worker(address: str) -> subprocess.Popen:
    # No nanny: this driver replaces killed workers itself.
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
         "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def kill_a_tiling_worker(client, pids: dict[str, int], workers: dict[int, subprocess.Popen], address: str,
                         stop: threading.Event, killed: list) -> None:
    """SIGKILL the first worker seen processing a tile task (a chunk of the current slide),
    reap it and start its replacement."""
    while not stop.is_set():
        for worker, keys in client.processing().items():
            if any("wsipipe-tile-" in str(k) for k in keys) and worker in pids:
                pid = pids[worker]
                os.kill(pid, signal.SIGKILL)
                workers.pop(pid).wait()
                replacement = start_worker(address)
                workers[replacement.pid] = replacement
                killed.append(worker)
                return
        time.sleep(0.005)


def wait_for_workers(client, n: int, timeout: float = 120.0) -> dict[str, int]:
    """PIDs of ``n`` running workers (the nanny restarts a killed one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if len(workers) >= n:
            try:
                pids = client.run(os.getpid)
            except Exception:  # a worker left between the two calls
                pids = {}
            if len(pids) >= n:
                return pids
        time.sleep(0.1)
    raise TimeoutError(f"only {len(client.scheduler_info(n_workers=-1)['workers'])} of {n} workers after {timeout} s")


def main(archive: str, out: str, weights: str, rounds: int) -> None:
    from distributed import Client, LocalCluster

    torch.set_num_threads(1)
    out_dir = Path(out)
    slides = scan_archive(archive)
    with LocalCluster(n_workers=0, dashboard_address=None) as cluster, Client(cluster) as client:
        address = cluster.scheduler_address
        workers = {w.pid: w for w in (start_worker(address), start_worker(address))}
        try:
            soak(client, address, workers, slides, out_dir, weights, rounds)
        finally:
            for w in workers.values():
                w.kill()
                w.wait()


def soak(client, address: str, workers: dict, slides: list, out_dir: Path, weights: str, rounds: int) -> None:
    for r in range(rounds):
        pids = wait_for_workers(client, 2)
        cfg = load_config(None, {**BASE, "tile.chunk_patches": 3 + r % 2})
        stop, killed = threading.Event(), []
        watcher = threading.Thread(target=kill_a_tiling_worker, args=(client, pids, workers, address, stop, killed),
                                   daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        summaries = [run_slide(s, out_dir, cfg, weights, client=client).summary for s in slides]
        stop.set()
        watcher.join()
        print(json.dumps({
            "round": r, "seconds": round(time.perf_counter() - t0, 2), "killed": killed,
            "fds": open_fds(), "rss_kib": rss_kib(), "temps": temps_in(out_dir),
            "n_patches": [s["n_patches"] for s in summaries],
            "folders": sorted(p.name for p in out_dir.iterdir()),
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
