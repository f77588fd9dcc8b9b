"""Does contrastive pretraining help? Linear-probe quality of SimCLR and BYOL encoders against
a randomly initialised encoder on the same probe, and retraining curves from scratch vs from
the pretrained encoder, side by side in one run.

    python bench/bench_pretrain.py                              # ~3-6 min on 2 busy cores
    python bench/bench_pretrain.py --steps 300 --arch resnet18  # longer, bigger (GPU: --device cuda)

Data: unlabelled patches tiled from the real H&E slides in ../shared/data/slides
(CMU-1 small region; the TCGA JPEG 2000 slide with its missing mpp overridden to 0.25)
plus three generated slides; the labelled set is the generated slides' patches labelled
Normal / Tumor from their ground-truth GeoJSON. The probe fits on two slides and scores on
the third (split by slide). Prints a table; JSON in bench/results/pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="pretraining steps per method")
    ap.add_argument("--arch", default="shufflenet_v2_x0_5")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5, help="retraining epochs (early stopping on validation AUC)")
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
    from wsipipe.learn.train import train_model

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"tile.mpp": 1.0, "tile.patch_size": 64, "tile.chunk_patches": 32})
    t0 = time.perf_counter()
    unlabelled, labelled = [], []
    for name, path, override in (("cmu", SLIDES / "cmu-1-small-region.svs", None),
                                 ("tcga", SLIDES / "tcga-cr-7395-01a-01-ts1.svs", 0.25)):
        store = work / f"{name}.zarr"
        tile_slide(path, store, cfg.model_copy(update={"mpp_override": override}))
        unlabelled.append(store)
    for seed in (21, 22, 23):
        s = work / f"gen{seed}.svs"
        if not s.exists():
            write_synthetic_slide(s, 6000, 4500, mpp=0.5, seed=seed)
        store = work / f"gen{seed}.zarr"
        tile_slide(s, store, cfg)
        label_store(store, s.with_suffix(".geojson"), ["Normal", "Tumor"])
        labelled.append(store)
    data_s = time.perf_counter() - t0

    data = load_patch_sets(labelled)
    splits = split_by_group(data.groups, (2, 0, 1), seed=0)
    probe_train = (data.patches[splits["train"]], data.labels[splits["train"]])
    probe_test = (data.patches[splits["test"]], data.labels[splits["test"]])
    rows, curves = [], {}
    torch.manual_seed(0)
    random_encoder, _ = build_encoder(args.arch)
    rows.append({"encoder": "random init", "steps": 0, **linear_probe(random_encoder, probe_train, probe_test)})
    for method in ("simclr", "byol"):
        pc = PretrainConfig(method=method, arch=args.arch, steps=args.steps, batch_size=args.batch_size, crop=48,
                            hidden_dim=256, projection_dim=64, checkpoint_every=max(args.steps // 4, 1),
                            device=args.device, precision="fp32", lr=1e-3)
        t = time.perf_counter()
        result = pretrain(unlabelled + labelled, work / method, pc, cfg.augment, restart=True)  # timed from step 0
        seconds = time.perf_counter() - t
        encoder, _ = load_encoder(work / method)
        losses = result.losses
        rows.append({"encoder": method, "steps": result.steps, "pretrain_s": round(seconds, 1),
                     "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
                     **linear_probe(encoder, probe_train, probe_test)})

    tcfg = cfg.model_copy(deep=True)
    tcfg.train = tcfg.train.model_copy(update=dict(arch=args.arch, epochs=args.epochs, patience=args.epochs,
                                                   train_size=48, split=(1, 1, 1), device=args.device, lr=3e-3))
    for init, path in (("scratch", None), ("encoder", work / "simclr"), ("encoder", work / "byol")):
        tcfg.train = tcfg.train.model_copy(update={"init": init, "init_path": path})
        label = init if path is None else f"{init}:{path.name}"
        t = time.perf_counter()
        card = train_model(labelled, work / f"train-{label.replace(':', '-')}", tcfg)
        curves[label] = {"val_auc_by_epoch": [round(h["val_auc"], 4) for h in card["history"]],
                         "train_loss_by_epoch": [round(h["train_loss"], 4) for h in card["history"]],
                         "test": {k: card["test_metrics"][k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")},
                         "seconds": round(time.perf_counter() - t, 1)}

    print(f"\nlinear probe ({args.arch}, {len(probe_train[1])} train / {len(probe_test[1])} test patches, split by slide;"
          f" data prep {data_s:.0f} s)")
    print(f"{'encoder':>12} {'steps':>6} {'loss first->last':>18} {'probe acc':>10} {'probe AUC':>10}")
    for r in rows:
        loss = f"{r['loss_first10']:.3f}->{r['loss_last10']:.3f}" if "loss_first10" in r else "-"
        print(f"{r['encoder']:>12} {r['steps']:>6} {loss:>18} {r['accuracy']:>10.3f} {r['auc']:>10.3f}")
    print("\nretraining curves (validation AUC per epoch; test metrics on the held-out slide)")
    for label, c in curves.items():
        t = c["test"]
        print(f"{label:>16}: val AUC {c['val_auc_by_epoch']}  test AUC {t['auc']:.3f} acc {t['accuracy']:.3f} "
              f"ECE {t['ece']:.3f}  ({c['seconds']} s)")
    out = ROOT / "bench" / "results" / "pretrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
                               "cpu_threads": args.threads, "probe": rows, "retraining": curves}, indent=1))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
