"""What preparing a batch costs per patch when a model card asks for more than ImageNet normalisation.

    python bench/bench_card_input.py            # 32 real H&E patches of 224 px, one torch thread, ~10 s
    python bench/bench_card_input.py --size 256 --repeats 5

Times the background thread's work (:func:`wsipipe.models.inference.host_batch`: the card's stain
normaliser, then normalisation) and the model thread's resize on CPU
(:func:`~wsipipe.models.inference.device_batch`), on patches cut from the CMU slide. Medians over
``--repeats``; prints ms per patch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe.models.inference import DEFAULT_INPUT, InputSpec, device_batch, host_batch  # noqa: E402
from wsipipe.models.stain import fit_stain_normaliser  # noqa: E402

SLIDE = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


def patches(size: int, n: int) -> np.ndarray:
    import openslide

    cols = 8
    rows = -(-n // cols)
    with openslide.OpenSlide(str(SLIDE)) as s:
        region = np.asarray(s.read_region((400, 600), 0, (size * cols, size * rows)).convert("RGB"))
    return np.stack([region[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)][:n])


def per_patch_ms(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # skimage's LAB clipping notes, one per Reinhard patch
    p = patches(args.size, args.n)
    cpu = torch.device("cpu")
    rows = [("normalise only (no card)", lambda: host_batch(p, cpu, DEFAULT_INPUT))]
    for method in ("macenko", "reinhard"):
        spec = InputSpec(stain=fit_stain_normaliser(method, p[:8]))
        rows.append((f"{method} stain + normalise", lambda spec=spec: host_batch(p, cpu, spec)))
    host = host_batch(p, cpu)
    edge = args.size + 32
    rows.append((f"resize {args.size} -> {edge} on CPU", lambda: device_batch(host, cpu, InputSpec(resize=edge))))
    print(f"{args.n} patches of {args.size} px, one torch thread, median of {args.repeats}")
    for name, fn in rows:
        print(f"{name:>32}: {per_patch_ms(fn, len(p), args.repeats):7.2f} ms/patch")


if __name__ == "__main__":
    main()
