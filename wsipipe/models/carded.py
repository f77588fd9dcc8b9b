"""The card a model runs by, whichever loader made its info.

Inference, the done-check (``wsipipe.run.archive.done_outputs``) and ``--dry-run`` all read what
a model expects from ``info.card``; an info made from a bare weights file (``load_model``,
``weights_identity``) gets the ``card.json`` beside the weights here, when that card names these
very weights. No torch: the done-check stays cheap.
"""

from __future__ import annotations

import dataclasses
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
    from wsipipe.models.card import card_beside

    return card_beside(info.path, info.sha256)


def with_model_card(info: ModelInfo | None) -> ModelInfo | None:
    """``info`` with :func:`model_card` attached. Inference and the done-check both take the card
    from ``info.card`` (its normalisation, stain and class names are in the infer identity), so
    every place that makes an info from a weights file attaches it here, whichever loader made it."""
    if info is None or info.card is not None:
        return info
    card = model_card(info)
    return info if card is None else dataclasses.replace(info, card=card)
