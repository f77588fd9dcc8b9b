"""Tiling throughput and memory, side by side in one run on the same slide.

    python bench/bench_tiling.py                   # 20k x 20k generated slide, ~2 min
    python bench/bench_tiling.py --size 100000     # the 100k x 100k memory check (slow: generation)

Prints a table and writes bench/results/tiling.json. Compares, on the same patch list:
  * wsipipe tile_slide (Dask threads, 1 and 2 workers): tissue detection, reads, Zarr writes
  * wsipipe read_patches alone (the read path: direct tile decode for SVS/TIFF)
  * naive loop: one openslide read_region per patch, converted to RGB (the way CLAM /
    TIAToolbox / WSInfer extract), with no writes at all (so it is flattered)
and the peak RSS of a tiling process (measured by the OS, in a child process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe import store  # noqa: E402
from wsipipe.config import load_config  # noqa: E402
from wsipipe.synth import write_synthetic_slide  # noqa: E402
from wsipipe.slide import open_slide  # noqa: E402
from wsipipe.tiling import GridSpec, read_patches, tile_slide  # noqa: E402


def naive_loop(slide_path: Path, coords: np.ndarray, size: int) -> float:
    with openslide.OpenSlide(str(slide_path)) as s:
        t0 = time.perf_counter()
        for x, y in coords:
            np.asarray(s.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"))
        return time.perf_counter() - t0


def timed_tile(slide: Path, out: Path, workers: int, overrides: dict) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)  # a complete store would be skipped, not re-tiled
    cfg = load_config(None, {**overrides, "dask.num_workers": workers})
    t0 = time.perf_counter()
    stats = tile_slide(slide, out, cfg)
    return time.perf_counter() - t0, stats["n_patches"]


def peak_rss_child(slide: Path, out: Path, overrides: dict) -> float:
    """Tile in a fresh process and return its peak RSS in MiB (the child's own VmHWM;
    ru_maxrss would carry this parent's RSS across fork/exec)."""
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import sys, json; from wsipipe.config import load_config; from wsipipe.tiling import tile_slide;"
        f"tile_slide({str(slide)!r}, {str(out)!r}, load_config(None, json.loads(sys.argv[1])));"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    res = subprocess.run([sys.executable, "-c", code, json.dumps(overrides)], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=20000, help="edge of the generated slide, level-0 px")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--naive-max", type=int, default=2000, help="patches timed in the naive loop")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsipipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"bench-{args.size}.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        write_synthetic_slide(slide, args.size, args.size, mpp=0.5, seed=7, n_tissue=4, n_tumor=3)
        print(f"generated {slide} in {time.perf_counter() - t0:.1f} s")
    overrides = {"tile.mpp": 0.5, "tile.patch_size": 224}

    rows = []
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "slide": str(slide)}
    for workers in (1, 2):
        out = work / f"tiles-w{workers}.zarr"
        seconds, n = timed_tile(slide, out, workers, overrides)
        rows.append((f"wsipipe tile, {workers} worker(s)", n, seconds))
    group = store.open_store(work / "tiles-w1.zarr")
    coords, grid_ij = group["coords"][:], group["grid_ij"][:]
    spec = GridSpec(**{k: v for k, v in store.meta(group)["tile"].items() if k in GridSpec.__annotations__})
    with open_slide(slide) as s:
        t0 = time.perf_counter()
        read_patches(s, spec, grid_ij)
        rows.append(("wsipipe read_patches only, 1 thread (no writes)", len(grid_ij), time.perf_counter() - t0))
    sample = coords[: args.naive_max]
    naive_s = naive_loop(slide, sample, 224)
    rows.append(("naive read_region loop, 1 thread (no writes)", len(sample), naive_s))

    print(f"\nTiling {slide.name} ({args.size} x {args.size} px, 0.5 µm/px, 224-px patches)")
    print(f"{'method':48s} {'patches':>8s} {'seconds':>8s} {'patches/s':>10s} {'Mpx/s':>7s}")
    for name, n, s in rows:
        print(f"{name:48s} {n:8d} {s:8.2f} {n / s:10.1f} {n * 224 * 224 / s / 1e6:7.1f}")
    per_s = {name: n / s for name, n, s in rows}
    w1, w2 = per_s[rows[0][0]], per_s[rows[1][0]]
    reads, naive = per_s[rows[2][0]], per_s[rows[3][0]]
    print(
        f"\nreads: wsipipe / naive {reads / naive:.2f}x;  whole tiling (reads + Zarr writes + tissue), "
        f"1 worker / naive reads {w1 / naive:.2f}x;  2 workers / 1 worker {w2 / w1:.2f}x"
    )

    rss = peak_rss_child(slide, work / "tiles-rss.zarr", overrides)
    print(f"peak RSS of a tiling process: {rss:.0f} MiB")
    results.update(
        rows=[{"method": n, "patches": k, "seconds": s, "patches_per_s": k / s} for n, k, s in rows],
        read_ratio_vs_naive=reads / naive, tile_ratio_vs_naive=w1 / naive, scaling_2_workers=w2 / w1,
        peak_rss_mib=rss, size=args.size,
    )
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"tiling-{args.size}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
