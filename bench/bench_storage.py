"""Bytes per stored patch, write and read-back speed, and pixel error, per codec, on real H&E.

    python bench/bench_storage.py             # 512 patches of a 10k² mosaic of real H&E tiles, ~1 min
    python bench/bench_storage.py --n 2048

The patches come from ``wsipipe tile`` on a mosaic of real JPEG tiles (wsipipe.slides.mosaic), so
they carry real tissue and the scanner's JPEG artefacts. Lossless codecs are measured as
Zarr v3 arrays on disk the way the tiler writes them (64 patches per chunk); the lossy image
codecs (JPEG, JPEG XL via imagecodecs) per patch, as the encoded bytes a Zarr codec would
store. Codecs run in rotating order for ``--repeats`` rounds; speeds are medians.
Prints a table and writes bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imagecodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe.tiles import store  # noqa: E402
from wsipipe.config import load_config  # noqa: E402
from wsipipe.tiles.tiling import tile_slide  # noqa: E402
from benchutil import mosaic_slide, write_results  # noqa: E402

ZARR_CODECS = {
    "none (raw)": None,
    "zstd level -3 (wsipipe default)": [ZstdCodec(level=-3)],
    "zstd level 1": [ZstdCodec(level=1)],
    "zstd level 9": [ZstdCodec(level=9)],
    "blosc lz4 + byte shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=1)],
    "blosc lz4 1, no shuffle": [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=1)],
    "blosc zstd 3 + bit shuffle": [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=1)],
}
IMAGE_CODECS = {
    "JPEG q95 (4:4:4)": (lambda p: imagecodecs.jpeg8_encode(p, level=95, subsampling=(1, 1)), imagecodecs.jpeg8_decode),
    "JPEG q90 (4:2:0)": (lambda p: imagecodecs.jpeg8_encode(p, level=90, subsampling=(2, 2)), imagecodecs.jpeg8_decode),
    "JPEG XL distance 1, effort 1": (lambda p: imagecodecs.jpegxl_encode(p, distance=1.0, effort=1),
                                     imagecodecs.jpegxl_decode),
    "JPEG XL lossless, effort 1": (lambda p: imagecodecs.jpegxl_encode(p, lossless=True, effort=1),
                                   imagecodecs.jpegxl_decode),
}


def zarr_round_trip(patches: np.ndarray, path: Path, compressors) -> dict:
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    arr = zarr.create_array(str(path), shape=patches.shape, chunks=(64,) + patches.shape[1:], dtype="uint8",
                            compressors=compressors, fill_value=0)
    arr[:] = patches
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = zarr.open_array(str(path))[:]
    read = time.perf_counter() - t0
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")
    return {"write_s": write, "read_s": read, "bytes": stored, "max_abs_err": int(np.abs(back.astype(int) - patches).max())}


def image_round_trip(patches: np.ndarray, encode, decode) -> dict:
    t0 = time.perf_counter()
    blobs = [encode(p) for p in patches]
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = np.stack([decode(b) for b in blobs])
    read = time.perf_counter() - t0
    diff = np.abs(back.astype(np.int16) - patches.astype(np.int16))
    mse = float((diff.astype(np.float64) ** 2).mean())
    return {"write_s": write, "read_s": read, "bytes": sum(len(b) for b in blobs), "max_abs_err": int(diff.max()),
            "mean_abs_err": float(diff.mean()), "psnr_db": 10 * np.log10(255**2 / mse) if mse else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="patches")
    ap.add_argument("--size", type=int, default=10000, help="edge of the mosaic slide the patches come from")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsipipe-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    slide = mosaic_slide(work, args.size)
    tiles = work / "tiles.zarr"
    tile_slide(slide, tiles, load_config(None, {"tile.mpp": 0.5}))
    patches = store.open_store(tiles)["patches"][: args.n]
    n, raw = len(patches), patches.nbytes
    variants = {name: (lambda c=c: zarr_round_trip(patches, work / "codec.zarr", c)) for name, c in ZARR_CODECS.items()}
    variants.update({name: (lambda e=e, d=d: image_round_trip(patches, e, d)) for name, (e, d) in IMAGE_CODECS.items()})
    names, runs = list(variants), {}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs.setdefault(name, []).append(variants[name]())
    print(f"\n{n} patches of 224 px from a {args.size}² mosaic of real H&E ({raw / n / 1024:.0f} KiB raw each), "
          f"1 thread per codec call, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'codec':32s} {'KiB/patch':>9s} {'raw/stored':>10s} {'write patches/s':>15s} {'read patches/s':>14s} "
          f"{'max err':>7s} {'mean err':>8s} {'PSNR dB':>7s}")
    rows = []
    for name in names:
        rr = runs[name]
        row = {"codec": name, "bytes_per_patch": rr[0]["bytes"] / n, "ratio": raw / rr[0]["bytes"],
               "write_patches_per_s": statistics.median(n / x["write_s"] for x in rr),
               "read_patches_per_s": statistics.median(n / x["read_s"] for x in rr),
               "max_abs_err": rr[0]["max_abs_err"], "mean_abs_err": rr[0].get("mean_abs_err", 0.0),
               "psnr_db": rr[0].get("psnr_db")}
        rows.append(row)
        psnr = "lossless" if row["psnr_db"] is None or row["max_abs_err"] == 0 else f"{row['psnr_db']:.1f}"
        print(f"{name:32s} {row['bytes_per_patch'] / 1024:9.1f} {row['ratio']:9.2f}x {row['write_patches_per_s']:15.0f} "
              f"{row['read_patches_per_s']:14.0f} {row['max_abs_err']:7d} {row['mean_abs_err']:8.2f} {psnr:>7s}")
    write_results("storage", {"n": n, "raw_bytes_per_patch": raw / n, "rows": rows, "loadavg": os.getloadavg()})
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
