"""Deciding an archive's work before any of it starts: which slides are up to date, which
cannot be read, which must run. Torch-, Prefect- and Dask-free, so ``wsipipe archive`` decides a
nightly rerun with nothing new in seconds and returns without starting Prefect, and the
archive flow loads its model and starts its cluster only when some slide has work.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from wsipipe.config import PipelineConfig
from wsipipe.models.identity import ModelInfo
from wsipipe.run.job import output_dir
from wsipipe.run.rows import SlideResult


def decided_row(
    slide: str | Path, out_root: str | Path, cfg: PipelineConfig, info: ModelInfo | None, force: bool = False,
) -> SlideResult | None:
    """The slide's row when none of its stages need to run: ``failed`` when it cannot be opened
    or its tiles do not decode (the error names the file), ``skipped`` with its summary when its
    outputs on disk were made from this slide, config and model (``info``; None = not known
    without loading the model, so never skipped here). None when it has work. A folder holding a
    result made with another level-0 resolution is ``failed`` (naming both) unless ``force``."""
    from wsipipe.run.archive import archive_error, done_outputs

    t0 = time.perf_counter()
    try:
        slide_dir = output_dir(slide, out_root, cfg, guard=not force)
        done = done_outputs(slide, out_root, cfg, info) if info is not None else None
    except Exception as exc:  # one slide's failure, whatever it is, is its row (as in the flow)
        return SlideResult.make(slide, "failed", error=archive_error(exc), seconds=time.perf_counter() - t0)
    if done is None:
        return None
    return SlideResult.make(slide, "skipped", name=slide_dir.name, out_dir=done[0], summary=done[1],
                            seconds=time.perf_counter() - t0)


def decide(
    slides: list[Path], out_root: str | Path, cfg: PipelineConfig, info: ModelInfo | None,
    settings: dict[Path, dict[str, Any]] | None = None, force: bool = False,
) -> list[SlideResult | None]:
    """:func:`decided_row` for each slide, in order, each with its own manifest settings
    (``settings``, from :func:`wsipipe.run.archive.archive_settings`) on top of ``cfg``."""
    from wsipipe.models.carded import with_model_card
    from wsipipe.run.archive import slide_config

    settings = settings or {}
    info = with_model_card(info)  # the done-check compares the infer identity, which holds the card's input
    return [decided_row(slide, out_root, slide_config(cfg, settings.get(slide)), info, force) for slide in slides]


def work_reason(slide: str | Path, out_root: str | Path, cfg: PipelineConfig, info: ModelInfo | None) -> str:
    """Why a slide :func:`decided_row` left with work must run, read from its store's stage
    markers: ``new`` (no store yet), ``changed: ...`` (a stage made from other inputs),
    ``unfinished: ...`` (a stage interrupted) or ``changed: outputs`` (stitch settings, QC
    thresholds, exports or a missing output file)."""
    from wsipipe.errors import StoreError
    from wsipipe.models.identity import infer_identity
    from wsipipe.slides.slide import open_slide_for
    from wsipipe.tiles import store
    from wsipipe.tiles.tiling import tile_identity

    slide_dir = output_dir(slide, out_root, cfg)
    try:
        group = store.open_store(slide_dir / "patches.zarr")
    except StoreError:
        return "new"
    with open_slide_for(slide, cfg) as opened:
        expected = tile_identity(opened, cfg)
    tile = store.stage_entry(group, store.STAGE_TILE) or {}
    if tile.get("identity") != expected:
        return "changed: slide file or tissue/tile settings" if tile else "new"
    if not tile.get("complete"):
        return "unfinished: tile"
    if info is None:
        return "changed: model (not known before it is loaded)"
    infer = store.stage_entry(group, store.STAGE_INFER) or {}
    if infer.get("identity") != infer_identity(group, info):
        return "changed: model" if infer else "unfinished: infer"
    if not infer.get("complete"):
        return "unfinished: infer"
    return "changed: outputs (stitch, QC or export settings, or a missing file)"


def dry_run(
    slides: list[Path], out_root: str | Path, cfg: PipelineConfig, info: ModelInfo | None,
    settings: dict[Path, dict[str, Any]] | None = None, force: bool = False,
) -> list[tuple[Path, str]]:
    """What a run would do with each slide, without writing anything: (slide, ``would process
    (new)`` / ``would process (changed: ...)`` / ``would skip (up to date)`` / ``would fail (...)``)."""
    from wsipipe.models.carded import with_model_card
    from wsipipe.run.archive import slide_config

    settings = settings or {}
    info = with_model_card(info)
    out: list[tuple[Path, str]] = []
    for slide, row in zip(slides, decide(slides, out_root, cfg, info, settings, force), strict=True):
        if row is None:
            try:
                verdict = f"would process ({work_reason(slide, out_root, slide_config(cfg, settings.get(slide)), info)})"
            except Exception as exc:  # decided readable a moment ago; say what changed since
                verdict = f"would fail ({exc})"
        elif row.status == "skipped":
            verdict = "would skip (up to date)"
        else:
            verdict = f"would fail ({row.error})"
        out.append((slide, verdict))
    return out
