"""Where a slide's outputs go and which weights a run uses (shared by every runner and the archive)."""

from __future__ import annotations

import re
from pathlib import Path

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
