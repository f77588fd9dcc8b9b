"""Inference throughput: Zarr store -> probabilities, against the model alone, side by side.

    python bench/bench_inference.py                     # 256 patches, bf16 and fp32, batch 32/64/128, a few min
    python bench/bench_inference.py --n 1024 --repeats 3   # steadier numbers, ~6 min
    python bench/bench_inference.py --train 1000           # also: time a from-scratch fit
    python bench/bench_inference.py --device cuda --precision fp16,bf16 --batch 256,512,1024 \
        --n 4096 --compile --compile-batches 512            # on a GPU (what bench/gpu_check.sh runs)

Prints a table and writes bench/results/inference.json (``--out`` elsewhere). On the same patches, interleaved
repeat by repeat so that load from other processes hits every row alike:
  * model alone: the forward pass on batches already normalised in memory (the ceiling)
  * wsipipe infer_store: opens the store, reads and decodes Zarr chunks, normalises,
    runs the model, writes probabilities and progress flags, marks the stage complete
  * sequential loop: the same work without the prefetch thread (read, then compute)
  * model alone in NCHW memory format (what channels_last gains), and with ``--compile``
    torch.compile (inductor) of the channels_last model
The patches are 224-px crops of wsipipe.slides.synth's H&E-like textures, written the way
`wsipipe tile` writes them (zstd level 1, 64 patches per chunk).

``--train N`` also times wsipipe.learn.train.fit_classifier (ResNet18 from scratch, 3 epochs,
default crops) on N such patches, half normal and half tumor, and scores it on 256
whole patches cut from textures of another seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsipipe.tiles import store  # noqa: E402
from wsipipe.config import InferenceConfig  # noqa: E402
from wsipipe.models.inference import (  # noqa: E402
    _probabilities, infer_store, predict_patches, prepare_model, resolve_precision, to_tensor,
)
from wsipipe.models.model import ModelInfo, build_model  # noqa: E402
from wsipipe.slides.synth import make_textures  # noqa: E402


def texture_patches(n: int, size: int, seed: int, noise: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Alternating normal (0) and tumor (1) crops of the synthetic H&E textures.

    A little pixel noise makes them compress like real H&E (~1.2x at zstd 1) rather than
    ~9x like the clean periodic textures: decoding cost is part of what is measured."""
    textures = make_textures(seed, 1024)[1:]  # normal, tumor
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    patches = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, textures.shape[1] - size, 2)
        crop = textures[labels[i], y : y + size, x : x + size] + rng.normal(0, noise, (size, size, 3))
        patches[i] = np.clip(crop, 0, 255)
    return patches, labels


def make_store(path: Path, n: int, size: int, chunk: int, seed: int = 0, quiet: bool = False) -> np.ndarray:
    patches, _ = texture_patches(n, size, seed)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("patches", data=patches, chunks=(chunk, size, size, 3), compressors=[ZstdCodec(level=1)])
    store.set_stage(group, "tile", {"slide": "bench", "n": n}, True)
    stored = sum(f.stat().st_size for f in (path / "patches").rglob("*") if f.is_file())
    if not quiet:
        print(f"{n} patches, Zarr compression ratio {patches.nbytes / stored:.2f}x")
    return patches


def sync(device: torch.device) -> None:
    """Wait for the device: CUDA runs kernels asynchronously, so a timer must not stop before them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_alone(net, batches: list[torch.Tensor], dtype) -> float:
    device = batches[0].device
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for x in batches:
            probs = _probabilities(net(x))
        probs.cpu()  # the probabilities reach the host, as they do in infer_store
    sync(device)
    return time.perf_counter() - t0


def end_to_end(path: Path, net, cfg: InferenceConfig, tag: str) -> float:
    info = ModelInfo("resnet18", 1, f"bench-{tag}", None)  # a new identity: recompute everything
    t0 = time.perf_counter()
    stats = infer_store(path, net, info, cfg)
    assert stats["computed"] == zarr.open_group(str(path))["patches"].shape[0]
    return time.perf_counter() - t0


def sequential(path: Path, net, batch: int, dtype, device: torch.device) -> float:
    t0 = time.perf_counter()
    group = zarr.open_group(str(path), mode="r+")
    patches = group["patches"]
    out = group.create_array("probabilities_seq", shape=(patches.shape[0],), chunks=(patches.chunks[0],),
                             dtype="float32", overwrite=True)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for b in range(0, patches.shape[0], batch):
            x = to_tensor(patches[b : b + batch], device)
            out[b : b + batch] = _probabilities(net(x)).cpu().numpy()
    return time.perf_counter() - t0


def time_fit(n: int, size: int) -> dict:
    from wsipipe.learn.train import fit_classifier

    patches, labels = texture_patches(n, size, seed=0)
    t0 = time.perf_counter()
    model = fit_classifier(patches, labels, epochs=3, device="cpu")
    seconds = time.perf_counter() - t0
    held_out, truth = texture_patches(256, size, seed=5)
    cpu = torch.device("cpu")
    probs = predict_patches(model, held_out, cpu, resolve_precision("auto", cpu))
    return {"patches": n, "seconds": seconds, "held_out_accuracy": float(((probs > 0.5) == truth).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="patches")
    ap.add_argument("--size", type=int, default=224, help="patch edge, px")
    ap.add_argument("--batch", default="32,64,128", help="comma list of batch sizes (swept)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor; compiles for minutes)")
    ap.add_argument("--compile-batches", default=None,
                    help="comma list: time the compiled model at these batch sizes only (each new shape recompiles)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model, the tensors and infer_store)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/inference.json)")
    ap.add_argument("--chunk", type=int, default=64, help="patches per Zarr chunk")
    ap.add_argument("--prefetch", type=int, default=3, help="batches read ahead")
    ap.add_argument("--precision", default="bf16,fp32", help="comma list of bf16, fp16, fp32, auto")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--train", type=int, default=0, help="also time a from-scratch fit on this many patches")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsipipe-bench-inf-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.zarr"
    patches = make_store(path, args.n, args.size, args.chunk)
    cpu = torch.device(args.device)  # the device everything runs on (named cpu when this only ran on CPUs)
    torch.manual_seed(0)
    net = prepare_model(build_model("resnet18", 1), cpu)
    plain = build_model("resnet18", 1).eval().to(cpu)  # same architecture, default NCHW memory format
    plain.load_state_dict(net.state_dict())
    compiled = torch.compile(net) if args.compile else None
    sizes = [int(b) for b in args.batch.split(",")]
    compile_sizes = set(sizes if args.compile_batches is None else (int(b) for b in args.compile_batches.split(",")))
    precisions = args.precision.split(",")
    if cpu.type == "cuda":
        torch.cuda.reset_peak_memory_stats(cpu)

    def batches_of(b: int, channels_last: bool = True) -> list[torch.Tensor]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return [to_tensor(patches[i : i + b], cpu).contiguous(memory_format=fmt) for i in range(0, args.n, b)]

    def methods(p: str, b: int, rep: int) -> list[tuple[str, Callable[[], float]]]:
        dtype = resolve_precision(p, cpu)
        pcfg = InferenceConfig(batch_size=b, prefetch_batches=args.prefetch, device=args.device, precision=p)
        cl, nchw = batches_of(b), batches_of(b, channels_last=False)
        out = [
            ("model alone (in-memory tensors)", lambda: model_alone(net, cl, dtype)),
            ("wsipipe infer_store (Zarr -> probabilities)", lambda: end_to_end(path, net, pcfg, f"{p}-{b}-{rep}")),
            ("sequential loop, no prefetch", lambda: sequential(path, net, b, dtype, cpu)),
            ("model alone, NCHW (no channels_last)", lambda: model_alone(plain, nchw, dtype)),
        ]
        if compiled is not None and b in compile_sizes:
            out.append(("model alone, torch.compile", lambda: model_alone(compiled, cl, dtype)))
        return out

    runs: dict[tuple[str, int, str], list[float]] = {}
    # Warm-up, untimed: oneDNN builds its kernels on the first call per dtype and shape (and
    # torch.compile compiles), and the first store access starts Zarr's I/O threads.
    warm = work / "warm.zarr"
    make_store(warm, max(sizes), args.size, args.chunk, quiet=True)
    for p in precisions:
        for b in sizes:
            dtype = resolve_precision(p, cpu)
            for model in (net, plain) + ((compiled,) if compiled is not None and b in compile_sizes else ()):
                fmt = torch.contiguous_format if model is plain else torch.channels_last
                model_alone(model, [batches_of(b)[0].contiguous(memory_format=fmt)], dtype)
            end_to_end(warm, net, InferenceConfig(batch_size=b, device=args.device, precision=p), f"warm-{p}-{b}")
    for rep in range(args.repeats):
        for p in precisions:
            for b in sizes:
                ms = methods(p, b, rep)
                for method, fn in ms[rep % len(ms) :] + ms[: rep % len(ms)]:  # rotate: no method always first
                    runs.setdefault((p, b, method), []).append(args.n / fn())

    gpu = torch.cuda.get_device_name(cpu) if cpu.type == "cuda" else None
    print(f"\nResNet18, {args.n} patches of {args.size} px, chunk {args.chunk}, {torch.get_num_threads()} torch "
          f"threads, {os.cpu_count()} CPUs, {gpu or 'no GPU'}, {args.repeats} repeats, load {os.getloadavg()[0]:.1f} (img/s)")
    print(f"{'precision':9s} {'batch':>5s} {'method':45s} {'median':>8s} {'best':>8s} {'vs model':>9s}")
    rows = []
    for p in precisions:
        for b in sizes:
            alone = runs[(p, b, "model alone (in-memory tensors)")]
            for (pp, bb, method), speeds in runs.items():
                if (pp, bb) != (p, b):
                    continue
                # Paired ratio per repeat (neighbours in time), then the median over repeats.
                ratio = statistics.median(s / a for s, a in zip(speeds, alone, strict=True))
                rows.append({"precision": p, "batch": b, "method": method, "images_per_s": speeds,
                             "median": statistics.median(speeds), "best": max(speeds), "ratio_vs_model": ratio})
                print(f"{p:9s} {b:5d} {method:45s} {statistics.median(speeds):8.1f} {max(speeds):8.1f} {ratio:8.0%}")
    if args.train:
        fit = time_fit(args.train, args.size)
        print(f"\nfit_classifier: ResNet18 from scratch, {fit['patches']} patches of {args.size} px, 3 epochs: "
              f"{fit['seconds']:.1f} s; held-out accuracy {fit['held_out_accuracy']:.3f}")
    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
                    "gpu": gpu, "peak_gpu_memory_mib": torch.cuda.max_memory_allocated(cpu) / 2**20 if gpu else None},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "fit": fit if args.train else None,
    }
    out_path = args.out or ROOT / "bench" / "results" / "inference.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
