"""The model card: what a patch classifier is, whatever file it came from.

One card describes every model source (torchvision or timm weights, TorchScript, a
``torch.export`` program, a WSInfer model folder): the architecture, the class names of the
output columns and which one is the positive (tumor) class, the resolution and patch size
the model expects, the input normalisation, the stain normalisation fitted in training,
where the training data came from, the decision threshold, and the compact description of
the training patches in feature space that the out-of-domain check compares slides against.

It is JSON on disk (``card.json`` beside the weights, as ``wsipipe train`` and the model
registry lay it out) and needs no torch to read, so deciding what is done stays cheap.

    card = read_card("models/v0003/card.json")
    card = card_beside("models/v0003/model.safetensors")   # None when absent or for other weights
    card.positive_index, card.columns, card.normalisation.mean
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wsipipe.errors import ModelLoadError

CARD_FILE = "card.json"
CARD_FORMAT = "wsipipe-model-card-1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Source = Literal["torchvision", "timm", "torchscript", "export", "wsinfer"]


class Normalisation(BaseModel):
    """What the model's input is: ``(resize(rgb) / 255 - mean) / std``, per channel."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = Field(None, ge=8, le=8192, description="Square input edge the patch is resized to; None = as tiled.")

    @model_validator(mode="after")
    def _positive_std(self) -> Normalisation:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {list(self.std)}")
        return self


class ModelCard(BaseModel):
    """A model card. Unknown keys are kept (training history, metrics, splits) and written back."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format: str = CARD_FORMAT
    source: Source = "torchvision"
    arch: str = Field(..., min_length=1, description="Architecture: a torchvision name, 'timm:<name>', 'torchscript' or 'export'.")
    num_classes: int = Field(..., ge=1, le=100000, description="Output columns: 1 = one logit (sigmoid), k > 1 = softmax.")
    classes: list[str] = Field(default_factory=list, description="Class names; a one-logit model names (negative, positive).")
    positive_class: str | None = Field(None, description="The tumor class; default: a class whose name contains 'tumor', else the last.")
    mpp: float | None = Field(None, gt=0.0, le=1000.0, description="Resolution the model was trained at, µm/px.")
    patch_size: int | None = Field(None, ge=8, le=8192, description="Patch edge the model was trained on, pixels at mpp.")
    normalisation: Normalisation = Field(default_factory=Normalisation)
    stain_normalisation: dict[str, Any] | None = Field(None, description="Stain normaliser fitted in training (models.stain), applied at inference.")
    training_data: str | None = Field(None, description="Where the training patches came from, in words.")
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    weights_sha256: str | None = None
    domain: dict[str, Any] | None = Field(None, description="Training patches in feature space (models.domain), for the out-of-domain flag.")

    @model_validator(mode="before")
    @classmethod
    def _source_from_arch(cls, data: Any) -> Any:
        # Cards written before the field existed (``wsipipe train``) name only the arch; a
        # timm:<name> arch is a timm model, not a torchvision one.
        if isinstance(data, dict) and "source" not in data and isinstance(data.get("arch"), str):
            return {**data, "source": source_of(data["arch"])}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if self.classes:
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes {self.classes} repeat a name")
            if self.num_classes > 1 and len(self.classes) != self.num_classes:
                raise ValueError(f"{len(self.classes)} class names {self.classes} for {self.num_classes} output columns")
            if self.num_classes == 1 and len(self.classes) != 2:
                raise ValueError(f"a one-logit model names two classes (negative, positive), got {self.classes}")
        if self.positive_class is not None and self.classes and self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of {self.classes}")
        return self

    @property
    def columns(self) -> list[str]:
        """Names of the probability columns inference writes: one per output (the positive class
        alone for a one-logit model); ``class_<i>`` where the card names none."""
        if self.num_classes == 1:
            return [self.positive or "tumor"]
        return list(self.classes) if self.classes else [f"class_{i}" for i in range(self.num_classes)]

    @property
    def positive(self) -> str | None:
        """The positive (tumor) class name: ``positive_class``, else a class matching 'tumor', else the last."""
        if self.positive_class:
            return self.positive_class
        if not self.classes:
            return None
        return tumor_like(self.classes) or self.classes[-1]

    @property
    def positive_index(self) -> int:
        """Column of the positive class in the probabilities (0 for a one-logit model)."""
        if self.num_classes == 1:
            return 0
        name = self.positive
        return self.columns.index(name) if name in self.columns else self.num_classes - 1

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2)


def source_of(arch: str) -> Source:
    """The source an arch name implies: 'timm:<name>' is timm, 'torchscript' and 'export' are
    themselves, anything else a torchvision name. (A WSInfer folder says so in its own card.)"""
    if arch.startswith("timm:"):
        return "timm"
    if arch in ("torchscript", "export"):
        return arch  # type: ignore[return-value]
    return "torchvision"


def tumor_like(names: list[str]) -> str | None:
    """The first name that reads as a tumor class ('tumor', 'Tumour', 'tumor_epithelium'), not 'non-tumor'."""
    for name in names:
        low = name.lower()
        if re.search(r"tumou?r", low) and not re.search(r"(^|[^a-z])(non|no|not)[-_ ]?tumou?r", low):
            return name
    return None


def card_from_dict(data: Any, where: str | Path | None) -> ModelCard:
    """Validate ``data`` as a card; a :class:`ModelLoadError` naming ``where`` and the first bad field."""
    if not isinstance(data, dict):
        raise ModelLoadError(where, f"a model card is a JSON object, got {type(data).__name__}")
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(where, f"model card: {validation_message(exc)}") from None


def validation_message(exc: ValidationError) -> str:
    """The first problem of a pydantic error in one line: ``field.path: message``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def read_card(path: str | Path) -> ModelCard:
    """The card in the JSON file ``path``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the model card: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ModelLoadError(path, f"model card is not valid JSON: {exc}") from None
    return card_from_dict(data, path)


def card_beside(weights: str | Path, sha256: str | None = None) -> ModelCard | None:
    """The ``card.json`` in the folder of ``weights``, when it describes these very weights
    (its ``weights_sha256`` equals ``sha256``, or the file's own hash when not given); else None.
    A card that is present, for these weights, but malformed raises :class:`ModelLoadError`."""
    from wsipipe.models.identity import file_sha256

    path = Path(weights).parent / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("weights_sha256"):
        return None
    try:
        own = sha256 or file_sha256(weights)
    except OSError:
        return None
    if data.get("weights_sha256") != own:
        return None
    return card_from_dict(data, path)
