"""Patch classifiers: torchvision architectures by name, weights from local files only.

Nothing here downloads: every model is built with ``weights=None`` and filled from a
local file. Loading never unpickles arbitrary code: safetensors holds only tensors, and
``.pt`` files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from wsipipe.errors import ModelLoadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    num_classes: int
    sha256: str
    path: Path | None


@lru_cache(maxsize=1)
def available_architectures() -> tuple[str, ...]:
    """torchvision classification model names (resnet18, efficientnet_b0, vit_b_16, ...)."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str = "resnet18", num_classes: int = 1) -> nn.Module:
    """A randomly initialised torchvision model whose last layer has ``num_classes`` outputs."""
    import torchvision

    if arch not in available_architectures():
        raise ValueError(f"unknown architecture {arch!r}")
    model = torchvision.models.get_model(arch, weights=None)
    _replace_head(model, num_classes)
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    # torchvision families name their final layer differently; each is a Linear.
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        model.classifier = nn.Linear(classifier.in_features, num_classes)
        return
    if isinstance(classifier, nn.Sequential):
        for i in range(len(classifier) - 1, -1, -1):
            if isinstance(classifier[i], nn.Linear):
                classifier[i] = nn.Linear(classifier[i].in_features, num_classes)
                return
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Sequential) and isinstance(getattr(heads, "head", None), nn.Linear):
        heads.head = nn.Linear(heads.head.in_features, num_classes)
        return
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        model.head = nn.Linear(head.in_features, num_classes)
        return
    raise ValueError(f"don't know how to replace the classification layer of {type(model).__name__}")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_weights(
    model: nn.Module, path: str | Path, arch: str, num_classes: int, metadata: dict[str, str] | None = None
) -> ModelInfo:
    """Write a safetensors file (arch and num_classes in its metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"arch": arch, "num_classes": str(num_classes), "format": "wsipipe-classifier-1"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ModelInfo(arch, num_classes, file_sha256(path), path)


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                return {k: fh.get_tensor(k) for k in fh.keys()}, meta
        except Exception as exc:
            raise ModelLoadError(path, f"not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # weights_only refuses any pickle that would build objects other than tensors and
        # plain containers, so a smuggled payload lands here without ever running.
        raise ModelLoadError(
            path,
            "refused to load: not a plain tensor state dict (it holds other pickled objects, or is not a "
            f"torch file: {type(exc).__name__}); use safetensors or a weights-only state dict",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(path, "not a state dict of tensors")
    return obj, {}


def load_model(
    path: str | Path, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, ModelInfo]:
    """Build the architecture and load local weights; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "weights file not found")
    state, meta = _read_state(path)
    arch = arch or meta.get("arch") or "resnet18"
    if num_classes is None:
        num_classes = int(meta["num_classes"]) if "num_classes" in meta else _infer_num_classes(state)
    try:
        model = build_model(arch, num_classes)
    except ValueError as exc:
        raise ModelLoadError(path, str(exc)) from None
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()
        raise ModelLoadError(path, f"weights do not fit {arch} with {num_classes} output(s): {detail[1:3] or detail}") from None
    model.eval()
    return model, ModelInfo(arch, num_classes, file_sha256(path), path)


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int:
    # The last 2-D weight in a classifier's state dict is its output layer.
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(weights[-1].shape[0]) if weights else 1
