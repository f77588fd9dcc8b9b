"""Two-stage (tile with stored patches, then infer from the store) vs fused (tile.store_patches:
false: plan only, then infer reading the patches from the slide), side by side in one process.

    python bench/bench_fused.py                      # 10k² mosaic, a model standing in for a GPU
    python bench/bench_fused.py --arch resnet18      # the same with ResNet18 on this CPU
    python bench/bench_fused.py --size 20000 --repeats 3

The slide is a mosaic of real H&E tiles (wsipipe.slides.mosaic) at 0.5 µm/px, tiled at 0.5 µm/px
into 224-px patches. The default model (``--arch tiny``: one strided convolution, pooling and a
linear layer) costs next to nothing, so the CPU figures are those of a GPU box, where the CPUs
only feed the model: decoding, QC, and for the two-stage path compressing, writing and reading
back every patch. The variants alternate (two-stage, fused, two-stage, ...) and each is timed
by wall clock and by this process's CPU time (every thread: readers, writers, torch); the best
run of each is reported. Prints a table and writes bench/results/fused-<size>-<arch>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import mosaic_slide, write_results  # noqa: E402


def model(arch: str):
    import torch
    from torch import nn

    from wsipipe.models.model import ModelInfo, build_model

    torch.manual_seed(0)
    if arch == "tiny":
        net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))
    else:
        net = build_model(arch, 1)  # random weights: speed does not depend on them
    return net.eval(), ModelInfo(arch=arch, num_classes=1, sha256=f"bench-{arch}".ljust(64, "0"), path=None)


def one_run(slide: Path, work: Path, store_patches: bool, net, info, overrides: dict) -> dict:
    """Tile then infer into a fresh store; wall and CPU seconds per stage."""
    from wsipipe.config import load_config
    from wsipipe.models.inference import infer_store
    from wsipipe.tiles.tiling import tile_slide

    cfg = load_config(None, {**overrides, "tile.store_patches": store_patches})
    path = work / ("two-stage.zarr" if store_patches else "fused.zarr")
    shutil.rmtree(path, ignore_errors=True)
    w0, c0 = time.perf_counter(), time.process_time()
    n = tile_slide(slide, path, cfg)["n_patches"]
    w1, c1 = time.perf_counter(), time.process_time()
    infer_store(path, net, info, cfg.inference, readers=cfg.dask.num_workers)
    w2, c2 = time.perf_counter(), time.process_time()
    stored = sum(f.stat().st_size for f in (path / "patches").rglob("*") if f.is_file()) if store_patches else 0
    return {
        "n_patches": n, "tile_wall_s": w1 - w0, "tile_cpu_s": c1 - c0, "infer_wall_s": w2 - w1,
        "infer_cpu_s": c2 - c1, "wall_s": w2 - w0, "cpu_s": c2 - c0, "patch_bytes": stored,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=10000, help="slide edge, level-0 px")
    ap.add_argument("--arch", default="tiny", help="tiny (stands in for a GPU) or a torchvision architecture")
    ap.add_argument("--device", default="cpu", help="inference.device (auto, cpu, cuda)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    ap.add_argument("--workers", type=int, default=None, help="tiling / reader threads (default: cores)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    import torch

    work = args.workdir or Path(tempfile.gettempdir()) / "wsipipe-bench-fused"
    work.mkdir(parents=True, exist_ok=True)
    slide = mosaic_slide(work, args.size)
    net, info = model(args.arch)
    overrides = {"inference.device": args.device, "inference.precision": "auto", "dask.num_workers": args.workers}
    runs: dict[str, list[dict]] = {"two-stage": [], "fused": []}
    for _ in range(args.repeats):
        for name, keep in (("two-stage", True), ("fused", False)):
            runs[name].append(one_run(slide, work, keep, net, info, overrides))
            r = runs[name][-1]
            print(f"  {name:>9s}: wall {r['wall_s']:6.1f} s, cpu {r['cpu_s']:6.1f} s", flush=True)

    best = {name: min(rs, key=lambda r: r["cpu_s"]) for name, rs in runs.items()}
    print(f"\n{args.size}² mosaic, {best['fused']['n_patches']} patches of 224 px, model {args.arch} on {args.device}, "
          f"{os.cpu_count()} cores, best of {args.repeats}:")
    print(f"{'':>9s} {'tile wall':>9s} {'tile cpu':>9s} {'infer wall':>10s} {'infer cpu':>9s} {'wall s':>7s} {'cpu s':>7s}")
    for name, r in best.items():
        print(f"{name:>9s} {r['tile_wall_s']:9.2f} {r['tile_cpu_s']:9.2f} {r['infer_wall_s']:10.2f} "
              f"{r['infer_cpu_s']:9.2f} {r['wall_s']:7.2f} {r['cpu_s']:7.2f}")
    two, fused = best["two-stage"], best["fused"]
    ratios = {"cpu": two["cpu_s"] / fused["cpu_s"], "wall": two["wall_s"] / fused["wall_s"]}
    print(f"two-stage / fused: CPU {ratios['cpu']:.2f}x, wall {ratios['wall']:.2f}x; "
          f"the two-stage store held {two['patch_bytes'] / 2**20:.0f} MiB of patches, the fused one none")
    out = write_results(f"fused-{args.size}-{args.arch}", {
        "size": args.size, "arch": args.arch, "device": args.device, "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "runs": runs, "best": best, "two_stage_over_fused": ratios,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
