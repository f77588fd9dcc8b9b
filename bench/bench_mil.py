"""Patch embeddings and slide-level attention MIL on an archive of generated slides labelled only
tumor present / absent:

1. cross-validated slide AUC of gated-attention MIL (`wsipipe mil train`; target >= 0.9);
2. embedding throughput against inference throughput, same encoder body, same stores;
3. a patch head trained from stored features against a classifier trained from pixels
   (same training slides, same held-out slides, patch labels from the ground truth).

    python bench/bench_mil.py                      # 24 slides, ~3-5 min on 2 busy cores
    python bench/bench_mil.py --slides 40 --device cuda

The encoder is a randomly initialised ResNet18 (no pretrained weights exist offline): what
MIL reaches on top of it is a floor for a pretrained encoder. Slides: 2 x 1.5 mm at 0.5 µm/px,
two tissue pieces, half of them with one or two small planted tumors (150-350 µm radius: a few
patches of a few hundred); tiled at 1 µm/px into 64-px patches. Prints a table; JSON in bench/results/mil.json.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_archive(work: Path, n: int, cfg, radius: tuple[float, float]) -> tuple[list[Path], list[Path], list[int]]:
    from wsipipe.slides.synth import make_layout, write_synthetic_slide
    from wsipipe.tiles.tiling import tile_slide

    slides, stores, labels = [], [], []
    for i in range(n):
        n_tumor = 0 if i % 2 == 0 else 1 + (i // 2) % 2
        path = work / f"slide{i:03d}.svs"
        if not path.exists():  # textures shared (seed 7), layouts per slide
            layout = make_layout(4000, 3000, 0.5, 1000 + i, n_tissue=2, n_tumor=n_tumor, tumor_radius_um=radius)
            write_synthetic_slide(path, 4000, 3000, mpp=0.5, seed=7, layout=layout)
        out = work / f"slide{i:03d}.zarr"
        tile_slide(path, out, cfg)
        slides.append(path)
        stores.append(out)
        labels.append(int(n_tumor > 0))
    return slides, stores, labels


def throughput(work: Path, encoder, identity, classifier, info, cfg) -> dict:
    """Embedding and inference of the same patches (two copies of one store, both read once first
    so that both run from the page cache), same ResNet18 body, same batching."""
    from wsipipe.models.embed import embed_store
    from wsipipe.models.inference import infer_store
    from wsipipe.slides.synth import make_layout, write_synthetic_slide
    from wsipipe.tiles import store
    from wsipipe.tiles.tiling import tile_slide

    slide = work / "throughput.svs"
    if not slide.exists():
        write_synthetic_slide(slide, 10000, 7500, mpp=0.5, seed=7, layout=make_layout(10000, 7500, 0.5, 99, 3, 2))
    tiled = work / "throughput.zarr"
    tile_slide(slide, tiled, cfg)
    out = {}
    for name, run in (("embed", lambda s: embed_store(s, encoder, identity, cfg.inference)),
                      ("infer", lambda s: infer_store(s, classifier, info, cfg.inference))):
        copy = work / f"throughput-{name}.zarr"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tiled, copy)
        np.asarray(store.array(store.open_store(copy), store.PATCHES)[:])  # warm the page cache
        t0 = time.perf_counter()
        stats = run(copy)
        seconds = time.perf_counter() - t0
        out[name] = {"patches": stats["computed"], "seconds": round(seconds, 2),
                     "patches_per_s": round(stats["computed"] / seconds, 1)}
    return out


def patch_heads(slides, stores, labels, cfg, pixel_epochs: int) -> dict:
    """Train on the first half of the tumor slides' labelled patches, score on the second half."""
    from wsipipe.learn.metrics import binary_auc
    from wsipipe.learn.patchsets import label_store
    from wsipipe.learn.train import fit_classifier
    from wsipipe.models.embed import read_features
    from wsipipe.models.inference import predict_patches
    from wsipipe.tiles import store

    tumor = [i for i, y in enumerate(labels) if y]
    train, test = tumor[: len(tumor) // 2], tumor[len(tumor) // 2 :]
    data = {}
    for i in tumor:
        y = label_store(stores[i], slides[i].with_suffix(".geojson"), ["Normal", "Tumor"])
        group = store.open_store(stores[i])
        data[i] = (np.asarray(store.array(group, store.PATCHES)[:]), read_features(stores[i]), np.asarray(y))

    def stack(idx, k):
        return np.concatenate([data[i][k] for i in idx])

    y_train, y_test = stack(train, 2), stack(test, 2)
    keep_train, keep_test = y_train >= 0, y_test >= 0
    out = {"train_patches": int(keep_train.sum()), "test_patches": int(keep_test.sum())}

    # From features: logistic regression, full batch, standardised, class-balanced.
    t0 = time.perf_counter()
    x = torch.from_numpy(stack(train, 1)[keep_train])
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    y = torch.from_numpy(y_train[keep_train].astype(np.float32))
    head = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    pos = float(y.mean())
    weight = torch.where(y > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head((x - mean) / std).squeeze(1), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = torch.sigmoid(head((torch.from_numpy(stack(test, 1)[keep_test]) - mean) / std).squeeze(1)).numpy()
    out["features"] = {"seconds": round(time.perf_counter() - t0, 2), "auc": round(binary_auc(scores, y_test[keep_test] == 1), 4)}

    # From pixels: ResNet18 from scratch, as `wsipipe train` fits it.
    t0 = time.perf_counter()
    model = fit_classifier(stack(train, 0)[keep_train], y_train[keep_train], epochs=pixel_epochs, device=cfg.inference.device,
                           train_size=None, batch_size=32)
    probs = predict_patches(model, stack(test, 0)[keep_test], torch.device(cfg.inference.device))
    out["pixels"] = {"seconds": round(time.perf_counter() - t0, 2), "epochs": pixel_epochs,
                     "auc": round(binary_auc(probs, y_test[keep_test] == 1), 4)}
    return out


def main() -> None:
    from benchutil import write_results  # noqa: I001  (bench/ is the script's folder)

    from wsipipe.config import load_config
    from wsipipe.learn.encoders import load_encoder_spec
    from wsipipe.learn.mil import train_mil
    from wsipipe.models.embed import embed_store
    from wsipipe.models.model import build_model, load_model, save_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=24)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--pixel-epochs", type=int, default=2)
    ap.add_argument("--tumor-radius", type=float, nargs=2, default=(150.0, 350.0), metavar=("MIN", "MAX"),
                    help="planted tumor radius range, µm (small tumors: a few patches of a slide)")
    ap.add_argument("--work", type=Path, default=None, help="keep data here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mil-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"tile.mpp": 1.0, "tile.patch_size": 64, "inference.device": args.device,
                             "inference.batch_size": 64, "dask.num_workers": 2, "mil.folds": args.folds})
    results: dict = {"tumor_radius_um": list(args.tumor_radius), "machine": platform.processor() or platform.machine(),
                     "threads": args.threads, "device": args.device}

    t0 = time.perf_counter()
    slides, stores, labels = make_archive(work, args.slides, cfg, tuple(args.tumor_radius))
    results["archive"] = {"slides": len(slides), "positive": sum(labels), "seconds": round(time.perf_counter() - t0, 1)}
    torch.manual_seed(0)
    weights = work / "resnet18-random.safetensors"
    if not weights.exists():
        save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    encoder, identity = load_encoder_spec(weights)
    classifier, info = load_model(weights)
    results["throughput"] = throughput(work, encoder, identity, classifier, info, cfg)
    t0 = time.perf_counter()
    for s in stores:
        embed_store(s, encoder, identity, cfg.inference)
    results["embed_archive_seconds"] = round(time.perf_counter() - t0, 1)

    labels_csv = work / "labels.csv"
    labels_csv.write_text("slide,label\n" + "".join(f"{p.stem},{'present' if y else 'absent'}\n" for p, y in zip(slides, labels, strict=True)))
    t0 = time.perf_counter()
    card = train_mil(stores, labels_csv, work / "mil", cfg.mil, positive="present")
    cv = card["cv"]
    results["mil"] = {k: cv[k] for k in ("folds", "fold_auc", "auc_mean", "auc_std", "held_out_auc", "threshold")}
    results["mil"]["seconds"] = round(time.perf_counter() - t0, 1)
    results["patch_heads"] = patch_heads(slides, stores, labels, cfg, args.pixel_epochs)

    th, mil, heads = results["throughput"], results["mil"], results["patch_heads"]
    print(f"archive: {len(slides)} slides ({sum(labels)} with tumor), tiled in {results['archive']['seconds']} s")
    print(f"embedding {th['embed']['patches_per_s']} patches/s vs inference {th['infer']['patches_per_s']} patches/s "
          f"({th['embed']['patches']} patches, ResNet18 at 64 px, {args.device}, {args.threads} thread(s))")
    print(f"MIL {mil['folds']}-fold CV slide AUC {mil['auc_mean']} ± {mil['auc_std']} (folds {mil['fold_auc']}), "
          f"pooled out-of-fold AUC {mil['held_out_auc']}; CV + final fit {mil['seconds']} s")
    print(f"patch head from stored features: AUC {heads['features']['auc']} in {heads['features']['seconds']} s; "
          f"from pixels ({heads['pixels']['epochs']} epochs): AUC {heads['pixels']['auc']} in {heads['pixels']['seconds']} s "
          f"({heads['train_patches']} train / {heads['test_patches']} test patches)")
    print(f"results: {write_results('mil', results)}")


if __name__ == "__main__":
    main()
