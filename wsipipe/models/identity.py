"""What a model is, without loading it: no torch here, so deciding whether a slide's outputs
are up to date (wsipipe.run.archive.done_outputs) costs a file hash, not a torch import.

:class:`ModelInfo` is the provenance every output of inference records;
:func:`weights_identity` gives the one :func:`wsipipe.models.model.load_model` would give
for the same file and settings, read from the file's bytes and its safetensors header.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsipipe.models.expected import OVERRIDE_KEY, departures, overridden

if TYPE_CHECKING:
    from wsipipe.models.card import ModelCard

DEFAULT_ARCH = "resnet18"  # load_model's architecture when neither the caller nor the file names one


@dataclass(frozen=True)
class ModelInfo:
    """What a model is: the provenance every output of inference records."""

    arch: str
    num_classes: int
    sha256: str  # of the weights file: the model's identity in every output
    path: Path | None
    # What the model expects and says (classes, mpp, normalisation, stain, domain); None = a bare
    # weights file read with the defaults (ImageNet normalisation, no stain normalisation).
    card: ModelCard | None = field(default=None, compare=False, repr=False)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_identity(path: str | Path, arch: str | None = None, num_classes: int | None = None) -> ModelInfo | None:
    """The :class:`ModelInfo` that loading ``path`` with ``arch``/``num_classes`` would give, or
    None when that needs torch (a torch state dict without ``num_classes``, or a file that is
    missing or unreadable: loading it reports why).

    It does not check that the weights fit the architecture: a store only counts as done when
    its marker carries this same sha256, i.e. these very bytes were loaded before."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    meta = _safetensors_metadata(data)
    arch = arch or meta.get("arch") or DEFAULT_ARCH
    if num_classes is None:
        try:
            num_classes = int(meta["num_classes"])
        except (KeyError, ValueError):
            return None  # the size of the classification layer: known once the model is built
    return ModelInfo(arch, num_classes, hashlib.sha256(data).hexdigest(), path)


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors header; {} for anything else."""
    if len(data) < 10 or data[8:9] != b"{":
        return {}
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return {}
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def input_identity(card: ModelCard | None) -> dict[str, Any] | None:
    """What the model's input is made of, as the card says: normalisation, resize and stain
    normaliser; None for the default input (ImageNet normalisation of the patches as tiled), so
    stores classified before cards existed keep their identity."""
    if card is None:
        return None
    norm = card.normalisation
    default = type(norm)()
    if norm == default and card.stain_normalisation is None:
        return None
    return {"mean": list(norm.mean), "std": list(norm.std), "resize": norm.resize, "stain": card.stain_normalisation}


def infer_identity(group, info: ModelInfo) -> dict[str, Any]:
    """What a store's probabilities depend on: its tiled patches, the model, the input its card
    (``info.card``; see :func:`wsipipe.models.carded.with_model_card`) makes of the patches
    (normalisation, resize, stain) and the class names it gives the columns."""
    from wsipipe.tiles import store

    tile = store.stage_entry(group, store.STAGE_TILE) or {}
    identity: dict[str, Any] = {
        "tile": tile.get("identity"), "model_sha256": info.sha256, "num_classes": info.num_classes, "arch": info.arch,
    }
    card = info.card
    spec = input_identity(card)
    if spec is not None:
        identity["input"] = spec
    if card is not None and card.classes:
        identity["classes"] = card.columns
        identity["positive_class"] = card.positive
    departed = store_departures(group, card)
    if departed:  # patches cut at another resolution or size than the card's: a forced run, flagged
        identity[OVERRIDE_KEY] = departed
    return identity


def store_departures(group, card: ModelCard | None) -> dict[str, Any]:
    """Where the store's tiled patches depart from the card's resolution and patch size
    (:func:`wsipipe.models.expected.departures`, tolerance as tiled); {} where they do not."""
    from wsipipe.tiles import store

    tile = store.meta(group).get(store.META_TILE) or {}
    found = departures(card, tile.get("mpp"), tile.get("patch_size"), float(tile.get("mpp_tolerance") or 0.05))
    return overridden(found)
