"""TIAToolbox's patch extraction over one slide, for bench/bench_peers.py (run in bench/.venv-peers).

    python tiatoolbox_extract.py SLIDE --mpp 0.5 --patch 224 --min-mask-ratio 0.5

``SlidingWindowPatchExtractor`` with its own tissue mask (``input_mask="otsu"``: the default
method of ``WSIReader.tissue_mask``, computed at 1.25x objective power), patches of ``--patch``
px at ``--mpp`` µm/px, a stride of one patch, patches whose mask covers at least
``--min-mask-ratio`` kept; every patch read and dropped (no writes). Prints one JSON line:
patch count, CPU-seconds and wall seconds of the mask plus the extraction (imports excluded).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide")
    ap.add_argument("--mpp", type=float, required=True)
    ap.add_argument("--patch", type=int, default=224)
    ap.add_argument("--min-mask-ratio", type=float, default=0.5)
    args = ap.parse_args()

    from tiatoolbox.tools.patchextraction import SlidingWindowPatchExtractor

    c0, t0 = time.process_time(), time.perf_counter()
    patches = SlidingWindowPatchExtractor(
        args.slide, patch_size=(args.patch, args.patch), input_mask="otsu", resolution=args.mpp, units="mpp",
        min_mask_ratio=args.min_mask_ratio,
    )
    mask_cpu, mask_wall = time.process_time() - c0, time.perf_counter() - t0
    n = 0
    for patch in patches:
        assert patch.shape == (args.patch, args.patch, 3), patch.shape
        n += 1
    print(json.dumps({"patches": n, "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
                      "mask_cpu_s": mask_cpu, "mask_wall_s": mask_wall}))


if __name__ == "__main__":
    main()
