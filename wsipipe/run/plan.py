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


def decided_row(slide: str | Path, out_root: str | Path, cfg: PipelineConfig, info: ModelInfo | None) -> SlideResult | None:
    """The slide's row when none of its stages need to run: ``failed`` when it cannot be opened
    or its tiles do not decode (the error names the file), ``skipped`` with its summary when its
    outputs on disk were made from this slide, config and model (``info``; None = not known
    without loading the model, so never skipped here). None when it has work."""
    from wsipipe.run.archive import archive_error, done_outputs

    t0 = time.perf_counter()
    try:
        slide_dir = output_dir(slide, out_root, cfg)
        done = done_outputs(slide, out_root, cfg, info) if info is not None else None
    except Exception as exc:  # one slide's failure, whatever it is, is its row (as in the flow)
        return SlideResult.make(slide, "failed", error=archive_error(exc), seconds=time.perf_counter() - t0)
    if done is None:
        return None
    return SlideResult.make(slide, "skipped", name=slide_dir.name, out_dir=done[0], summary=done[1],
                            seconds=time.perf_counter() - t0)


def decide(
    slides: list[Path], out_root: str | Path, cfg: PipelineConfig, info: ModelInfo | None,
    settings: dict[Path, dict[str, Any]] | None = None,
) -> list[SlideResult | None]:
    """:func:`decided_row` for each slide, in order, each with its own manifest settings
    (``settings``, from :func:`wsipipe.run.archive.archive_settings`) on top of ``cfg``."""
    from wsipipe.run.archive import slide_config

    settings = settings or {}
    return [decided_row(slide, out_root, slide_config(cfg, settings.get(slide)), info) for slide in slides]
