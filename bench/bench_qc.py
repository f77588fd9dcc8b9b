"""What slide QC costs against decoding the same patches, side by side in one run.

    python bench/bench_qc.py [--size 16384] [--repeats 3]

On a mosaic of real H&E tiles at 0.25 µm/px (wsipipe.slides.mosaic), for patches at 0.25 µm/px
(native) and 0.5 µm/px (2x down): the tiler's own patch list, then, in one process and one
thread, CPU seconds of (a) the decode bound: every level-0 tile a patch touches, read and
decoded once (benchutil.decode_bound), (b) ``read_patches`` (decode + assembly + reduction),
(c) ``qc.patch_qc`` on those patches in 64-patch chunks, as tiling calls it. Prints QC as a
fraction of the decode bound (the target is <= 10 %) for each resolution, medians of
``--repeats`` rounds in alternating order. Writes bench/results/qc.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import SOURCE, decode_bound, needed_tiles, write_results  # noqa: E402
from wsipipe.config import TissueConfig  # noqa: E402
from wsipipe.slides.mosaic import write_mosaic_slide  # noqa: E402
from wsipipe.slides.slide import open_slide  # noqa: E402
from wsipipe.slides.tissue import detect_tissue  # noqa: E402
from wsipipe.tiles import qc  # noqa: E402
from wsipipe.tiles.tiling import plan_grid, read_patches, select_patches  # noqa: E402


def cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def bench_resolution(path: Path, mpp: float, repeats: int, max_patches: int) -> dict:
    with open_slide(path) as s:
        thumb, ds = s.thumbnail(8.0, 2048)
        mask = detect_tissue(thumb, ds, s.mpp, TissueConfig())
        spec = plan_grid(*s.dimensions, s.mpp, s.level_downsamples, mpp, 224, 224)
        tile_px = s.fast_reader(0).tile_w
    grid_ij, coords, _ = select_patches(spec, mask.mask, mask.downsample, 0.5)
    grid_ij, coords = grid_ij[:max_patches], coords[:max_patches]
    tiles = needed_tiles(spec, coords, tile_px)
    patches = np.empty((len(grid_ij), 224, 224, 3), np.uint8)

    def read() -> None:
        with open_slide(path) as s:
            for i in range(0, len(grid_ij), 64):
                read_patches(s, spec, grid_ij[i : i + 64], out=patches[i : i + 64])

    def measure() -> None:
        for i in range(0, len(patches), 64):
            qc.patch_qc(patches[i : i + 64])

    read()  # QC measures these patches in every round
    variants = {"decode bound": lambda: decode_bound(path, spec, tiles), "read_patches": read, "patch_qc": measure}
    rounds: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        for label in list(variants)[:: 1 if r % 2 == 0 else -1]:
            rounds[label].append(cpu(variants[label]))
    ms = {k: statistics.median(v) / len(grid_ij) * 1e3 for k, v in rounds.items()}
    share = statistics.median(q / d for q, d in zip(rounds["patch_qc"], rounds["decode bound"], strict=True))
    print(f"{mpp} µm/px ({'native' if mpp == 0.25 else '2x down'}), {len(grid_ij)} patches, {len(tiles)} tiles: CPU ms/patch "
          f"decode bound {ms['decode bound']:.3f}, read_patches {ms['read_patches']:.3f}, patch_qc {ms['patch_qc']:.3f} "
          f"-> QC = {share:.1%} of decode", flush=True)
    return {"patches": len(grid_ij), "tiles": len(tiles), "cpu_ms_per_patch": ms, "qc_over_decode": share}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-patches", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mosaic.svs"
        write_mosaic_slide(path, args.size, args.size, SOURCE, mpp=0.25, seed=3)
        results = {str(mpp): bench_resolution(path, mpp, args.repeats, args.max_patches) for mpp in (0.25, 0.5)}
    write_results("qc", results)


if __name__ == "__main__":
    main()
