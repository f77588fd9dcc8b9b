"""Tiling throughput against the naive loop and the JPEG-decode bound, side by side in one run.

    python bench/bench_tiling.py                   # 20k x 20k mosaic of real H&E tiles, a few minutes
    python bench/bench_tiling.py --size 100000     # 100k x 100k (generation ~15 s, runs much longer)

The slide is a mosaic of real JPEG tiles of cmu-1-small-region.svs (wsipipe.slides.mosaic), so
decode cost and compression are those of real H&E. For each resolution (native 0.5 µm/px,
and 1.0 µm/px = 2x downsampling from level 0) and on the same patch list it measures:
  * raw decode bound: every tile of the needed level that a patch touches, read and decoded
    once (os.pread + libjpeg-turbo into one reused buffer), nothing else, 1 thread
  * wsipipe read_patches alone (the read path as a tiling task runs it: 64 patches at a time
    into one reused buffer, 1 thread, no writes)
  * wsipipe tile_slide with 1, 2 and 3 Dask workers: the chunk phase (reads + QC + Zarr writes),
    also per CPU-second of the process (all threads: the per-core rate), and the whole stage
    (plus thumbnail and tissue detection); with the default zstd, and with tile.codec none
    and jpeg; at 2x also with tile.resample lanczos; and with each chunk's patch write done
    before its QC instead of overlapping it (the serial variant, for comparison)
  * naive loop: one openslide read_region per patch, converted to RGB (and Lanczos-resized
    at 2x), the way CLAM / TIAToolbox / WSInfer extract, without any writes
Variants run in a rotating order for ``--repeats`` rounds; ratios are taken within a round.
Prints a table and writes bench/results/tiling-<size>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe.tiles import store  # noqa: E402
from wsipipe.config import load_config  # noqa: E402
from wsipipe.slides.slide import open_slide  # noqa: E402
from wsipipe.tiles.tiling import GridSpec, read_patches, tile_slide  # noqa: E402
from benchutil import decode_bound, mosaic_slide, naive_loop, needed_tiles, write_results  # noqa: E402


def timed_tile(slide: Path, out: Path, workers: int, overrides: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a complete store would be skipped, not re-tiled
    cfg = load_config(None, {**overrides, "dask.num_workers": workers})
    marks: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    stats = tile_slide(slide, out, cfg, progress=lambda done, total: marks.append((time.perf_counter(), time.process_time())))
    total, cpu_end = time.perf_counter() - t0, time.process_time()
    decoded = stats["tiles_decoded"]
    return {"seconds": total, "chunk_seconds": total - (marks[0][0] - t0), "n": stats["n_patches"], "decoded": decoded,
            "chunk_cpu_seconds": cpu_end - marks[0][1]}


class _SequentialWrites:
    """Stands in for tiling's writer pool: each chunk's patch write runs before its QC, in the
    task's own thread instead of overlapping it, for a side-by-side comparison with the real pool."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        done = Future()
        done.set_result(fn(*args))
        return done


def timed_tile_sequential_writes(slide: Path, out: Path, workers: int, overrides: dict) -> dict:
    import wsipipe.tiles.tiling as tiling

    pool = tiling._writer
    tiling._writer = _SequentialWrites
    try:
        return timed_tile(slide, out, workers, overrides)
    finally:
        tiling._writer = pool


def read_only(slide: Path, spec: GridSpec, grid_ij: np.ndarray, chunk: int = 64) -> tuple[float, int]:
    """The read path the way a tiling task runs it: chunk by chunk into one reused buffer."""
    buf = np.empty((chunk, spec.patch_size, spec.patch_size, 3), np.uint8)
    with open_slide(slide) as s:
        t0 = time.perf_counter()
        for i in range(0, len(grid_ij), chunk):
            cells = grid_ij[i : i + chunk]
            read_patches(s, spec, cells, out=buf[: len(cells)])
        seconds = time.perf_counter() - t0
        return seconds, s.fast_reader(spec.level).decoded


def bench_resolution(slide: Path, work: Path, mpp: float, repeats: int, naive_max: int) -> dict:
    overrides = {"tile.mpp": mpp, "tile.patch_size": 224}
    ref = timed_tile(slide, work / "ref.zarr", 1, overrides)  # warm-up run; also gives the patch list
    group = store.open_store(work / "ref.zarr")
    coords, grid_ij = group["coords"][:], group["grid_ij"][:]
    spec = GridSpec(**{k: v for k, v in store.meta(group)["tile"].items() if k in GridSpec.__annotations__})
    with open_slide(slide) as s:
        tile_px = s.fast_reader(spec.level).tile_w
    tiles = needed_tiles(spec, coords, tile_px)
    n, sample = len(coords), coords[:: max(1, len(coords) // naive_max)][:naive_max]
    variants = {
        "raw decode bound (needed tiles once), 1 thread": lambda: decode_bound(slide, spec, tiles)[0],
        "wsipipe read_patches, 1 thread, no writes": lambda: read_only(slide, spec, grid_ij)[0],
        "wsipipe tile, 1 worker: chunk phase": lambda: timed_tile(slide, work / "w1.zarr", 1, overrides),
        "wsipipe tile, 2 workers: chunk phase": lambda: timed_tile(slide, work / "w2.zarr", 2, overrides),
        "wsipipe tile, 1 worker, write then QC (no overlap): chunk phase": lambda: timed_tile_sequential_writes(
            slide, work / "s1.zarr", 1, overrides),
        "wsipipe tile, 2 workers, write then QC (no overlap): chunk phase": lambda: timed_tile_sequential_writes(
            slide, work / "s2.zarr", 2, overrides),
        # One thread more than cores: does a thread waiting on its write leave a core idle?
        "wsipipe tile, 3 workers: chunk phase": lambda: timed_tile(slide, work / "w3.zarr", 3, overrides),
        "wsipipe tile, 1 worker, tile.codec=none: chunk phase": lambda: timed_tile(
            slide, work / "n1.zarr", 1, {**overrides, "tile.codec": "none"}),
        "wsipipe tile, 1 worker, tile.codec=jpeg: chunk phase": lambda: timed_tile(
            slide, work / "j1.zarr", 1, {**overrides, "tile.codec": "jpeg"}),
        "wsipipe tile, 2 workers, tile.codec=jpeg: chunk phase": lambda: timed_tile(
            slide, work / "j2.zarr", 2, {**overrides, "tile.codec": "jpeg"}),
        "naive read_region loop, 1 thread, no writes": lambda: naive_loop(slide, sample, spec),
    }
    if spec.needs_resize:  # the cheaper filter wsipipe offers for resampled patches
        lanczos = dataclasses.replace(spec, resample="lanczos")
        variants["wsipipe read_patches, tile.resample=lanczos, 1 thread"] = lambda: read_only(slide, lanczos, grid_ij)[0]
        variants["wsipipe tile, 1 worker, tile.resample=lanczos: chunk phase"] = lambda: timed_tile(
            slide, work / "l1.zarr", 1, {**overrides, "tile.resample": "lanczos"})
    counts = {k: (len(sample) if k.startswith("naive") else n) for k in variants}
    rounds: list[dict] = []
    names = list(variants)
    for r in range(repeats):
        got = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            res = variants[name]()
            if isinstance(res, dict):
                got[name] = counts[name] / res["chunk_seconds"]
                got[name.replace("chunk phase", "whole stage")] = counts[name] / res["seconds"]
                got[name + " decoded"] = res["decoded"]
                # Per core: patches per CPU-second of the whole process (all its threads).
                got[name.replace("chunk phase", "per CPU-second")] = counts[name] / res["chunk_cpu_seconds"]
            else:
                got[name] = counts[name] / res
        rounds.append(got)
    per_s = {k: statistics.median(rd[k] for rd in rounds) for k in rounds[0] if not k.endswith("decoded")}
    bound = "raw decode bound (needed tiles once), 1 thread"
    ratio = lambda a, b: statistics.median(rd[a] / rd[b] for rd in rounds)  # noqa: E731
    w1, w2 = "wsipipe tile, 1 worker: chunk phase", "wsipipe tile, 2 workers: chunk phase"
    j1, j2 = (f"wsipipe tile, {k}, tile.codec=jpeg: chunk phase" for k in ("1 worker", "2 workers"))
    naive, reads = "naive read_region loop, 1 thread, no writes", "wsipipe read_patches, 1 thread, no writes"
    return {
        "mpp": mpp, "level": spec.level, "needs_resize": spec.needs_resize, "patches": n,
        "tiles_needed": len(tiles), "tiles_decoded_by_tile_1_worker": rounds[-1][w1 + " decoded"],
        "patches_per_s": per_s,
        "ratios": {
            "tile 1 worker / naive": ratio(w1, naive),
            "read_patches / naive": ratio(reads, naive),
            "tile 1 worker / decode bound": ratio(w1, bound),
            "tile per CPU-second / decode bound": ratio(w1.replace("chunk phase", "per CPU-second"), bound),
            "tile 2 workers per CPU-second / decode bound": ratio(w2.replace("chunk phase", "per CPU-second"), bound),
            "tile per CPU-second / naive": ratio(w1.replace("chunk phase", "per CPU-second"), naive),
            "tile codec=none 1 worker / decode bound": ratio(w1.replace("1 worker", "1 worker, tile.codec=none"), bound),
            "read_patches / decode bound": ratio(reads, bound),
            "tile 2 workers / 1 worker": ratio(w2, w1),
            "tile 3 workers / 2 workers": ratio("wsipipe tile, 3 workers: chunk phase", w2),
            "tile 1 worker, write during QC / write then QC": ratio(
                w1, "wsipipe tile, 1 worker, write then QC (no overlap): chunk phase"),
            "tile 2 workers, write during QC / write then QC": ratio(
                w2, "wsipipe tile, 2 workers, write then QC (no overlap): chunk phase"),
            "tile jpeg 1 worker / naive": ratio(j1, naive),
            "tile jpeg 1 worker / decode bound": ratio(j1, bound),
            "tile jpeg 2 workers / 1 worker": ratio(j2, j1),
            **({
                "read_patches lanczos / decode bound": ratio("wsipipe read_patches, tile.resample=lanczos, 1 thread", bound),
                "tile lanczos 1 worker / naive": ratio("wsipipe tile, 1 worker, tile.resample=lanczos: chunk phase", naive),
                "tile lanczos per CPU-second / decode bound": ratio(
                    "wsipipe tile, 1 worker, tile.resample=lanczos: per CPU-second", bound),
            } if spec.needs_resize else {}),
        },
        "warmup_seconds": ref["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="edge of the generated mosaic slide, level-0 px")
    ap.add_argument("--mpp", default="0.5,1.0", help="comma list of patch resolutions, µm/px")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--naive-max", type=int, default=1000, help="patches timed in the naive loop")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsipipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = mosaic_slide(work, args.size)
    load = os.getloadavg()
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_start": load,
                    "gpu": None},
        "slide": str(slide), "size": args.size, "runs": [],
    }
    for mpp in (float(m) for m in args.mpp.split(",")):
        res = bench_resolution(slide, work, mpp, args.repeats, args.naive_max)
        results["runs"].append(res)
        print(f"\nTiling {args.size}² mosaic of real H&E at {mpp} µm/px (level {res['level']}, "
              f"{'resampled' if res['needs_resize'] else 'native'}), {res['patches']} patches of 224 px; "
              f"{res['tiles_needed']} tiles needed, tile (1 worker) decoded {res['tiles_decoded_by_tile_1_worker']}")
        print(f"{'method':52s} {'patches/s':>10s} {'Mpx/s':>8s}")
        for name, v in res["patches_per_s"].items():
            print(f"{name:52s} {v:10.1f} {v * 224 * 224 / 1e6:8.1f}")
        for name, v in res["ratios"].items():
            print(f"  {name:40s} {v:6.2f}x")
    results["loadavg_at_end"] = os.getloadavg()
    print(f"\nload average at start {load[0]:.1f}, at end {results['loadavg_at_end'][0]:.1f} (2 cores shared)")
    write_results(f"tiling-{args.size}", results)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
