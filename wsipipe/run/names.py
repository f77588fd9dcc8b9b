"""Where a slide's outputs go and which weights a run uses (shared by every runner and the archive)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from wsipipe.config import PipelineConfig
from wsipipe.errors import ConfigError


def slide_output_name(slide_path: Path, identity: str) -> str:
    """Folder name for a slide's outputs: its sanitised stem plus identity prefix.

    Only [A-Za-z0-9._-] survive, so a slide name can never escape the output folder."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_path.stem).strip("._-") or "slide"  # no hidden/option-like names
    return f"{stem[:80]}-{identity[:8]}"


def weights_path(model: str | Path | None, cfg: PipelineConfig) -> Path:
    """The weights a run uses: the explicit file, else ``model.weights``, else the model
    registry's production version (``train.registry``, see ``wsipipe models promote``)."""
    weights = model or cfg.model.weights
    if not weights:
        from wsipipe.learn.registry import production_weights

        weights = production_weights(cfg.train.registry)
    if not weights:
        raise ConfigError(
            None, "model.weights: no model weights given (pass --model WEIGHTS, set model.weights, "
            f"or promote a model in the registry {cfg.train.registry})",
        )
    return Path(weights)


def with_card_threshold(cfg: PipelineConfig, weights: Path) -> PipelineConfig:
    """``cfg`` with ``stitch.threshold`` from the model card next to ``weights`` when the
    configuration leaves it unset (a value set in YAML, an override or ``--threshold`` wins).
    The threshold then is part of the stitch stage's identity: a new card threshold restitches."""
    from wsipipe.learn.registry import card_threshold

    if cfg.stitch.threshold is not None:
        return cfg
    threshold = card_threshold(weights)
    if threshold is None:
        return cfg
    return cfg.model_copy(update={"stitch": cfg.stitch.model_copy(update={"threshold": threshold})})


def run_model(model: str | Path | None, cfg: PipelineConfig) -> tuple[Path, PipelineConfig]:
    """The weights a run uses (:func:`weights_path`) and ``cfg`` with their card's threshold
    (:func:`with_card_threshold`)."""
    weights = weights_path(model, cfg)
    return weights, with_card_threshold(cfg, weights)


class ResolutionConflict(ConfigError):
    """A slide's output folder (or store) holds a result made with another level-0 resolution."""


# How a slide's mpp_source reads in a message.
_SOURCE_WORDS = {"override": "override", "openslide": "file", "tiff-resolution": "file", "objective-power": "file's objective power"}


def _mpp_words(mpp: float, source: str | None) -> str:
    return f"mpp {mpp:g} ({_SOURCE_WORDS.get(source or '', source or 'unknown source')})"


def check_resolution(store_path: Path, slide: Any, tile_mpp: float, where: Path | None = None) -> None:
    """Raise :class:`ResolutionConflict` (naming both resolutions) when the store at ``store_path``
    holds a result made from a level-0 mpp other than ``slide``'s (an open
    :class:`~wsipipe.slides.slide.Slide`, opened with this run's mpp settings).

    The folder name is the slide's identity, which a resolution setting does not change, so a
    rerun with another ``mpp_override`` would otherwise replace that result without a word. A
    change of model, threshold or tile settings is an ordinary rerun and passes. ``where``: the
    path the message names (default the store)."""
    from wsipipe.errors import StoreError
    from wsipipe.tiles import store

    try:
        group = store.open_store(store_path)
    except StoreError:
        return  # nothing there yet (or not a store: the stage that writes it says so)
    meta = store.meta(group)
    held = meta.get("slide") or {}
    old = held.get("mpp")
    if not isinstance(old, int | float) or math.isclose(float(old), slide.mpp, rel_tol=1e-6):
        return
    made_at = (meta.get("tile") or {}).get("mpp")
    at = f" at tile.mpp {made_at:.4g}" if isinstance(made_at, int | float) else ""
    raise ResolutionConflict(
        where or store_path,
        f"holds a result made with {_mpp_words(float(old), held.get('mpp_source'))}{at}; this run asks "
        f"{_mpp_words(slide.mpp, slide.mpp_source)} at tile.mpp {tile_mpp:g}; rerun with --force to replace it, "
        "or choose another --out",
    )
