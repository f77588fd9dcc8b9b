"""Where a run's patches depart from the resolution and patch size the model card says the
model was trained on.

A model sees tissue at one resolution and patch size; patches at another are a different
input (cells twice the size, half the context) and its probabilities mean something else.
The card records ``mpp`` and ``patch_size``; the run takes them when the user sets none, and a
setting that disagrees is refused unless forced (then flagged for review). No torch here: the
check runs before any work, in ``wsipipe run --dry-run`` too.

    departures(card, mpp=0.5, patch_size=64, mpp_tolerance=0.05)
    # [Departure("tile.mpp", 0.5, 1.0)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsipipe.models.card import ModelCard

OVERRIDE_KEY = "model_card_overridden"  # in the infer stage's entry and as the summary's QC flag code


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


def departure_words(found: list[Departure] | dict[str, dict[str, Any]], used_by: str = "this run sets") -> str:
    """``the model card says tile.mpp 1 (this run sets 0.5) and ...``: both values of each
    (``found``: departures, or what :func:`overridden` made of them)."""
    if isinstance(found, dict):
        found = [Departure(setting, v["used"], v["card"]) for setting, v in found.items()]
    parts = [f"{d.setting} {d.card:g} ({used_by} {d.used:g})" for d in found]
    return "the model card says " + " and ".join(parts)


def overridden(found: list[Departure]) -> dict[str, dict[str, Any]]:
    """What the infer stage records (and the summary's QC flag shows): setting -> used and card values."""
    return {d.setting: d.as_dict() for d in found}
