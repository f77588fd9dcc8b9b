"""Area vs Lanczos resampling of 2x-reduced patches on real H&E: pixel differences and read cost.

    python bench/bench_resample.py [--patches 300]

For each real H&E slide in ../shared/data/slides (CMU-1 JPEG, TCGA JPEG 2000), read as if
scanned at 0.25 µm/px (``mpp_override``) and tiled at 0.5 µm/px, so patches are an exact 2x
reduction of level 0: the same tissue patches (the tiler's own plan, min tissue 0.5) are read
with ``tile.resample: area`` (tile-wise block means) and ``lanczos`` (Pillow, per patch) through
``wsipipe.tiles.tiling.read_patches``. Prints the mean / 99th percentile / max absolute
difference in grey levels, and the CPU milliseconds per patch of each read (fresh slide handle
each, so both decode every tile once), alternating the order over ``--repeats`` rounds.
Writes bench/results/resample.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import write_results  # noqa: E402
from wsipipe.config import TissueConfig  # noqa: E402
from wsipipe.slides.slide import open_slide  # noqa: E402
from wsipipe.slides.tissue import detect_tissue  # noqa: E402
from wsipipe.tiles.tiling import GridSpec, area_factor, plan_grid, read_patches, select_patches  # noqa: E402

SLIDES = ROOT.parent / "shared" / "data" / "slides"
REAL_HE = ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"]


def tissue_cells(path: Path, max_patches: int) -> tuple[GridSpec, np.ndarray]:
    with open_slide(path, mpp_override=0.25) as s:
        thumb, ds = s.thumbnail(8.0)
        mask = detect_tissue(thumb, ds, s.mpp, TissueConfig())
        # tolerance 0: a pyramid level at ~2x (TCGA's is 2.0005x) is not taken as the target
        spec = plan_grid(*s.dimensions, s.mpp, s.level_downsamples, 0.5, 224, 224, tolerance=0.0, resample="area")
        grid_ij, _, _ = select_patches(spec, mask.mask, mask.downsample, 0.5)
    assert area_factor(spec) == 2, spec
    return spec, grid_ij[:max_patches]


def timed_read(path: Path, spec: GridSpec, grid_ij: np.ndarray) -> tuple[np.ndarray, float]:
    with open_slide(path, mpp_override=0.25) as s:
        t0 = time.process_time()
        patches = np.concatenate([read_patches(s, spec, grid_ij[i : i + 64]) for i in range(0, len(grid_ij), 64)])
        return patches, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {}
    for name in REAL_HE:
        path = SLIDES / name
        spec, cells = tissue_cells(path, args.patches)
        lanczos = dataclasses.replace(spec, resample="lanczos")
        ms: dict[str, list[float]] = {"area": [], "lanczos": []}
        for r in range(args.repeats):
            order = [("area", spec), ("lanczos", lanczos)][:: 1 if r % 2 == 0 else -1]
            got = {}
            for label, s in order:
                got[label], seconds = timed_read(path, s, cells)
                ms[label].append(seconds / len(cells) * 1e3)
        diff = np.abs(got["area"].astype(np.int16) - got["lanczos"].astype(np.int16))
        results[name] = {
            "patches": len(cells),
            "abs_diff_mean": round(float(diff.mean()), 3),
            "abs_diff_p99": float(np.percentile(diff, 99)),
            "abs_diff_max": int(diff.max()),
            "cpu_ms_per_patch": {k: round(statistics.median(v), 3) for k, v in ms.items()},
            "lanczos_over_area_cpu": round(statistics.median(b / a for a, b in zip(ms["area"], ms["lanczos"], strict=True)), 2),
        }
        r = results[name]
        print(f"{name}: {r['patches']} tissue patches at 2x; |area - lanczos| mean {r['abs_diff_mean']}, p99 "
              f"{r['abs_diff_p99']}, max {r['abs_diff_max']} grey levels; read CPU ms/patch area "
              f"{r['cpu_ms_per_patch']['area']}, lanczos {r['cpu_ms_per_patch']['lanczos']} "
              f"({r['lanczos_over_area_cpu']}x)")
    write_results("resample", results)


if __name__ == "__main__":
    main()
