"""One model, every source: load time, identity time (no torch) and patch throughput of the same
ResNet18 as safetensors (torchvision and timm), TorchScript, a torch.export program and a
WSInfer model folder.

    python bench/bench_model_sources.py                 # 128 patches of 224 px, 1 thread, ~1 min
    python bench/bench_model_sources.py --n 512 --threads 2

Prints one row per source: load_model seconds (build + read + for compiled files the probe forward
pass), weights_identity milliseconds, and patches/s of predict_patches (fp32, CPU, batch 32), and
the largest difference of its probabilities from the eager model's (0 means the same numbers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from wsipipe.models.identity import weights_identity
from wsipipe.models.inference import predict_patches
from wsipipe.models.model import build_model, export_model, load_model, save_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="patches per throughput run")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    patches = np.random.default_rng(0).integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        eager = build_model("resnet18", 2).eval()
        sources = {"torchvision safetensors": save_weights(eager, work / "tv" / "model.safetensors", "resnet18", 2).path}
        timm_model = build_model("timm:resnet18", 2).eval()
        timm_model.load_state_dict(eager.state_dict())  # same keys, same network
        sources["timm safetensors"] = save_weights(timm_model, work / "timm.safetensors", "timm:resnet18", 2).path
        sources["torchscript"] = export_model(sources["torchvision safetensors"], "torchscript", work / "ts" / "m.pt").path
        sources["torch.export"] = export_model(sources["torchvision safetensors"], "export", work / "ep" / "m.pt2").path
        folder = work / "wsinfer"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "spec_version": "1.0", "architecture": "resnet18", "num_classes": 2, "class_names": ["other", "tumor"],
            "patch_size_pixels": args.size, "spacing_um_px": 0.5, "transform": [{"name": "ToTensor"}, {"name": "Normalize",
            "arguments": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}]}))
        save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, folder / "model.safetensors")
        sources["WSInfer folder"] = folder

        reference = predict_patches(eager, patches, batch_size=32)
        print(f"{'source':<24} {'load s':>7} {'identity ms':>12} {'patches/s':>10} {'max |dp|':>9}")
        for name, path in sources.items():
            t0 = time.perf_counter()
            model, _ = load_model(path)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            weights_identity(path)
            ident_ms = (time.perf_counter() - t0) * 1e3
            predict_patches(model, patches[:32], batch_size=32)  # warm-up
            t0 = time.perf_counter()
            probs = predict_patches(model, patches, batch_size=32)
            rate = len(patches) / (time.perf_counter() - t0)
            print(f"{name:<24} {load_s:>7.2f} {ident_ms:>12.1f} {rate:>10.1f} {float(np.abs(probs - reference).max()):>9.2g}",
                  flush=True)


if __name__ == "__main__":
    main()
