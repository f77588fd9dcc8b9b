"""Patch heads from stored features against pixels, and which encoder's embeddings train the best MIL model.

1. Patch classifier, through the CLI as a user runs it, on the same labelled stores: `wsipipe
   train` from pixels against `wsipipe train --features --encoder SPEC` (a linear head on stored
   features) for each encoder below; wall seconds of the whole command (start-up, embedding
   where the features are missing, fit, card) and held-out test AUC (split by slide).
2. Attention MIL (`wsipipe mil train` defaults, cross-validated by slide) on an archive of
   generated slides labelled only tumor present / absent, with tumors smaller than a patch
   (40-80 µm radius, as `bench_mil.py --tumor-radius 40 80`), embedded by: a random-init ResNet18,
   SimCLR, BYOL and SwAV ResNet18s pretrained briefly on the archive's own stores (labels unused;
   --arch for another architecture, whose random init is then a row too), and the supervised
   pixel classifier of (1) (its penultimate layer). CV is repeated over --mil-seeds (fold draws
   and MIL initialisation).

    python bench/bench_train_features.py               # ~11 min on 2 busy cores, CPU, one torch thread
    python bench/bench_train_features.py --steps 300 --work /tmp/btf   # ~17 min

Labelled stores: four generated slides (5000 x 3750 at 0.5 µm/px, two tissue pieces and two
planted tumors each, seeds 31-34), tiled into 64-px patches at 1 µm/px and labelled Normal /
Tumor from their ground truth. Prints two tables; JSON in bench/results/train_features.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def labelled_stores(work: Path, cfg) -> list[Path]:
    from wsipipe.learn.patchsets import label_store
    from wsipipe.slides.synth import write_synthetic_slide
    from wsipipe.tiles.tiling import tile_slide

    stores = []
    for seed in (31, 32, 33, 34):
        slide, out = work / f"labelled{seed}.svs", work / f"labelled{seed}.zarr"
        if not slide.exists():
            write_synthetic_slide(slide, 5000, 3750, mpp=0.5, seed=seed, n_tissue=2, n_tumor=2)
        if not out.exists():
            tile_slide(slide, out, cfg)
            label_store(out, slide.with_suffix(".geojson"), ["Normal", "Tumor"])
        stores.append(out)
    return stores


def cli(args: list, threads: int) -> tuple[float, str]:
    """Run `wsipipe ARGS` as a user would; (wall seconds, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "COLUMNS": "200"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "wsipipe.cli", *map(str, args)], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"wsipipe {' '.join(map(str, args))} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return seconds, res.stdout


def pretrained(work: Path, stores: list[Path], method: str, args, cfg) -> Path:
    from wsipipe.config import PretrainConfig
    from wsipipe.learn.pretrain import pretrain

    folder = work / f"pretrain-{method}-{args.arch}"
    pc = PretrainConfig(method=method, arch=args.arch, steps=args.steps, batch_size=32, crop=48, hidden_dim=256,
                        projection_dim=64, checkpoint_every=args.steps, seed=0, device=args.device, precision="fp32", lr=1e-3)
    pretrain(stores, folder, pc, cfg.augment)  # resumes (does nothing) when --work already holds it
    return folder


def random_weights(work: Path, arch: str) -> Path:
    from wsipipe.models.model import build_model, save_weights

    path = work / f"{arch}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        save_weights(build_model(arch, 1), path, arch, 1)
    return path


def mil_rows(stores, slides, labels, encoders: dict[str, str], cfg, seeds: list[int], work: Path) -> list[dict]:
    from wsipipe.learn.encoders import load_encoder_spec
    from wsipipe.learn.mil import train_mil
    from wsipipe.models.embed import embed_store

    labels_csv = work / "labels.csv"
    labels_csv.write_text("slide,label\n" + "".join(f"{p.stem},{'present' if y else 'absent'}\n"
                                                    for p, y in zip(slides, labels, strict=True)))
    rows = []
    for name, spec in encoders.items():
        encoder, identity = load_encoder_spec(spec)
        t0 = time.perf_counter()
        computed = sum(embed_store(s, encoder, identity, cfg.inference)["computed"] for s in stores)
        embed_s = time.perf_counter() - t0
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            out = work / f"mil-{name.split()[0]}-{identity['sha256'][:8]}-{seed}"
            card = train_mil(stores, labels_csv, out, cfg.mil.model_copy(update={"seed": seed}), positive="present")
            runs.append({"seed": seed, "auc_mean": card["cv"]["auc_mean"], "auc_std": card["cv"]["auc_std"],
                         "held_out_auc": card["cv"]["held_out_auc"], "seconds": round(time.perf_counter() - t0, 1)})
        pooled = [r["held_out_auc"] for r in runs]
        rows.append({"encoder": name, "dim": identity["dim"], "embedded": computed, "embed_s": round(embed_s, 1),
                     "runs": runs, "held_out_auc_mean": float(np.mean(pooled)), "held_out_auc_min": float(np.min(pooled)),
                     "held_out_auc_max": float(np.max(pooled)), "fold_auc_mean": float(np.mean([r["auc_mean"] for r in runs]))})
        print(f"  MIL on {name}: pooled out-of-fold AUC {pooled} ({embed_s:.0f} s embedding)", flush=True)
    return rows


def main() -> None:
    from benchutil import write_results  # noqa: I001  (bench/ is the script's folder)
    from bench_mil import make_archive

    from wsipipe.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=24, help="slides in the MIL archive (half with tumor)")
    ap.add_argument("--steps", type=int, default=150, help="pretraining steps per self-supervised method")
    ap.add_argument("--arch", default="resnet18", help="architecture of the pretrained encoders (and of a random one)")
    ap.add_argument("--pixel-epochs", type=int, default=6, help="`wsipipe train --epochs` from pixels")
    ap.add_argument("--mil-seeds", default="0,1,2", help="MIL cross-validations per encoder (comma-separated seeds)")
    ap.add_argument("--tumor-radius", type=float, nargs=2, default=(40.0, 80.0), metavar=("MIN", "MAX"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--work", type=Path, default=None, help="keep data here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-features-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = {"tile.mpp": 1.0, "tile.patch_size": 64, "tile.chunk_patches": 32, "inference.device": args.device,
                 "inference.batch_size": 64, "train.device": args.device, "dask.num_workers": 2}
    cfg = load_config(None, overrides)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"train": {"device": args.device, "registry": str(work / "registry")},
                                      "inference": {"device": args.device, "batch_size": 64}}))
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
                     "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0].replace(str(ROOT) + "/", ""), *sys.argv[1:]])}

    t0 = time.perf_counter()
    labelled = labelled_stores(work, cfg)
    slides, archive, labels = make_archive(work, args.slides, cfg, tuple(args.tumor_radius))
    results["data_s"] = round(time.perf_counter() - t0, 1)
    encoders = {f"random {arch}": str(random_weights(work, arch)) for arch in dict.fromkeys([args.arch, "resnet18"])}
    for method in ("simclr", "byol", "swav"):
        t0 = time.perf_counter()
        encoders[f"{method} {args.arch}"] = str(pretrained(work, archive, method, args, cfg))
        results[f"pretrain_{method}_s"] = round(time.perf_counter() - t0, 1)
        print(f"  pretrained {method} ({args.steps} steps) in {results[f'pretrain_{method}_s']} s", flush=True)

    # 1. Patch classifier from pixels and from stored features, through the CLI.
    heads = []
    seconds, _ = cli(["train", *labelled, "--out", work / "pixels", "--epochs", args.pixel_epochs, "--config", config], args.threads)
    card = json.loads((work / "pixels" / "card.json").read_text())
    heads.append({"run": f"`wsipipe train` from pixels (ResNet18 fine-tuned, ≤ {args.pixel_epochs} epochs)", "seconds": round(seconds, 1),
                  "test_auc": card["test_metrics"]["auc"], "epochs": len(card["history"]), "n_train": card["data"]["splits"]["train"]["n"],
                  "n_test": card["test_metrics"]["n"]})
    for name, spec in encoders.items():
        for attempt in ("first", "again"):
            out = work / f"head-{name.replace(' ', '-')}-{attempt}"
            seconds, stdout = cli(["train", *labelled, "--features", "--encoder", spec, "--out", out, "--config", config], args.threads)
            card = json.loads((out / "card.json").read_text())
            heads.append({"run": f"`--features`, {name}" + (" (features already stored)" if attempt == "again" else ""),
                          "seconds": round(seconds, 1), "embed_s": round(sum(e["seconds"] for e in card["embedded"]), 1),
                          "test_auc": card["test_metrics"]["auc"], "epochs": len(card["history"])})
    results["patch_heads"] = heads
    print(f"  patch heads done at {time.perf_counter() - t_start:.0f} s", flush=True)

    # 2. MIL per encoder, the supervised pixel classifier's penultimate layer among them.
    encoders["supervised ResNet18 (penultimate layer)"] = str(work / "pixels" / "model.safetensors")
    seeds = [int(s) for s in args.mil_seeds.split(",")]
    results["archive"] = {"slides": len(slides), "positive": int(sum(labels)), "tumor_radius_um": list(args.tumor_radius)}
    results["mil"] = mil_rows(archive, slides, labels, encoders, cfg, seeds, work)
    results["seconds"] = round(time.perf_counter() - t_start, 1)

    print(f"\n{results['command']}  ({results['seconds']:.0f} s in all; data {results['data_s']} s)")
    print("\n| patch classifier (4 labelled slides, split by slide) | wall s (whole command) | of which embedding | test AUC | epochs |")
    print("|---|---|---|---|---|")
    for h in heads:
        print(f"| {h['run']} | {h['seconds']} | {h.get('embed_s', '–')} | {h['test_auc']:.3f} | {h['epochs']} |")
    print(f"\n| encoder ({len(slides)} slides, {sum(labels)} with tumors of {args.tumor_radius[0]:.0f}-{args.tumor_radius[1]:.0f} µm) "
          f"| dim | MIL pooled out-of-fold AUC, mean over seeds {seeds} (min–max) | mean fold AUC | embedding s |")
    print("|---|---|---|---|---|")
    for r in results["mil"]:
        print(f"| {r['encoder']} | {r['dim']} | {r['held_out_auc_mean']:.3f} ({r['held_out_auc_min']:.3f}–{r['held_out_auc_max']:.3f}) "
              f"| {r['fold_auc_mean']:.3f} | {r['embed_s']} |")
    print(f"\nresults: {write_results('train_features', results)}")


if __name__ == "__main__":
    main()
