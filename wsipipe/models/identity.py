"""What a model is, without loading it: no torch here, so deciding whether a slide's outputs
are up to date (wsipipe.run.archive.done_outputs) costs a file hash, not a torch import.

:class:`ModelInfo` is the provenance every output of inference records;
:func:`weights_identity` gives the one :func:`wsipipe.models.model.load_model` would give
for the same file or folder and settings, read from the bytes, the safetensors header, the
``card.json`` beside and a WSInfer folder's ``config.json``. :func:`file_kind` and
:func:`folder_model` are where the loader and this module agree on what a path holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsipipe.models.expected import OVERRIDE_KEY, departures, overridden

if TYPE_CHECKING:
    from wsipipe.models.card import ModelCard

CARD_FILE = "card.json"  # as wsipipe.models.card.CARD_FILE (not imported: card imports this module)
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
    None when that needs torch (a torch state dict, TorchScript file or export program whose
    ``num_classes`` neither the caller nor the card beside gives, or a file that is missing or
    unreadable: loading it reports why).

    It does not check that the weights fit the architecture: a store only counts as done when
    its marker carries this same sha256, i.e. these very bytes were loaded before."""
    path = Path(path)
    if path.is_dir():
        return _folder_identity(path, arch, num_classes)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    sha = hashlib.sha256(data).hexdigest()
    kind = file_kind(data)
    card = _card_beside(path, sha)
    if kind in PROGRAM_KINDS:  # the file is the architecture: arch names the format
        num_classes = num_classes or _int(card.get("num_classes"))
        return None if num_classes is None else ModelInfo(kind, num_classes, sha, path)
    meta = _safetensors_metadata(data) if kind == "safetensors" else {}
    arch = arch or card.get("arch") or meta.get("arch") or DEFAULT_ARCH
    num_classes = num_classes or _int(card.get("num_classes")) or _int(meta.get("num_classes"))
    if num_classes is None:
        return None  # the size of the classification layer: known once the model is built
    return ModelInfo(arch, num_classes, sha, path)


PROGRAM_KINDS = ("torchscript", "export")
WSINFER_CONFIG = "config.json"
WSINFER_MODELS = ("torchscript_model.pt", "model.safetensors")  # WSInfer loads the TorchScript one when both are there
# A folder with a card: ``wsipipe train`` output and registry versions (model.safetensors), or an
# exported program with its card (``wsipipe models export``).
CARD_FOLDER_MODELS = ("model.safetensors", "model.pt2", "model.pt", "model.pth", "torchscript_model.pt")


def file_kind(data: bytes) -> str | None:
    """What a model file holds, read from its content (never its suffix): 'safetensors',
    'torchscript' (``torch.jit.save``), 'export' (``torch.export.save``), 'state' (a torch
    state dict, zip or legacy pickle) or None (none of these)."""
    if _is_safetensors(data):
        return "safetensors"
    if data[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except (zipfile.BadZipFile, ValueError):
            return None
        # torch.export archives carry an ``archive_format`` record; TorchScript archives the
        # compiled code and its constants; a torch.save zip only data.pkl and tensors.
        if any(n.rsplit("/", 1)[-1] == "archive_format" for n in names):
            return "export"
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        return "state"
    return "state" if data[:1] == b"\x80" else None


def folder_model(folder: Path) -> tuple[str, Path, Path | None] | None:
    """What a model folder is: ('wsinfer', model file, config.json) for a WSInfer model folder,
    ('card', weights file, None) for weights with a card.json, None for neither."""
    config = folder / WSINFER_CONFIG
    if config.is_file():
        model = next((folder / n for n in WSINFER_MODELS if (folder / n).is_file()), None)
        return None if model is None else ("wsinfer", model, config)
    if (folder / CARD_FILE).is_file():
        weights = next((folder / n for n in CARD_FOLDER_MODELS if (folder / n).is_file()), None)
        weights = weights or _described_file(folder)
        return None if weights is None else ("card", weights, None)
    return None


def _described_file(folder: Path) -> Path | None:
    """The file in ``folder`` whose sha256 the card names (weights under another name, such as
    an export written as ``tumor.pt2``); hashes the folder's files only when no usual name is there."""
    try:
        sha = json.loads((folder / CARD_FILE).read_text()).get("weights_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(sha, str):
        return None
    for path in sorted(folder.iterdir()):
        if path.name != CARD_FILE and not path.name.startswith(".") and path.is_file():
            try:
                if file_sha256(path) == sha:
                    return path
            except OSError:
                continue
    return None


def folder_sha256(config: Path, model: Path) -> str:
    """Identity of a WSInfer model folder: its config (classes, resolution, transform) and its
    weights both decide what the probabilities are, so both are hashed, config first."""
    h = hashlib.sha256(config.read_bytes())
    with model.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _folder_identity(folder: Path, arch: str | None, num_classes: int | None) -> ModelInfo | None:
    found = folder_model(folder)
    if found is None:
        return None
    kind, model, config = found
    if kind == "card":
        return weights_identity(model, arch, num_classes)
    assert config is not None
    try:
        spec = json.loads(config.read_text())
        data = model.read_bytes()
        sha = folder_sha256(config, model)
    except (OSError, ValueError):
        return None
    n, name = spec.get("num_classes") if isinstance(spec, dict) else None, spec.get("architecture") if isinstance(spec, dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or (num_classes is not None and num_classes != n):
        return None  # loading names the problem
    what = file_kind(data)
    if what in PROGRAM_KINDS:
        return ModelInfo(str(what), n, sha, folder)
    if what != "safetensors" or not isinstance(name, str) or not name:
        return None
    return ModelInfo(f"timm:{name}", n, sha, folder)


def _card_beside(weights: Path, sha: str) -> dict[str, Any]:
    """The card.json beside ``weights`` as a dict when it describes these bytes, else {} (the
    loader validates it; here only arch and num_classes are read)."""
    try:
        data = json.loads((weights.parent / CARD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("weights_sha256") == sha else {}


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _is_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


def _safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors header; {} for anything else."""
    if not _is_safetensors(data):
        return {}
    size = int.from_bytes(data[:8], "little")
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
    if card is not None and card.domain:
        # The per-patch out-of-domain distances are measured against the card's training domain.
        identity["domain_sha256"] = hashlib.sha256(json.dumps(card.domain, sort_keys=True).encode()).hexdigest()[:16]
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
