"""Self-supervised encoders against random initialisation, by linear probe: SimCLR, BYOL and
SwAV pretrained in one run on the same generated slides, each probed on the same split.

    python bench/bench_ssl_probe.py                      # ~5 min on 2 busy cores (CPU, one torch thread)
    python bench/bench_ssl_probe.py --steps 600 --swav-temperatures 0.1,0.2,0.5

Data: three generated slides (6000 x 4500 at 0.5 µm/px, seeds 21-23) tiled into 64-px patches
at 1 µm/px and labelled Normal / Tumor from their ground-truth GeoJSON. Pretraining sees the
patches of all three without labels; the linear probe (logistic regression on frozen,
standardised features) fits on two slides and scores on the third (split by slide). SwAV runs
once per temperature in --swav-temperatures (pretrain.temperature; the other settings are the
config's defaults). Prints a table; JSON in bench/results/ssl_probe.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps per method")
    ap.add_argument("--arch", default="shufflenet_v2_x0_5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--swav-temperatures", default="0.2,0.5", help="one SwAV run per temperature (comma-separated)")
    ap.add_argument("--methods", default="simclr,byol,swav", help="methods to pretrain (comma-separated)")
    ap.add_argument("--seed", type=int, default=0, help="pretraining seed (the same for every method)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--work", type=Path, default=None, help="keep data here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from wsipipe.config import PretrainConfig, load_config
    from wsipipe.learn.patchsets import label_store, load_patch_sets, split_by_group
    from wsipipe.learn.pretrain import build_encoder, linear_probe, load_encoder, pretrain
    from wsipipe.slides.synth import write_synthetic_slide
    from wsipipe.tiles.tiling import tile_slide

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ssl-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"tile.mpp": 1.0, "tile.patch_size": 64, "tile.chunk_patches": 32})
    t0 = time.perf_counter()
    labelled = []
    for seed in (21, 22, 23):
        slide, store = work / f"gen{seed}.svs", work / f"gen{seed}.zarr"
        if not slide.exists():
            write_synthetic_slide(slide, 6000, 4500, mpp=0.5, seed=seed)
        if not store.exists():
            tile_slide(slide, store, cfg)
            label_store(store, slide.with_suffix(".geojson"), ["Normal", "Tumor"])
        labelled.append(store)
    data_s = time.perf_counter() - t0

    data = load_patch_sets(labelled)
    splits = split_by_group(data.groups, (2, 0, 1), seed=0)
    probe_train = (data.patches[splits["train"]], data.labels[splits["train"]])
    probe_test = (data.patches[splits["test"]], data.labels[splits["test"]])
    torch.manual_seed(args.seed)
    random_encoder, _ = build_encoder(args.arch)
    rows = [{"encoder": "random init", "steps": 0, **linear_probe(random_encoder, probe_train, probe_test)}]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs: list[tuple[str, dict]] = [(m, {}) for m in methods if m != "swav"]
    if "swav" in methods:
        runs += [("swav", {"temperature": float(t)}) for t in args.swav_temperatures.split(",") if t.strip()]
    for method, extra in runs:
        pc = PretrainConfig(method=method, arch=args.arch, steps=args.steps, batch_size=args.batch_size, crop=48,
                            hidden_dim=256, projection_dim=64, checkpoint_every=args.steps, seed=args.seed,
                            device=args.device, precision="fp32", lr=1e-3, **extra)
        name = method + "".join(f" T={v}" for v in extra.values())
        folder = work / name.replace(" ", "_").replace("=", "")
        t = time.perf_counter()
        result = pretrain(labelled, folder, pc, cfg.augment, restart=True)  # timed from step 0
        seconds = time.perf_counter() - t
        encoder, _ = load_encoder(folder)
        losses = result.losses
        rows.append({"encoder": name, "steps": result.steps, "pretrain_s": round(seconds, 1),
                     "s_per_step": round(seconds / max(result.steps, 1), 3),
                     "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
                     **linear_probe(encoder, probe_train, probe_test)})
        print(f"  {name}: {seconds:.0f} s, probe AUC {rows[-1]['auc']:.3f}", flush=True)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0].replace(str(ROOT) + "/", ""), *sys.argv[1:]])
    print(f"\n{command}")
    print(f"linear probe ({args.arch}, batch {args.batch_size}, {len(probe_train[1])} fit / {len(probe_test[1])} scored "
          f"patches, split by slide; data prep {data_s:.0f} s)")
    print("| encoder | steps | s/step | loss, first → last 10 steps | probe accuracy | probe AUC |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loss = f"{r['loss_first10']:.2f} → {r['loss_last10']:.2f}" if "loss_first10" in r else "–"
        print(f"| {r['encoder']} | {r['steps']} | {r.get('s_per_step', '–')} | {loss} | {r['accuracy']:.3f} | {r['auc']:.3f} |")
    out = ROOT / "bench" / "results" / "ssl_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "args": {k: str(v) for k, v in vars(args).items()},
                               "machine": platform.platform(), "probe": rows}, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
