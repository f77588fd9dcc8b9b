"""The card a model runs by, whichever loader made its info.

Inference, the done-check (``wsipipe.run.archive.done_outputs``) and ``--dry-run`` all read what
a model expects from ``info.card``; an info made from a bare weights file (``load_model``,
``weights_identity``) gets the ``card.json`` beside the weights here, when that card names these
very weights. No torch: the done-check stays cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsipipe.models.card import ModelCard
    from wsipipe.models.identity import ModelInfo


def model_card(info: ModelInfo) -> ModelCard | None:
    """The card a model runs by: the one its loader attached, else the ``card.json`` beside its
    weights that names these very weights (their sha256); None for a bare weights file."""
    if info.card is not None:
        return info.card
    if info.path is None:
        return None
    if Path(info.path).is_dir():
        found = card_of(info.path)
        return found[0] if found else None
    from wsipipe.models.card import card_beside

    return card_beside(info.path, info.sha256)


def card_of(model: str | Path) -> tuple[ModelCard, Path] | None:
    """(card, the file it was read from) of the model at ``model`` without loading it: the
    ``card.json`` beside a weights file or in a model folder when it names these very weights, or
    the card a WSInfer folder's ``config.json`` makes; None for a bare weights file. A malformed
    WSInfer config raises :class:`~wsipipe.errors.ModelLoadError` naming the field."""
    from wsipipe.models.card import CARD_FILE, card_beside
    from wsipipe.models.identity import folder_model, weights_identity

    path = Path(model)
    if not path.is_dir():
        card = card_beside(path) if path.is_file() else None
        return (card, path.parent / CARD_FILE) if card else None
    found = folder_model(path)
    if found is None:
        return None
    kind, weights, config = found
    if kind == "card" or config is None:
        return card_of(weights)
    from wsipipe.models.wsinfer import read_config, wsinfer_card

    spec = read_config(config)
    info = weights_identity(path)
    if info is None:
        return None  # loading the folder names what is wrong with it
    return wsinfer_card(spec, info.arch, info.sha256, path.resolve().name, config), config


def with_model_card(info: ModelInfo | None) -> ModelInfo | None:
    """``info`` with :func:`model_card` attached. Inference and the done-check both take the card
    from ``info.card`` (its normalisation, stain and class names are in the infer identity), so
    every place that makes an info from a weights file attaches it here, whichever loader made it."""
    if info is None or info.card is not None:
        return info
    card = model_card(info)
    return info if card is None else dataclasses.replace(info, card=card)
