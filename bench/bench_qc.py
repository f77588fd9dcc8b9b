"""What slide QC adds to tiling, measured side by side in one run on the same slide.

    python bench/bench_qc.py [--size 12000] [--repeats 3]

Tiles one generated slide repeatedly into fresh stores, alternating runs with QC (as
shipped) and without (``qc.write_chunk`` replaced by a no-op), one Dask worker thread so
the comparison is not blurred by scheduling; also times ``qc.patch_qc`` alone on all the
patches. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe.tiles import qc, store  # noqa: E402
from wsipipe.config import load_config  # noqa: E402
from wsipipe.slides.synth import write_synthetic_slide  # noqa: E402
from wsipipe.tiles.tiling import tile_slide  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=12000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None, {"dask.num_workers": 1})
    shipped = qc.write_chunk
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide = write_synthetic_slide(tmp / "s.svs", args.size, args.size, mpp=0.5, seed=0).path
        times: dict[str, list[float]] = {"with QC": [], "without QC": []}
        for r in range(args.repeats):
            for label in ("without QC", "with QC") if r % 2 else ("with QC", "without QC"):
                qc.write_chunk = shipped if label == "with QC" else (lambda group, sl, patches: None)
                out = tmp / f"{label.replace(' ', '-')}-{r}.zarr"
                t0 = time.perf_counter()
                tile_slide(slide, out, cfg)
                times[label].append(time.perf_counter() - t0)
        qc.write_chunk = shipped
        group = store.open_store(out)
        patches = group["patches"][:]
        t0 = time.perf_counter()
        qc.patch_qc(patches)
        qc_alone = time.perf_counter() - t0
    n = len(patches)
    with_qc, without = statistics.median(times["with QC"]), statistics.median(times["without QC"])
    print(f"slide {args.size}x{args.size}, {n} patches, 1 worker, median of {args.repeats}")
    print(f"  tile without QC: {without:.2f} s ({n / without:.0f} patches/s)")
    print(f"  tile with QC:    {with_qc:.2f} s ({n / with_qc:.0f} patches/s)")
    print(f"  ratio with/without: {with_qc / without:.3f}")
    print(f"  patch_qc alone:  {qc_alone:.2f} s ({n / qc_alone:.0f} patches/s)")


if __name__ == "__main__":
    main()
