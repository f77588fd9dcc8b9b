"""One slide end to end (tile -> infer -> stitch), and the embedded demo.

Thin orchestration over the stage modules; the CLI and the Prefect flows call these.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from wsipipe.config import PipelineConfig
from wsipipe.run.job import SlideJob, StageProgress, direct, output_dir, run_job
from wsipipe.run.names import weights_path
from wsipipe.tiles import store

__all__ = ["SlideOutputs", "StageProgress", "add_ground_truth_dice", "run_demo", "run_slide"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideOutputs:
    out_dir: Path
    store: Path
    summary: dict


def run_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig,
    model_path: str | Path | None = None,
    client=None,
    progress: StageProgress | None = None,
) -> SlideOutputs:
    """Tile, classify and stitch one slide into ``out_dir/<name>-<id>/``, then write its report.html
    (the slide job of wsipipe.run.job, every stage in this process).

    Each stage is skipped when its outputs exist for the same inputs, so a rerun is cheap."""
    from wsipipe.models.inference import resolve_device, resolve_precision
    from wsipipe.models.model import load_model

    slide_path = Path(slide_path)
    weights = weights_path(model_path, cfg)
    # Fail fast on bad weights or architecture, before any tiling work.
    net, info = load_model(weights, cfg.model.arch, cfg.model.num_classes)
    resolve_precision(cfg.inference.precision, resolve_device(cfg.inference.device))
    job = SlideJob(slide_path, output_dir(slide_path, out_dir, cfg), cfg, weights, net, info, client=client, progress=progress)
    row = run_job(job, direct)
    log.info("%s: done in %.1f s -> %s", slide_path.name, row.seconds, job.slide_dir)
    return SlideOutputs(out_dir=job.slide_dir, store=job.store, summary=row.summary or {})


def add_ground_truth_dice(slide_dir: Path, geojson_path: Path) -> dict:
    """Dice of the predicted tumor polygons against a ground-truth GeoJSON, added to summary.json."""
    from shapely.geometry import MultiPolygon

    from wsipipe.geojson import read_geojson

    from wsipipe.files import write_atomic
    from wsipipe.geometry import dice

    truth = read_geojson(geojson_path).get("Tumor", MultiPolygon())
    predicted = read_geojson(slide_dir / "tumor.geojson").get("Tumor", MultiPolygon())
    summary_path = slide_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["ground_truth"] = {"geojson": str(geojson_path), "tumor_dice": round(dice(predicted, truth), 4)}
    write_atomic(summary_path, json.dumps(summary, indent=2))
    return summary


def train_demo_model(
    slide_path: Path, geojson_path: Path, work_dir: Path, cfg: PipelineConfig, epochs: int = 3,
    progress: StageProgress | None = None,
) -> Path:
    """Fit the classifier on labelled patches of one generated slide; returns the weights file."""
    import numpy as np

    from wsipipe.geojson import read_geojson
    from wsipipe.models.model import save_weights
    from wsipipe.tiles.tiling import read_store_patches, tile_slide
    from wsipipe.learn.train import fit_classifier, label_patches

    store_path = work_dir / "train-patches.zarr"
    tile_slide(slide_path, store_path, cfg, progress=(lambda d, n: progress("tile (train)", d, n)) if progress else None)
    group = store.open_store(store_path)
    meta = store.meta(group)["tile"]
    tumor = read_geojson(geojson_path)["Tumor"]
    labels = label_patches(np.asarray(store.array(group, "coords")[:]), meta["patch_size_l0"], tumor)
    keep = np.flatnonzero(labels >= 0)
    patches = read_store_patches(group, keep, store_path)  # stored, or from the slide (tile.store_patches: false)
    model = fit_classifier(
        patches, labels[keep], arch=cfg.model.arch_for_training, num_classes=cfg.model.num_classes or 1, epochs=epochs,
        progress=(lambda d, n: progress("train", d, n)) if progress else None,
    )
    arch = cfg.model.arch_for_training
    weights = work_dir / f"demo-{arch}.safetensors"
    save_weights(model, weights, arch, cfg.model.num_classes or 1, {"trained_on": slide_path.name})
    return weights


def run_demo(out_dir: str | Path, cfg: PipelineConfig, progress: StageProgress | None = None, size=(12000, 9000)) -> SlideOutputs:
    """The embedded default: generate a training and a test slide, fit, run, score against truth."""
    from wsipipe.slides.synth import write_synthetic_slide

    out_dir = Path(out_dir)
    slides = out_dir / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    width, height = size

    def generated(name: str, seed: int) -> Path:
        path = slides / f"{name}-{width}x{height}.svs"
        if not (path.exists() and path.with_suffix(".geojson").exists()):  # deterministic: reuse
            write_synthetic_slide(path, width, height, mpp=0.5, seed=seed)
        return path

    train, test = generated("demo-train", 1), generated("demo-test", 2)
    weights = out_dir / "model" / f"demo-{cfg.model.arch_for_training}.safetensors"
    if not weights.exists():
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        weights = train_demo_model(train, train.with_suffix(".geojson"), out_dir / "model", cfg, progress=progress)
    result = run_slide(test, out_dir / "results", cfg, weights, progress=progress)
    summary = add_ground_truth_dice(result.out_dir, test.with_suffix(".geojson"))
    return SlideOutputs(out_dir=result.out_dir, store=result.store, summary=summary)
