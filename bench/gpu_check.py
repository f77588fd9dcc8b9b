"""The one-shot GPU check: everything worth measuring the first time wsipipe meets a GPU.

    bash bench/gpu_check.sh                 # = make gpu-check: install, then this (one GPU, ~8 min)
    bash bench/gpu_check.sh --cpu-smoke     # the same steps on the CPU in under a minute, tiny inputs

Sections, in order, each recorded in bench/results/gpu-check.json (``--out`` elsewhere):
  install      what the install step did (bench/gpu_check.sh times ``make install``) and what it gave:
               torch, torchvision, CUDA, the GPU
  cuda_tests   ``pytest -q -m cuda`` (every test that needs a GPU)
  decode       batched tile decoding on the device (wsipipe.models.gpudecode) against the CPU
               reader: max / mean difference per slide, tiles/s both ways
  inference    bench/bench_inference.py on the device: model alone vs store -> model, fp16 and bf16,
               channels_last vs NCHW, batch sizes 256-1024; torch.compile (bf16, batch 512) in a run of
               its own after the end-to-end runs, since compiling is what may not fit the budget
  embedding    embed_store against infer_store on the inference section's store: the same ResNet18 body,
               batch and precision; patches/s both ways
  end_to_end   slides/hour of ``wsipipe run`` on generated 100k² mosaics at 0.25 µm/px processed at
               0.5 µm/px: two-stage (patches stored, then classified) and fused (read during inference,
               tile.decode cpu and device), with the peak GPU memory (nvidia-smi, sampled every 0.25 s)

What a machine cannot do is skipped with a note in the JSON (no CUDA; a config option this checkout
does not have). A time budget (``--budget-s``, counted from the start of the install) skips what
would not fit, with a note, so the check ends in time and always writes its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe.config import load_config  # noqa: E402
from wsipipe.errors import ConfigError  # noqa: E402

# Where a real H&E slide to cut mosaic tiles from may be: beside the checkout (as the tests
# expect it) or inside it. Without one the mosaics are cut from generated H&E-like texture.
SOURCES = [ROOT.parent / "shared/data/slides/cmu-1-small-region.svs", ROOT / "shared/data/slides/cmu-1-small-region.svs"]


@dataclass(frozen=True)
class Plan:
    """How big each step is: the full check on a GPU, or the smoke run on the CPU."""

    device: str
    slide_size: int  # level-0 px edge of each generated slide
    slides: int
    batch: int  # inference.batch_size of the end-to-end runs
    bench_args: list[str]  # bench/bench_inference.py: the main sweep
    compile_args: list[str] | None  # a second run for torch.compile alone (None: not timed)
    cuda_tests: bool
    decode_tiles: int  # tiles decoded per slide in the decode section
    pool_tiles: int  # distinct real tissue tiles per generated slide (wsipipe.slides.mosaic)


def plan_for(args: argparse.Namespace) -> Plan:
    if args.cpu_smoke:
        return Plan(
            device="cpu", slide_size=args.slide_size or 4096, slides=args.slides or 2, batch=8, cuda_tests=False,
            bench_args=["--n", "16", "--size", "64", "--chunk", "8", "--batch", "8", "--precision", "fp32", "--repeats", "1"],
            compile_args=None,
            decode_tiles=16, pool_tiles=16,
        )
    return Plan(
        device="cuda", slide_size=args.slide_size or 100_000, slides=args.slides or 2, batch=512, cuda_tests=True,
        bench_args=["--n", "4096", "--batch", "256,512,1024", "--precision", "fp16,bf16", "--repeats", "2"],
        # Compiling takes a minute or more per precision and shape: a run of its own, after the
        # end-to-end runs, so that running out of time there costs the compiled rows only.
        compile_args=["--n", "4096", "--batch", "512", "--precision", "bf16", "--repeats", "2", "--compile"],
        decode_tiles=1024, pool_tiles=256,
    )


class Clock:
    """Seconds left of the budget, counted from the install's start (the shell script passes it)."""

    def __init__(self, budget_s: float, t0: float):
        self.budget_s, self.t0 = budget_s, t0

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


class GpuMemory:
    """Peak device memory in use (MiB, all processes) sampled with nvidia-smi in a background thread."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.available = shutil.which("nvidia-smi") is not None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> float | None:
        if not self.available:
            return None
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return float(out.split()[0])  # the first GPU: the check runs on one
        except (subprocess.SubprocessError, ValueError, IndexError):
            return None

    def __enter__(self) -> GpuMemory:
        self.baseline = self.read()
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = self.read()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def child_env() -> dict[str, str]:
    """Children import this checkout's wsipipe, whatever is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_child(cmd: list[str], timeout_s: float) -> tuple[int | None, str, float]:
    """(return code or None on timeout, the output's tail, seconds)."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=max(1.0, timeout_s))
        return res.returncode, (res.stdout + res.stderr)[-4000:], time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return None, text[-4000:], time.perf_counter() - t0


# ---- sections -------------------------------------------------------------------------------------------


def section_install(args: argparse.Namespace) -> dict:
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "status": "skipped" if args.cpu_smoke else ("ok" if args.install_rc == 0 else "failed"),
        "note": "smoke run: nothing installed, the current interpreter is used" if args.cpu_smoke else None,
        "seconds": args.install_seconds,
        "returncode": args.install_rc,
        "python": sys.executable,
        "python_version": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "cpus": os.cpu_count(),
    }


def section_cuda_tests(plan: Plan, clock: Clock) -> dict:
    if not plan.cuda_tests:
        return {"status": "skipped", "note": "smoke run: the CUDA tests need a GPU"}
    rc, tail, seconds = run_child([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                                  min(240.0, clock.left()))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    status = "timed out" if rc is None else ("passed" if rc == 0 and counts.get("passed", 0) > 0 else "failed")
    return {"status": status, "seconds": seconds, "returncode": rc, "counts": counts, "output_tail": tail[-2000:]}


def section_decode(plan: Plan, slides: list[Path]) -> dict:
    """Device decode of each slide's level-0 tiles against the CPU reader: difference and speed."""
    import torch

    from wsipipe.models.gpudecode import decode_tiles, device_decode_agrees, device_decode_problem
    from wsipipe.slides.slide import open_slide

    device = torch.device(plan.device)
    rows: list[dict] = []
    for path in slides:
        with open_slide(path) as slide:
            level = slide.fast_reader(0)
            if level is None or device_decode_problem(level) is not None:
                rows.append({"slide": path.name, "status": "skipped", "note": "no JPEG tile reader for this slide"})
                continue
            stored = [int(i) for i in np.flatnonzero(level.counts > 0)[: plan.decode_tiles]]
            agrees = device_decode_agrees(level, device)
            decode_tiles(level, stored[:8], device)  # warm-up: the decoder's first call sets itself up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            got = decode_tiles(level, stored, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_device = time.perf_counter() - t0
            level.drop_cache()
            t0 = time.perf_counter()
            want = np.stack([level.tile(i) for i in stored])  # one thread: the per-core CPU rate
            t_cpu = time.perf_counter() - t0
            d = np.abs(got.permute(0, 2, 3, 1).cpu().numpy().astype(np.int16) - want.astype(np.int16))
            rows.append({"slide": path.name, "status": "ok", "tiles": len(stored), "tile_px": [level.tile_w, level.tile_h],
                         "colour_agrees": agrees, "max_abs_diff": int(d.max()), "mean_abs_diff": float(d.mean()),
                         "device_tiles_per_s": len(stored) / t_device, "cpu_one_thread_tiles_per_s": len(stored) / t_cpu})
    return {"status": "ok" if any(r["status"] == "ok" for r in rows) else "skipped", "device": str(device), "rows": rows}


def section_inference(plan: Plan, clock: Clock, work: Path) -> dict:
    main = bench_run(plan, plan.bench_args, work / "inference.json", min(240.0, clock.left() - 150.0))
    if plan.device == "cpu":
        main["note"] = "smoke run: CPU, fp32 only, no torch.compile"
    return main


def section_embedding(plan: Plan, clock: Clock, work: Path, repeats: int = 2) -> dict:
    """Embedding against inference on the inference section's store: the same ResNet18 body, batch
    and precision, ``embed_store`` (features (N, 512) float16 out) against ``infer_store`` (one
    probability out), interleaved repeat by repeat, each after an untimed warm-up run."""
    import torch

    from wsipipe.config import InferenceConfig
    from wsipipe.models.embed import embed_store
    from wsipipe.models.inference import infer_store
    from wsipipe.models.model import ModelInfo, build_model

    path = work / "inference" / "bench.zarr"  # bench_inference.py --workdir work/inference writes it
    if not (path / "patches").exists():
        return {"status": "skipped", "note": "the inference section left no store to embed"}
    if clock.left() < 60:
        return {"status": "skipped", "note": f"time budget: {clock.left():.0f} s left"}
    torch.manual_seed(0)
    classifier = build_model("resnet18", 1)
    encoder = build_model("resnet18", 1)
    encoder.load_state_dict(classifier.state_dict())
    encoder.fc = torch.nn.Identity()
    cfg = InferenceConfig(batch_size=plan.batch, device=plan.device, precision="auto")

    def embed(tag: str) -> dict:
        return embed_store(path, encoder, {"kind": "bench", "arch": "resnet18", "sha256": tag, "dim": 512}, cfg)

    def infer(tag: str) -> dict:
        return infer_store(path, classifier, ModelInfo("resnet18", 1, tag, None), cfg)  # a new identity: recompute all

    runs: dict[str, list[float]] = {"embed": [], "infer": []}
    n = 0
    for name, fn in (("embed", embed), ("infer", infer)):
        fn(f"warm-{name}")
    for rep in range(repeats):
        for name, fn in (("embed", embed), ("infer", infer))[:: 1 if rep % 2 == 0 else -1]:  # alternate who goes first
            t0 = time.perf_counter()
            stats = fn(f"{name}-{rep}")
            runs[name].append(stats["computed"] / (time.perf_counter() - t0))
            n = stats["computed"]
    embed_rate, infer_rate = float(np.median(runs["embed"])), float(np.median(runs["infer"]))
    return {"status": "ok", "store": str(path), "patches": n, "batch": plan.batch, "precision": "auto",
            "device": plan.device, "embed_patches_per_s": runs["embed"], "infer_patches_per_s": runs["infer"],
            "embed_median": embed_rate, "infer_median": infer_rate, "embed_vs_infer": embed_rate / infer_rate}


def section_compile(plan: Plan, clock: Clock, work: Path, inference: dict) -> dict:
    """The torch.compile rows, added to the inference section (run last: compiling is the slow part)."""
    if plan.compile_args is None:
        return {"status": "skipped", "note": "smoke run: torch.compile takes minutes"}
    compiled = bench_run(plan, plan.compile_args, work / "inference-compiled.json", min(240.0, clock.left()))
    rows = [r for r in compiled.pop("rows", []) if r["method"] == "model alone, torch.compile"]
    for r in rows:  # its ratio is to the model alone of its own run, as in the main rows
        r["run"] = "compile"
    inference.setdefault("rows", []).extend(rows)
    return compiled


def bench_run(plan: Plan, bench_args: list[str], out: Path, timeout_s: float) -> dict:
    """One run of bench/bench_inference.py on the plan's device; its rows, or why there are none."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_inference.py"), "--device", plan.device, "--out", str(out),
           "--workdir", str(out.with_suffix("")), *bench_args]
    if timeout_s < 30:
        return {"status": "skipped", "note": f"time budget: {timeout_s:.0f} s left for it", "command": cmd}
    out.unlink(missing_ok=True)
    rc, tail, seconds = run_child(cmd, timeout_s)
    status = "ok" if rc == 0 else ("timed out" if rc is None else "failed")
    if not out.exists():
        return {"status": status if status != "ok" else "failed", "seconds": seconds, "command": cmd, "output_tail": tail}
    result = json.loads(out.read_text())  # a run killed at its timeout after writing its results keeps them
    return {"status": status, "seconds": seconds, "command": cmd, "machine": result["machine"], "rows": result["rows"]}


def generate_slide(path: str, size: int, seed: int, pool_tiles: int) -> dict:
    """A mosaic of real H&E tiles at 0.25 µm/px (a child process: several are written at once)."""
    from wsipipe.slides.mosaic import write_mosaic_slide

    t0 = time.perf_counter()
    source: Path | np.ndarray
    source = next((s for s in SOURCES if s.exists()), None) or texture_source()
    mosaic = write_mosaic_slide(path, size, size, source, mpp=0.25, seed=seed, pool_size=pool_tiles)
    return {"path": path, "size": size, "mpp": 0.25, "seconds": time.perf_counter() - t0,
            "tissue_fraction": mosaic.tissue.area / (size * size), "bytes": Path(path).stat().st_size,
            "source": "real H&E" if isinstance(source, Path) else "generated texture"}


def texture_source() -> np.ndarray:
    from wsipipe.slides.synth import make_textures

    textures = make_textures(0, 1024)
    return np.ascontiguousarray(np.concatenate([textures[1], textures[2]], axis=1))  # normal | tumor


def config_problem(overrides: dict) -> str | None:
    """Why this checkout's config rejects ``overrides``, or None when it takes them."""
    try:
        load_config(None, overrides)
    except ConfigError as exc:
        return str(exc)
    return None


def decode_wired() -> bool:
    """Whether anything in this checkout reads patches through the device decoder."""
    return any("read_patches_on_device" in p.read_text() for p in (ROOT / "wsipipe").rglob("*.py") if p.name != "gpudecode.py")


VARIANTS = [  # (name, store_patches, decode)
    ("two-stage", True, "cpu"),
    ("fused, tile.decode cpu", False, "cpu"),
    ("fused, tile.decode device", False, "device"),
]


def section_end_to_end(plan: Plan, clock: Clock, work: Path, slides: list[dict]) -> dict:
    import torch

    from wsipipe.models.model import build_model, save_weights

    torch.manual_seed(0)
    weights = work / "resnet18.safetensors"
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)  # random weights: speed does not depend on them
    has_store_option = config_problem({"tile.store_patches": True}) is None
    rows: list[dict] = []
    last = 0.0
    for name, store_patches, decode in VARIANTS:
        row: dict = {"variant": name, "store_patches": store_patches, "decode": decode}
        rows.append(row)
        overrides = {"tile.mpp": 0.5, "tile.resample": "area", "tile.decode": decode, "inference.device": plan.device,
                     "inference.batch_size": plan.batch, "inference.precision": "auto"}
        if has_store_option:
            overrides["tile.store_patches"] = store_patches
        elif not store_patches:
            row.update(status="skipped", note="this checkout has no tile.store_patches option (the fused path): "
                       f"{config_problem({'tile.store_patches': False})}")
            continue
        if decode == "device" and not decode_wired():
            row.update(status="skipped", note="tile.decode: device is not wired into a reader in this checkout")
            continue
        problem = config_problem(overrides)
        if problem:
            row.update(status="skipped", note=f"config rejected: {problem}")
            continue
        if clock.left() < max(last, 10.0):
            row.update(status="skipped", note=f"time budget: {clock.left():.0f} s left, the last run took {last:.0f} s")
            continue
        config = work / f"e2e-{len(rows)}.yaml"
        config.write_text(yaml.safe_dump(nested(overrides)))
        out = work / f"e2e-{len(rows)}"
        cmd = [sys.executable, "-m", "wsipipe.cli", "run", *(s["path"] for s in slides), "--out", str(out),
               "--model", str(weights), "--config", str(config)]
        with GpuMemory() as gpu:
            rc, tail, seconds = run_child(cmd, clock.left())
        last = seconds
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))]
        row.update(
            status="ok" if rc == 0 and len(summaries) == len(slides) else ("timed out" if rc is None else "failed"),
            seconds=seconds, slides=len(summaries), patches=sum(int(s.get("n_patches") or 0) for s in summaries),
            slides_per_hour=3600.0 * len(summaries) / seconds if summaries else 0.0,
            gpu_memory_baseline_mib=gpu.baseline, peak_gpu_memory_mib=gpu.peak,
            config=overrides,
        )
        if row["status"] != "ok":
            row["output_tail"] = tail
        shutil.rmtree(out, ignore_errors=True)  # a 100k² store is gigabytes: free the disk for the next run
    if not has_store_option:
        rows[0]["note"] = "two-stage is what this checkout always runs (no tile.store_patches option)"
    statuses = {r["status"] for r in rows}
    return {"status": "ok" if statuses == {"ok"} else ("partial" if "ok" in statuses else "failed"),
            "slides": slides, "rows": rows,
            "note": "processed at 0.5 µm/px with tile.resample: area (an exact 2x area average in every variant); "
                    "seconds are the whole `wsipipe run` process over all slides, its start-up included"}


def nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        cursor = out
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
    return out


# ---- driver ---------------------------------------------------------------------------------------------


def timed(section, *args) -> dict:
    """A section's result with the wall-clock seconds it took (``section_seconds``)."""
    t0 = time.perf_counter()
    result = section(*args)
    result["section_seconds"] = time.perf_counter() - t0
    return result


def print_table(results: dict) -> None:
    print(f"\nwsipipe GPU check ({results['mode']}), {results['seconds']:.0f} s, "
          f"{results['install'].get('gpu') or 'no GPU'}, {results['install']['cpus']} CPUs")
    for name in ("install", "cuda_tests", "decode", "inference", "embedding", "end_to_end"):
        sec = results[name]
        print(f"  {name:11s} {sec['status']:10s} {sec.get('note') or ''}")
    compiled = results["inference"].get("compile")
    if compiled:
        print(f"  {'compile':11s} {compiled['status']:10s} {compiled.get('note') or ''}")
    for r in results["decode"].get("rows", []):
        if r["status"] == "ok":
            print(f"    decode {r['slide']}: {r['tiles']} tiles, max diff {r['max_abs_diff']}, mean {r['mean_abs_diff']:.3f}, "
                  f"{r['device_tiles_per_s']:.0f} tiles/s on {results['decode']['device']} vs "
                  f"{r['cpu_one_thread_tiles_per_s']:.0f} on one CPU thread")
    for r in results["inference"].get("rows", []):
        print(f"    {r['precision']:5s} batch {r['batch']:5d} {r['method']:45s} {r['median']:9.0f} img/s "
              f"{r['ratio_vs_model']:6.0%} of the model alone")
    emb = results["embedding"]
    if emb["status"] == "ok":
        print(f"    embedding {emb['embed_median']:.0f} patches/s vs inference {emb['infer_median']:.0f} patches/s "
              f"({emb['embed_vs_infer']:.0%}), same store, ResNet18, batch {emb['batch']}, precision auto")
    for r in results["end_to_end"].get("rows", []):
        if r["status"] == "ok":
            mem = f", peak GPU memory {r['peak_gpu_memory_mib']:.0f} MiB" if r.get("peak_gpu_memory_mib") is not None else ""
            print(f"    {r['variant']:27s} {r['slides']} slides, {r['patches']} patches, {r['seconds']:.0f} s, "
                  f"{r['slides_per_hour']:.1f} slides/h{mem}")
        else:
            print(f"    {r['variant']:27s} {r['status']}: {r.get('note') or ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU with tiny inputs, in seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu-check.json")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check, install included, in seconds")
    ap.add_argument("--slide-size", type=int, default=None, help="edge of the generated slides (default 100000; smoke 4096)")
    ap.add_argument("--slides", type=int, default=None, help="how many generated slides (default 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the slides and outputs here (default: a temporary folder)")
    ap.add_argument("--install-seconds", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--install-rc", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = plan_for(args)
    clock = Clock(args.budget_s, args.t0 or time.time())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsipipe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "plan": asdict(plan),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock.t0))}
    # The slides are written in child processes (forked before this process touches CUDA) while
    # the tests and the inference benchmark run.
    pool = ProcessPoolExecutor(max_workers=plan.slides)
    futures = [pool.submit(generate_slide, str(work / f"mosaic-{i}.svs"), plan.slide_size, i, plan.pool_tiles)
               for i in range(plan.slides)]
    try:
        results["install"] = timed(section_install, args)
        if plan.device == "cuda" and not results["install"]["cuda_available"]:
            raise SystemExit("gpu_check: torch sees no CUDA device (use --cpu-smoke on a machine without one)")
        results["cuda_tests"] = timed(section_cuda_tests, plan, clock)
        results["inference"] = timed(section_inference, plan, clock, work)
        t0 = time.perf_counter()
        slides = [f.result() for f in futures]
        results["slides_wait_seconds"] = time.perf_counter() - t0  # generation left over after the steps above
        decode_slides = [Path(slides[0]["path"]), *(s for s in SOURCES[:2] if s.exists())][:2]
        results["embedding"] = timed(section_embedding, plan, clock, work)
        results["decode"] = timed(section_decode, plan, decode_slides)
        results["end_to_end"] = timed(section_end_to_end, plan, clock, work, slides)
        results["inference"]["compile"] = timed(section_compile, plan, clock, work, results["inference"])
    finally:
        pool.shutdown(cancel_futures=True)
        results["seconds"] = clock.elapsed()
        for name in ("install", "cuda_tests", "decode", "inference", "embedding", "end_to_end"):
            results.setdefault(name, {"status": "not run", "note": "an earlier step failed"})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
