"""What a model expects, as its card says: the card a model runs by, and where a run's patches
depart from the resolution and patch size it was trained on.

A model sees tissue at one resolution and patch size; patches at another are a different
input (cells twice the size, half the context) and its probabilities mean something else.
The card records ``mpp`` and ``patch_size``; the run takes them when the user sets none, and a
setting that disagrees is refused unless forced (then flagged for review). No torch here: the
check runs before any work, in ``wsipipe run --dry-run`` too.

    departures(card, mpp=0.5, patch_size=64, mpp_tolerance=0.05)
    # [Departure("tile.mpp", 0.5, 1.0)]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsipipe.models.card import ModelCard
    from wsipipe.models.identity import ModelInfo

OVERRIDE_KEY = "model_card_overridden"  # in the infer stage's entry and as the summary's QC flag code


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


@dataclass(frozen=True)
class Departure:
    """One setting that is not what the card says: its dotted name, the value used, the card's."""

    setting: str  # "tile.mpp" or "tile.patch_size"
    used: float
    card: float

    def as_dict(self) -> dict[str, Any]:
        return {"used": self.used, "card": self.card}


def departures(card: ModelCard | None, mpp: float | None, patch_size: int | None, mpp_tolerance: float) -> list[Departure]:
    """The settings among ``mpp`` (µm/px) and ``patch_size`` (px) that depart from ``card``: mpp
    beyond ``mpp_tolerance`` (relative, the tiler's own rule for 'same resolution'), any other
    patch size. A card (or a value) that says nothing departs from nothing."""
    out: list[Departure] = []
    if card is None:
        return out
    if card.mpp is not None and mpp is not None and abs(float(mpp) / card.mpp - 1.0) > mpp_tolerance + 1e-9:
        out.append(Departure("tile.mpp", float(mpp), float(card.mpp)))
    if card.patch_size is not None and patch_size is not None and int(patch_size) != card.patch_size:
        out.append(Departure("tile.patch_size", int(patch_size), int(card.patch_size)))
    return out


def departure_words(found: list[Departure], used_by: str = "this run sets") -> str:
    """``the model card says tile.mpp 1 (this run sets 0.5) and ...``: both values of each."""
    parts = [f"{d.setting} {d.card:g} ({used_by} {d.used:g})" for d in found]
    return "the model card says " + " and ".join(parts)


def overridden(found: list[Departure]) -> dict[str, dict[str, Any]]:
    """What the infer stage records (and the summary's QC flag shows): setting -> used and card values."""
    return {d.setting: d.as_dict() for d in found}
