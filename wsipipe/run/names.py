"""Where a slide's outputs go and which weights a run uses (shared by every runner and the archive)."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wsipipe.config import PipelineConfig
from wsipipe.errors import ConfigError, ModelCardConflict

log = logging.getLogger(__name__)


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
    from wsipipe.models.carded import card_of

    if cfg.stitch.threshold is not None:
        return cfg
    found = card_of(weights)
    threshold = found[0].threshold if found else None
    if threshold is None:
        return cfg
    return cfg.model_copy(update={"stitch": cfg.stitch.model_copy(update={"threshold": threshold})})


def with_card_resolution(cfg: PipelineConfig, weights: Path, force: bool = False) -> PipelineConfig:
    """``cfg`` with ``tile.mpp`` and ``tile.patch_size`` from the model card beside ``weights``
    where the configuration leaves them unset (a YAML file, ``--set`` or ``--mpp`` sets them), so
    the slide is cut as the model was trained. A set value that disagrees with the card (mpp
    beyond ``tile.mpp_tolerance``, any other patch size) is a :class:`ModelCardConflict` naming
    both values and the card, before any work; ``force`` runs with it, logged (the infer stage
    records the departure and the summary flags it for review)."""
    from wsipipe.models.card import validation_message
    from wsipipe.models.carded import card_of
    from wsipipe.models.expected import departure_words, departures

    found_card = card_of(weights)
    if found_card is None:
        return cfg
    card, where = found_card
    tile = cfg.tile
    given = {name: getattr(tile, name) for name in tile.model_fields_set}
    from_card = {name: value for name, value in (("mpp", card.mpp), ("patch_size", card.patch_size))
                 if value is not None and name not in given}
    if from_card:
        try:  # validated: a card's mpp may lie outside what the tiler takes
            tile = type(tile).model_validate({**given, **from_card})
        except ValidationError as exc:
            raise ConfigError(where, f"the model card's resolution cannot be tiled: {validation_message(exc)}") from None
        cfg = cfg.model_copy(update={"tile": tile})
    found = departures(card, tile.mpp, tile.patch_size, tile.mpp_tolerance)
    if found and not force:
        raise ModelCardConflict(
            where, f"{departure_words(found)}; leave {' and '.join(d.setting for d in found)} unset to run as the model "
            "was trained, or pass --force to run as set (the slide is flagged for review)",
        )
    if found:
        log.warning("%s: %s; running as set (--force), the slide is flagged for review", where, departure_words(found))
    return cfg


def run_model(model: str | Path | None, cfg: PipelineConfig, force: bool = False) -> tuple[Path, PipelineConfig]:
    """The weights a run uses (:func:`weights_path`) and ``cfg`` with their card's threshold
    (:func:`with_card_threshold`), resolution and patch size (:func:`with_card_resolution`;
    ``force``: run at set values that disagree with the card)."""
    weights = weights_path(model, cfg)
    return weights, with_card_resolution(with_card_threshold(cfg, weights), weights, force)


def check_store_card(store_path: str | Path, info: Any, force: bool = False) -> None:
    """``wsipipe infer``'s rule: a store tiled at another resolution or patch size than the model's
    card says (``info``: its :class:`~wsipipe.models.identity.ModelInfo`) is a
    :class:`ModelCardConflict` naming both values and the card, unless ``force`` (then the infer
    stage records the departure and the summary flags it). A store that cannot be opened is left
    to the infer stage, which says why."""
    from wsipipe.errors import StoreError
    from wsipipe.models.card import CARD_FILE
    from wsipipe.models.carded import model_card
    from wsipipe.models.expected import departure_words
    from wsipipe.models.identity import store_departures
    from wsipipe.tiles import store

    card = model_card(info)
    if card is None or force:
        return
    try:
        found = store_departures(store.open_store(store_path), card)
    except StoreError:
        return
    if found:
        beside = Path(info.path).parent / CARD_FILE if info.path else None
        where = beside if beside is not None and beside.is_file() else info.path
        raise ModelCardConflict(
            where, f"{departure_words(found, f'the patches of {store_path} are')}; tile the slide again at the card's "
            "(leave tile.mpp and tile.patch_size unset with --model), or pass --force to classify them anyway "
            "(flagged for review)",
        )


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
