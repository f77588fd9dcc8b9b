"""Prefect flows for the training side: thin wrappers over wsipipe library calls.

    python -m flows.training            # (with a Prefect server/profile) runs nothing by itself;
    from flows.training import train_flow; train_flow(["a.zarr", "b.zarr"], "runs/m1")

Each flow loads the config (YAML path + dotted overrides) and calls one library function,
so the same work runs from the CLI, from Python or as a Prefect deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from wsipipe.config import load_config


@task
def label_slide_task(store: str, annotations: str, classes: list[str] | None, min_overlap: float,
                     max_normal_overlap: float) -> dict:
    from wsipipe.learn.patchsets import label_store

    labels = label_store(store, annotations, classes, min_overlap, max_normal_overlap)
    return {"store": store, "n": int(len(labels)), "labelled": int((labels >= 0).sum())}


@flow(name="wsipipe-patches")
def patches_flow(stores: list[str], annotations: list[str], classes: list[str] | None = None,
                 config: str | None = None, overrides: dict[str, Any] | None = None) -> list[dict]:
    """Label tiled stores from their QuPath GeoJSON (one annotation file per store)."""
    cfg = load_config(config, overrides)
    futures = [label_slide_task.submit(s, a, classes, cfg.train.min_overlap, cfg.train.max_normal_overlap)
               for s, a in zip(stores, annotations, strict=True)]
    return [f.result() for f in futures]


@flow(name="wsipipe-folder-patches")
def folder_patches_flow(folder: str, out: str, patch_size: int | None = None, group_regex: str | None = None) -> dict:
    from wsipipe.learn.patchsets import folder_patch_set

    return folder_patch_set(folder, out, patch_size, group_regex)


@flow(name="wsipipe-augment")
def augment_flow(store: str, out: str, copies: int = 1, preview: str | None = None, samples: int = 6,
                 config: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Augmented copy of a patch set (Zarr) and a PNG grid of samples per transform."""
    from wsipipe.learn.augment import augment_store

    cfg = load_config(config, overrides)
    return augment_store(store, out, cfg.augment, copies, preview, samples)


@flow(name="wsipipe-pretrain")
def pretrain_flow(stores: list[str], out: str, probe_stores: list[str] | None = None,
                  config: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """SimCLR / BYOL / SwAV pretraining (resumes from ``out``), then an optional linear probe."""
    from wsipipe.learn.pretrain import pretrain, probe_on_sets

    cfg = load_config(config, overrides)
    log = get_run_logger()
    result = pretrain(list[str | Path](stores), out, cfg.pretrain, cfg.augment,
                      progress=lambda s, n, loss, rate: log.info("step %d/%d loss %.4f (%.0f patches/s)", s, n, loss, rate)
                      if s % 10 == 0 or s == n else None)
    summary = {"checkpoint": str(result.checkpoint), "steps": result.steps, "resumed_from": result.resumed_from,
               "final_loss": result.losses[-1] if result.losses else None}
    if probe_stores:
        summary["probe"] = probe_on_sets(out, list[str | Path](probe_stores), cfg.train.seed)
    return summary


@flow(name="wsipipe-train")
def train_flow(stores: list[str], out: str, add_to_registry: bool = False, promote: bool = False,
               config: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Retrain on labelled stores; optionally register the model and try to promote it
    (promotion is refused, and logged, when it does not beat production on the same split)."""
    from wsipipe.learn import registry
    from wsipipe.errors import RegistryError
    from wsipipe.learn.train import train_model

    cfg = load_config(config, overrides)
    log = get_run_logger()
    card = train_model(stores, out, cfg)
    result = {"out": str(out), "test_metrics": card["test_metrics"], "threshold": card["threshold"], "split": card["split"]}
    if card["split"]["by"] == "spatial":
        log.warning("split spatially within %d slide(s): %s", len(set(card["data"]["splits"]["train"]["groups"])),
                    card["split"]["note"])
    if add_to_registry or promote:
        version = registry.register(cfg.train.registry, Path(out))
        result["version"] = version
        if promote:
            try:
                registry.promote(cfg.train.registry, version)
                result["promoted"] = True
            except RegistryError as exc:
                log.warning("not promoted: %s", exc)
                result["promoted"] = False
    return result
