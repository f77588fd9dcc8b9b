"""Retrain from annotated generated slides through the public CLI, then segment another slide.

    python bench/bench_retrain_one_slide.py                       # one training slide (spatial split)
    python bench/bench_retrain_one_slide.py --train-seeds 31,32,33 --tile-mpp 0.5 --patch-size 224 \\
        --width 10240 --height 7680                               # three slides at 0.5 µm/px (split by slide)

Every step is a `wsipipe` command, as a user types it: ``synth`` (slides with ground-truth
GeoJSON), ``tile``, ``patches --annotations`` (labels from that GeoJSON), ``train --init scratch``
and ``run`` on a slide that was not trained on; then the tumor Dice of the run's mask against
that slide's ground truth (as ``wsipipe demo`` computes it). Prints one JSON line: the split,
the card's threshold and test metrics, the Dice at the card threshold, the seconds per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wsipipe(*args: object, env: dict[str, str]) -> float:
    """Run one CLI command; its seconds. A failure prints its output and ends the benchmark."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "wsipipe.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"wsipipe {' '.join(map(str, args))} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    if args[0] == "train":
        print(res.stdout.strip(), file=sys.stderr)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-seeds", default="41", help="synth seeds of the training slides, comma-separated")
    ap.add_argument("--test-seed", type=int, default=42, help="synth seed of the slide the model is run on")
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4500)
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 µm/px of the generated slides")
    ap.add_argument("--tile-mpp", type=float, default=1.0)
    ap.add_argument("--patch-size", type=int, default=64)
    ap.add_argument("--train-size", type=int, default=48, help="training crop edge (train.train_size)")
    ap.add_argument("--arch", default="shufflenet_v2_x0_5")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the CLI processes")
    ap.add_argument("--work", type=Path, default=None, help="keep the data here (default: a temporary folder)")
    args = ap.parse_args()

    from shapely.geometry import MultiPolygon

    from wsipipe.geojson import read_geojson
    from wsipipe.geometry import dice

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "COLUMNS": "200"}
    config = work / "config.yaml"
    config.write_text(
        f"tile: {{mpp: {args.tile_mpp}, patch_size: {args.patch_size}}}\nmodel: {{arch: {args.arch}}}\n"
        f"train: {{arch: {args.arch}, epochs: {args.epochs}, lr: {args.lr}, train_size: {args.train_size}, "
        "device: cpu, precision: fp32}\n"
    )
    seconds: dict[str, float] = {"synth": 0.0, "tile": 0.0, "patches": 0.0}
    stores = []
    seeds = [int(s) for s in args.train_seeds.split(",")]
    for seed in [*seeds, args.test_seed]:
        slide = work / f"gen{seed}.svs"
        if not slide.exists():
            seconds["synth"] += wsipipe("synth", slide, "--width", args.width, "--height", args.height, "--mpp", args.mpp,
                                        "--seed", seed, env=env)
        if seed == args.test_seed:
            break
        store = work / f"gen{seed}.zarr"
        seconds["tile"] += wsipipe("tile", slide, "--out", store, "--config", config, env=env)
        seconds["patches"] += wsipipe("patches", store, "--annotations", slide.with_suffix(".geojson"),
                                      "--classes", "Normal,Tumor", "--config", config, env=env)
        stores.append(store)
    seconds["train"] = wsipipe("train", *stores, "--out", work / "model", "--init", "scratch", "--config", config, env=env)
    test = work / f"gen{args.test_seed}.svs"
    seconds["run"] = wsipipe("run", test, "--out", work / "results", "--model", work / "model" / "model.safetensors",
                             "--config", config, env=env)
    card = json.loads((work / "model" / "card.json").read_text())
    slide_dir = next(p for p in (work / "results").iterdir() if (p / "summary.json").is_file())
    summary = json.loads((slide_dir / "summary.json").read_text())
    truth = read_geojson(test.with_suffix(".geojson")).get("Tumor", MultiPolygon())
    predicted = read_geojson(slide_dir / "tumor.geojson").get("Tumor", MultiPolygon())
    m = card["test_metrics"]
    print(json.dumps({
        "train_slides": len(stores), "size": [args.width, args.height], "mpp": args.mpp, "tile_mpp": args.tile_mpp,
        "patch_size": args.patch_size, "arch": args.arch, "split": card["split"],
        "class_counts": {k: v["class_counts"] for k, v in card["data"]["splits"].items()},
        "best_epoch": card["best_epoch"], "epochs_run": len(card["history"]),
        "val_auc": [round(h["val_auc"], 4) for h in card["history"]], "threshold": card["threshold"],
        "run_threshold": summary.get("threshold"),
        "test_auc": round(m["auc"], 4), "test_accuracy": round(m["accuracy"], 4),
        "tumor_dice": round(dice(predicted, truth), 4), "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "work": str(work),
    }))


if __name__ == "__main__":
    main()
