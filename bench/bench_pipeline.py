"""Whole pipeline per slide: peak memory and slides/hour (tile -> infer -> stitch), in fresh processes.

    python bench/bench_pipeline.py                          # 10k² and 20k² mosaics, a few minutes
    python bench/bench_pipeline.py --sizes 20000,100000     # the 100k x 100k figure (tens of minutes on 2 cores)

For each size a mosaic of real H&E tiles (wsipipe.slides.mosaic, 0.5 µm/px, 256-px JPEG tiles) is
processed at 0.5 µm/px by ``wsipipe.run.pipeline.run_slide`` with a ResNet18 (random weights:
speed does not depend on them) in a child process, which reports its stage times and its
peak RSS (VmHWM, the kernel's high-water mark of the child alone). A second child runs
tiling alone, for the tiling peak. Comparing sizes shows whether memory grows with the slide.
Prints a table and writes bench/results/pipeline-<sizes>.json.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import mosaic_slide, write_results  # noqa: E402

# Runs in the child: the whole pipeline or tiling alone; prints one JSON line.
CHILD = r"""
import json, sys, threading, time
from wsipipe.config import load_config
mode, slide, out, weights, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
cfg = load_config(None, overrides)
stages = {}
current = ["load"]  # the stage whose progress was reported last ("load" before any)
stage_peak = {}  # stage -> highest RSS sampled while it was current, MiB
def rss_mib():
    return int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmRSS")][0]) / 1024
def sample():
    while True:  # a daemon thread: ends with the process
        time.sleep(0.2)
        stage_peak[current[0]] = max(stage_peak.get(current[0], 0.0), rss_mib())
threading.Thread(target=sample, daemon=True).start()
def progress(stage, done, total):
    now = time.perf_counter()
    first, _, _ = stages.get(stage, (now, now, total))
    stages[stage] = (first, now, total)
    if done >= total:  # what runs after a stage's last patch (exports, the report) is counted as its "+after"
        stage = stage + "+after"
    current[0] = stage
t0 = time.perf_counter()
if mode == "pipeline":
    from wsipipe.run.pipeline import run_slide
    res = run_slide(slide, out, cfg, weights, progress=progress)
    n = res.summary.get("n_patches")
else:
    from wsipipe.tiles.tiling import tile_slide
    n = tile_slide(slide, out + "/tiles.zarr", cfg, progress=lambda d, t: progress("tile", d, t))["n_patches"]
seconds = time.perf_counter() - t0
peak = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0]) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "n_patches": n, "stage_peak_rss_mib": stage_peak,
                  "stages": {k: {"first_progress_to_last": b - a, "total": t} for k, (a, b, t) in stages.items()}}))
"""


def child(mode: str, slide: Path, out: Path, weights: Path, overrides: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(slide), str(out), str(weights), json.dumps(overrides)],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000", help="comma list of slide edges, level-0 px")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--precision", default="auto", help="inference precision (auto = bf16 where the CPU has it)")
    ap.add_argument("--compile", action="store_true", help="inference.compile: torch.compile the model")
    ap.add_argument("--arch", default="resnet18", help="torchvision classifier (a small one, e.g. mobilenet_v3_small, "
                    "gets through a 100k² slide's inference in minutes when only memory is of interest)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsipipe-bench-pipe-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from wsipipe.models.model import build_model, save_weights

    torch.manual_seed(0)
    weights = work / f"{args.arch}.safetensors"
    save_weights(build_model(args.arch, 1), weights, args.arch, 1)
    overrides = {"tile.mpp": 0.5, "tile.patch_size": 224, "inference.precision": args.precision,
                 "inference.compile": args.compile}
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        slide = mosaic_slide(work, size)
        load0 = os.getloadavg()[0]
        tiling = child("tile", slide, work / f"tile-{size}", weights, overrides)
        shutil.rmtree(work / f"tile-{size}")  # ~10 GB at 100k²: free the disk before the pipeline writes its own
        pipe = child("pipeline", slide, work / f"pipe-{size}", weights, overrides)
        rows.append({"size": size, "tiling": tiling, "pipeline": pipe, "loadavg": [load0, os.getloadavg()[0]],
                     "slides_per_hour": 3600.0 / pipe["seconds"]})
        print(f"{size}² done: {pipe['n_patches']} patches, {pipe['seconds']:.0f} s, peak {pipe['peak_rss_mib']:.0f} MiB",
              flush=True)
        print("  peak RSS by stage (MiB, sampled every 0.2 s):",
              ", ".join(f"{k} {v:.0f}" for k, v in pipe["stage_peak_rss_mib"].items()), flush=True)

    print(f"\nWhole pipeline at 0.5 µm/px, {args.arch} ({args.precision}{', compiled' if args.compile else ''}), "
          f"{os.cpu_count()} CPUs, no GPU")
    print(f"{'slide':>9s} {'patches':>8s} {'tile s':>7s} {'infer s':>8s} {'stitch s':>8s} {'total s':>8s} "
          f"{'slides/h':>8s} {'peak RSS tiling':>16s} {'peak RSS pipeline':>18s} {'load':>9s}")
    for r in rows:
        st = r["pipeline"]["stages"]
        t = {k: st.get(k, {}).get("first_progress_to_last", float("nan")) for k in ("tile", "infer", "stitch")}
        print(f"{r['size']:>8d}² {r['pipeline']['n_patches']:8d} {t['tile']:7.0f} {t['infer']:8.0f} {t['stitch']:8.1f} "
              f"{r['pipeline']['seconds']:8.0f} {r['slides_per_hour']:8.1f} {r['tiling']['peak_rss_mib']:13.0f} MiB "
              f"{r['pipeline']['peak_rss_mib']:15.0f} MiB {r['loadavg'][0]:4.1f}-{r['loadavg'][1]:.1f}")
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "gpu": None},
               "precision": args.precision, "arch": args.arch, "compile": args.compile, "rows": rows}
    write_results(f"pipeline-{args.sizes.replace(',', '-')}{'-compiled' if args.compile else ''}", results)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
