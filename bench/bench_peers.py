"""Tiling per CPU-second against peers, side by side in one run: wsipipe, TIAToolbox, the naive loop, the decode bound.

    make bench-peers                                   # peers virtualenv, then 49152² slides (long)
    python bench/bench_peers.py --size 16384           # smaller slides, minutes
    python bench/bench_peers.py --peers-python NONE    # without TIAToolbox

Slides: two mosaics of real H&E JPEG tiles (wsipipe.slides.mosaic) at 0.25 µm/px with 256-px
tiles, a sparse one (about 12 % tissue) and a dense one (60 % or more), generated once into
``--work`` and reused. For each slide and each patch resolution (0.25 µm/px native, and
0.5 µm/px = 2x down from level 0), 224-px patches, every variant is a child process, so its
CPU time (user + sys of the child and its threads, from ``os.wait4``) is its own:

  * wsipipe tile: the ``wsipipe tile SLIDE --out STORE --mpp M`` command, whole process (start-up,
    tissue detection, reads, QC, compressed Zarr writes), a fresh store each time;
  * TIAToolbox 2.1: ``SlidingWindowPatchExtractor`` with its own tissue mask (``input_mask="otsu"``,
    the default mask method of its ``WSIReader.tissue_mask``; ``min_mask_ratio`` = wsipipe's
    ``tile.min_tissue``), every patch iterated, no writes (``bench/peers/tiatoolbox_extract.py``,
    run in the peers virtualenv ``bench/.venv-peers``; skipped when that is absent);
  * naive loop: one ``openslide.OpenSlide.read_region`` per patch at level 0, ``.convert("RGB")``,
    and at 2x a Lanczos resize of the 448-px read to 224 (the CLAM / WSInfer way), over the
    patch coordinates wsipipe kept, no writes;
  * decode bound: every level-0 JPEG tile a kept patch touches, read (``os.pread``) and decoded
    once by libjpeg-turbo into one reused buffer, nothing else.

WSInfer is not measured: WSInfer 0.6 needs zarr < 3, which cannot share an environment with
wsipipe's stack, and its patch extraction is the naive per-patch read_region loop above.

For the peers and references the CPU-seconds counted are those of the measured loop (after
imports; TIAToolbox's include its mask); the whole child process is in the JSON too. wsipipe
is counted whole, start-up included, which is the conservative side. Variants run in a
rotating order for ``--repeats`` rounds; ratios are taken within a round (median over rounds).
Prints one table and writes bench/results/peers-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchutil import SOURCE, decode_bound, naive_loop, needed_tiles, write_results  # noqa: E402
from wsipipe.tiles import store  # noqa: E402
from wsipipe.tiles.tiling import GridSpec  # noqa: E402

PEERS_VENV = ROOT / "bench" / ".venv-peers"
TIA_SCRIPT = ROOT / "bench" / "peers" / "tiatoolbox_extract.py"
PATCH = 224
MPPS = (0.25, 0.5)

# Layout parameters of the two slides (wsipipe.slides.mosaic.write_mosaic_slide): two pieces
# shrunk a little cover about 12 %; three pieces grown by 1.7 touch and cover about 70 %.
SLIDES = {
    "sparse": {"seed": 1, "n_tissue": 2, "tissue_scale": 0.93},
    "dense": {"seed": 1, "n_tissue": 3, "tissue_scale": 1.7},
}


def bench_slide(work: Path, kind: str, size: int) -> Path:
    """The ``kind`` mosaic at ``size``², 0.25 µm/px, generated once into ``work``."""
    from wsipipe.slides.mosaic import write_mosaic_slide

    path = work / f"peers-{kind}-{size}.svs"
    if not path.exists():
        t0 = time.perf_counter()
        write_mosaic_slide(path, size, size, SOURCE, mpp=0.25, **SLIDES[kind])
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def timed_child(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run ``cmd``: (CPU-seconds of the child, its threads and the children it waited for;
    wall seconds; its stdout). The CPU time is the growth of RUSAGE_CHILDREN across the
    reaping of this one child (nothing else runs beside it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, proc.stdout


def wsipipe_tile(slide: Path, out: Path, mpp: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a complete store would be skipped, not re-tiled
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cpu, wall, _ = timed_child([sys.executable, "-m", "wsipipe.cli", "tile", str(slide), "--out", str(out),
                                "--mpp", str(mpp), "--patch-size", str(PATCH)], env)
    n = store.array(store.open_store(out), store.COORDS).shape[0]
    return {"patches": n, "cpu_s": cpu, "wall_s": wall, "process_cpu_s": cpu, "process_wall_s": wall}


def reference(kind: str, slide: Path, ref_store: Path, naive_max: int) -> dict:
    """The naive loop or the decode bound, in a child process (this script's ``--measure``)."""
    cpu, wall, out = timed_child([sys.executable, __file__, "--measure", kind, "--slide", str(slide),
                                  "--store", str(ref_store), "--naive-max", str(naive_max)])
    return {**json.loads(out.strip().splitlines()[-1]), "process_cpu_s": cpu, "process_wall_s": wall}


def tiatoolbox(python: Path, slide: Path, mpp: float, min_ratio: float) -> dict:
    cpu, wall, out = timed_child([str(python), str(TIA_SCRIPT), str(slide), "--mpp", str(mpp), "--patch", str(PATCH),
                                  "--min-mask-ratio", str(min_ratio)])
    return {**json.loads(out.strip().splitlines()[-1]), "process_cpu_s": cpu, "process_wall_s": wall}


def _spec(group) -> GridSpec:
    return GridSpec(**{k: v for k, v in store.meta(group)["tile"].items() if k in GridSpec.__annotations__})


def measure(kind: str, slide: Path, ref_store: Path, naive_max: int) -> dict:
    """Child side of :func:`reference`: one measured loop over the patches of ``ref_store``."""
    from wsipipe.slides.slide import open_slide

    group = store.open_store(ref_store)
    coords, spec = np.asarray(store.array(group, store.COORDS)[:]), _spec(group)
    if kind == "naive":
        if naive_max:
            coords = coords[:: max(1, len(coords) // naive_max)][:naive_max]
        c0, t0 = time.process_time(), time.perf_counter()
        naive_loop(slide, coords, spec)
        return {"patches": len(coords), "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}
    with open_slide(slide) as s:
        tiles = needed_tiles(spec, coords, s.fast_reader(spec.level).tile_w)
    c0, t0 = time.process_time(), time.perf_counter()
    decode_bound(slide, spec, tiles)
    return {"patches": len(coords), "tiles": len(tiles), "cpu_s": time.process_time() - c0,
            "wall_s": time.perf_counter() - t0}


def bench_case(slide: Path, work: Path, mpp: float, repeats: int, naive_max: int, peers_python: Path | None) -> dict:
    """Every variant on one slide at one resolution, ``repeats`` rounds in rotating order."""
    from wsipipe.config import load_config

    ref = work / f"{slide.stem}-{mpp}-ref.zarr"
    first = wsipipe_tile(slide, ref, mpp)  # warm-up (page cache) and the patch list of the references
    min_ratio = load_config(None).tile.min_tissue
    variants = {
        "wsipipe tile": lambda: wsipipe_tile(slide, work / f"{slide.stem}-{mpp}.zarr", mpp),
        "naive read_region loop": lambda: reference("naive", slide, ref, naive_max),
        "decode bound": lambda: reference("decode", slide, ref, 0),
    }
    if peers_python is not None:
        variants["TIAToolbox SlidingWindowPatchExtractor"] = lambda: tiatoolbox(peers_python, slide, mpp, min_ratio)
    names, rounds = list(variants), []
    for r in range(repeats):
        got = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            got[name] = res = variants[name]()
            res["per_cpu_s"] = res["patches"] / res["cpu_s"]
            res["per_wall_s"] = res["patches"] / res["wall_s"]
            print(f"  {slide.stem} {mpp} µm/px {name}: {res['patches']} patches, {res['cpu_s']:.1f} CPU-s, "
                  f"{res['wall_s']:.1f} s", flush=True)
        rounds.append(got)

    def ratio(a: str, b: str) -> float | None:
        if b not in variants:
            return None
        return statistics.median(rd[a]["per_cpu_s"] / rd[b]["per_cpu_s"] for rd in rounds)

    return {
        "slide": slide.name, "mpp": mpp, "patches": first["patches"],
        "tissue_fraction_kept": first["patches"] * (PATCH * mpp / 0.25) ** 2 / (_slide_area(slide)),
        "variants": {name: {k: statistics.median(rd[name][k] for rd in rounds) for k in rounds[0][name]}
                     for name in names},
        "rounds": rounds,
        "ratios_per_cpu_s": {
            "wsipipe / decode bound": ratio("wsipipe tile", "decode bound"),
            "wsipipe / TIAToolbox": ratio("wsipipe tile", "TIAToolbox SlidingWindowPatchExtractor"),
            "wsipipe / naive loop": ratio("wsipipe tile", "naive read_region loop"),
        },
    }


def _slide_area(slide: Path) -> float:
    import openslide

    with openslide.OpenSlide(str(slide)) as s:
        w, h = s.dimensions
    return float(w * h)


def peers_interpreter(arg: str | None) -> Path | None:
    if arg == "NONE":
        return None
    python = Path(arg) if arg else PEERS_VENV / "bin" / "python"
    if not python.exists():
        print(f"{python} not found: TIAToolbox is left out (make bench-peers creates it)", flush=True)
        return None
    return python


def print_table(cases: list[dict]) -> None:
    print(f"\n{'slide':22s} {'µm/px':>5s} {'method':40s} {'patches':>8s} {'/CPU-s':>8s} {'/wall-s':>8s}")
    for case in cases:
        for name, v in case["variants"].items():
            print(f"{case['slide']:22s} {case['mpp']:5.2f} {name:40s} {int(v['patches']):8d} "
                  f"{v['per_cpu_s']:8.1f} {v['per_wall_s']:8.1f}")
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in case["ratios_per_cpu_s"].items() if v is not None)
        print(f"{'':28s} per CPU-second: {ratios}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=49152, help="edge of the generated slides, level-0 px")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work", help="generated slides and stores")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--slides", default="sparse,dense", help="comma list of: sparse, dense")
    ap.add_argument("--mpp", default=",".join(map(str, MPPS)), help="comma list of patch resolutions, µm/px")
    ap.add_argument("--naive-max", type=int, default=0, help="patches timed in the naive loop (0: all)")
    ap.add_argument("--peers-python", default=None,
                    help="interpreter with tiatoolbox (default bench/.venv-peers/bin/python; NONE to leave it out)")
    ap.add_argument("--results", type=Path, default=None, help="results file (default bench/results/peers-<size>.json)")
    ap.add_argument("--measure", choices=("naive", "decode"), help=argparse.SUPPRESS)
    ap.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:  # the child side of one reference measurement
        print(json.dumps(measure(args.measure, args.slide, args.store, args.naive_max)))
        return {}
    args.work.mkdir(parents=True, exist_ok=True)
    peers_python = peers_interpreter(args.peers_python)
    load = os.getloadavg()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_at_start": load},
        "size": args.size, "patch_size": PATCH, "tiatoolbox": peers_python is not None, "cases": [],
    }
    for kind in args.slides.split(","):
        slide = bench_slide(args.work, kind, args.size)
        for mpp in (float(m) for m in args.mpp.split(",")):
            results["cases"].append(bench_case(slide, args.work, mpp, args.repeats, args.naive_max, peers_python))
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    print_table(results["cases"])
    print(f"load average at start {load[0]:.1f}, at end {results['machine']['loadavg_at_end'][0]:.1f}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2))
    path = args.results or write_results(f"peers-{args.size}", results)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
