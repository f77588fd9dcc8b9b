"""WSInfer model folders: ``config.json`` (WSInfer's model config, spec_version 1.0) beside
``torchscript_model.pt`` and/or ``model.safetensors``, as the WSInfer model zoo publishes them.

This module reads and checks the config and turns it into a :class:`ModelCard`; it needs no
torch (the weights are loaded by :func:`wsipipe.models.model.load_model`, which calls
:func:`read_config` first, so a bad config fails before any weights are read or anything is
written). The config is checked field by field against the published schema
(``wsinfer_zoo/schemas/model-config.schema.json``) plus what running the model needs: a
positive resolution, one class name per output, and transforms we can reproduce.

    spec = read_config(Path("breast-tumor-resnet34.tcga-brca/config.json"))
    card = wsinfer_card(spec, "timm:resnet34", sha256, "breast-tumor-resnet34.tcga-brca")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wsipipe.errors import ModelLoadError
from wsipipe.models.card import ModelCard, Normalisation, card_from_dict, validation_message

SPEC = "WSInfer model config 1.0"


class Transform(BaseModel):
    """One step of WSInfer's torchvision transform list; no keys beside name and arguments."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["Resize", "ToTensor", "Normalize"]
    arguments: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _arguments(self) -> Transform:
        args = self.arguments
        allowed = {"Resize": {"size"}, "ToTensor": set(), "Normalize": {"mean", "std"}}[self.name]
        extra = sorted(set(args) - allowed)
        if extra:
            raise ValueError(f"{self.name} takes {sorted(allowed) or 'no arguments'}, got {extra}")
        if self.name == "Resize":
            size = args.get("size")
            if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
                size = size[0]  # [n, n] is the square Resize(n) gives a square patch
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"Resize size must be a positive integer, got {args.get('size')!r}")
        if self.name == "Normalize":
            for key in ("mean", "std"):
                v = args.get(key)
                if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
                    raise ValueError(f"Normalize {key} must be 3 numbers, got {v!r}")
            if any(x <= 0 for x in args["std"]):
                raise ValueError(f"Normalize std must be positive, got {args['std']}")
        return self


class WSInferConfig(BaseModel):
    """WSInfer's model config, spec_version 1.0. Other top-level keys are kept (the schema allows them)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    spec_version: Literal["1.0"]
    architecture: str = Field(..., min_length=1, description="timm name of the architecture (used for model.safetensors).")
    num_classes: int = Field(..., ge=1, strict=True)
    patch_size_pixels: int = Field(..., ge=1, strict=True)
    spacing_um_px: float = Field(..., gt=0.0, strict=True, description="µm/px the model was trained at (> 0: the schema allows 0, a run cannot).")
    class_names: list[str] = Field(..., strict=True)
    transform: list[Transform]

    @model_validator(mode="after")
    def _consistent(self) -> WSInferConfig:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names {self.class_names} repeat a name")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names {self.class_names} for num_classes {self.num_classes}")
        names = [t.name for t in self.transform]
        if "ToTensor" not in names:
            raise ValueError("transform has no ToTensor (the model takes a tensor, WSInfer builds it there)")
        if any(n == "Resize" for n in names[names.index("ToTensor"):]) or "Normalize" in names[: names.index("ToTensor")]:
            raise ValueError(f"transform order {names}: Resize comes before ToTensor, Normalize after")
        return self

    @property
    def normalisation(self) -> Normalisation:
        """The input the model expects: WSInfer's ToTensor scales to [0, 1]; without Normalize
        that is the input as it is (mean 0, std 1), not ImageNet's statistics."""
        mean: list[float] = [0.0, 0.0, 0.0]
        std: list[float] = [1.0, 1.0, 1.0]
        resize = None
        for t in self.transform:
            if t.name == "Resize":
                size = t.arguments["size"]
                resize = int(size[0] if isinstance(size, list) else size)
            elif t.name == "Normalize":
                mean, std = [float(x) for x in t.arguments["mean"]], [float(x) for x in t.arguments["std"]]
        return Normalisation.model_validate({"mean": mean, "std": std, "resize": resize})


def read_config(path: Path) -> WSInferConfig:
    """The checked config in ``path``; :class:`ModelLoadError` naming the file and the first bad field."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the WSInfer model config: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc} ({SPEC})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, f"a WSInfer model config is a JSON object, got {type(data).__name__} ({SPEC})")
    try:
        spec = WSInferConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(path, f"{_problem(exc, data)} ({SPEC})") from None
    try:
        spec.normalisation  # noqa: B018  (a Resize or Normalize the card cannot hold fails here, named)
    except ValidationError as exc:
        raise ModelLoadError(path, f"field 'transform': {validation_message(exc)} ({SPEC})") from None
    return spec


def wsinfer_card(spec: WSInferConfig, arch: str, sha256: str, name: str, where: Path) -> ModelCard:
    """The model card of a WSInfer folder: its classes, resolution, patch size and transform."""
    extra = spec.model_extra or {}
    described = extra.get("training_data") or extra.get("description")
    return card_from_dict({
        "source": "wsinfer", "arch": arch, "num_classes": spec.num_classes, "classes": list(spec.class_names),
        "mpp": spec.spacing_um_px, "patch_size": spec.patch_size_pixels,
        "normalisation": spec.normalisation.model_dump(mode="json"), "weights_sha256": sha256,
        "training_data": str(described) if described else
        f"WSInfer model folder {name}; see the model's own documentation for its training data",
    }, where)


def _problem(exc: ValidationError, data: dict[str, Any]) -> str:
    """The first problem in one line, naming the field as config.json spells it."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = ".".join(loc)
    kind = err.get("type", "")
    if kind == "missing":
        return f"missing field '{field}'"
    if field == "spec_version" and kind == "literal_error":
        return f"spec_version {data.get('spec_version')!r} is not supported (only '1.0')"
    if kind == "extra_forbidden":
        return f"unknown key '{loc[-1]}' in '{'.'.join(loc[:-1])}' (a transform has only name and arguments)"
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"field '{field}': {msg}" if field else msg


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
