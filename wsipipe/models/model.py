"""Patch classifiers: torchvision architectures by name, weights from local files only.

Nothing here downloads: every model is built with ``weights=None`` and filled from a
local file. Loading never unpickles arbitrary code: safetensors holds only tensors, and
torch files go through ``torch.load(weights_only=True)``, whose unpickler refuses any
global that is not a tensor or a plain container, before it can run.

    model = build_model("resnet18", num_classes=1)
    info = save_weights(model, "tumor.safetensors", "resnet18", 1)
    model, info = load_model("tumor.safetensors")      # arch and classes read from the file
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from wsipipe.errors import ModelLoadError, ParameterError
from wsipipe.files import write_atomic
from wsipipe.models.card import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (callers import them from here)
from wsipipe.models.identity import ModelInfo, file_sha256  # noqa: F401  (file_sha256: callers import it from here)

FORMAT = "wsipipe-classifier-1"  # safetensors metadata "format" of files we write


def available_architectures() -> list[str]:
    """torchvision classification model names (resnet18, efficientnet_b0, vit_b_16, ...)."""
    return list(_architectures())


@lru_cache(maxsize=1)
def _architectures() -> tuple[str, ...]:
    import torchvision  # seconds to import: only when a model is actually wanted

    return tuple(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str = "resnet18", num_classes: int = 1) -> nn.Module:
    """A randomly initialised torchvision model whose last layer has ``num_classes`` outputs."""
    import torchvision

    if arch not in _architectures():
        raise ParameterError(None, f"unknown architecture {arch!r} (torchvision has e.g. resnet18, efficientnet_b0, vit_b_16)")
    if num_classes < 1:
        raise ParameterError(None, f"num_classes must be >= 1, got {num_classes}")
    # Inception-style nets otherwise return (logits, aux_logits) in train mode, with a
    # 1000-class aux head that the patch task never uses (init_weights: no FutureWarning).
    extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, **extra)
    _set_head(model, num_classes)
    return model


def _head(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the final classification layer.

    torchvision families name it differently: ``fc`` (ResNet, RegNet, ShuffleNet,
    GoogLeNet), ``classifier`` or its last Linear (DenseNet, EfficientNet, MobileNet,
    ConvNeXt, VGG, MaxViT), ``heads.head`` (ViT), ``head`` (Swin), and a 1x1 conv in
    ``classifier`` (SqueezeNet)."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model, "fc"
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        return model, "classifier"
    if isinstance(classifier, nn.Sequential):
        for i in range(len(classifier) - 1, -1, -1):
            if isinstance(classifier[i], (nn.Linear, nn.Conv2d)):
                return classifier, str(i)
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Module) and isinstance(getattr(heads, "head", None), nn.Linear):
        return heads, "head"
    if isinstance(getattr(model, "head", None), nn.Linear):
        return model, "head"
    raise ValueError(f"don't know the classification layer of {type(model).__name__}")


def _set_head(model: nn.Module, num_classes: int) -> None:
    parent, name = _head(model)
    old = getattr(parent, name)
    if isinstance(old, nn.Conv2d):  # SqueezeNet: conv -> ReLU -> pool; a ReLU'd logit can't go negative
        setattr(parent, name, nn.Conv2d(old.in_channels, num_classes, kernel_size=1))
        after = int(name) + 1
        if isinstance(parent, nn.Sequential) and after < len(parent) and isinstance(parent[after], nn.ReLU):
            parent[after] = nn.Identity()
        return
    setattr(parent, name, nn.Linear(old.in_features, num_classes))


def _head_key(model: nn.Module) -> str:
    """State-dict key of the classification layer's weight, e.g. ``fc.weight``."""
    parent, name = _head(model)
    layer = getattr(parent, name)
    qualified = next(n for n, m in model.named_modules() if m is layer)
    return f"{qualified}.weight"


def save_weights(
    model: nn.Module, path: str | Path, arch: str, num_classes: int, metadata: dict[str, str] | None = None
) -> ModelInfo:
    """Write a safetensors file with ``arch`` and ``num_classes`` in its metadata.

    Written to a temporary name in the same folder and renamed into place, so a reader
    never sees half a file."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update(arch=arch, num_classes=str(num_classes), format=FORMAT)  # ours win over the caller's
    data = save(state, metadata=meta)
    path = write_atomic(path, data)
    return ModelInfo(arch, num_classes, hashlib.sha256(data).hexdigest(), path)


def load_model(
    path: str | Path, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, ModelInfo]:
    """Build the architecture and fill it from a local weights file; returns it in eval mode.

    ``arch`` / ``num_classes`` default to what a safetensors file records, else resnet18
    and the size of the state dict's classification layer. The format is read from the
    file's content, not its suffix. Every failure is a :class:`ModelLoadError` naming the
    file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "weights file not found")
    data = path.read_bytes()  # hash exactly the bytes that get loaded
    state, meta = _read_state(path, data)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}  # DDP / compile
    recorded = meta.get("arch")
    arch = arch or recorded or "resnet18"
    try:
        model = build_model(arch, 1)
        key = _head_key(model)
        if num_classes is None:
            num_classes = int(meta["num_classes"]) if "num_classes" in meta else _rows(state.get(key), 1)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_classes != 1:
            _set_head(model, num_classes)
    except ValueError as exc:
        raise ModelLoadError(path, str(exc)) from None
    problem = _mismatch(model.state_dict(), state)
    if problem:
        hint = (f" (the file records arch {recorded})" if recorded and recorded != arch
                else " (the file records no arch: give the one it was trained as)" if not recorded else "")
        raise ModelLoadError(path, f"weights do not fit {arch} with {num_classes} output(s){hint}: {problem}")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, ModelInfo(arch, num_classes, hashlib.sha256(data).hexdigest(), path)


def _rows(weight: torch.Tensor | None, default: int) -> int:
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else default


def _read_state(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from a safetensors file or a torch state dict."""
    if _is_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            return load_safetensors(data), dict(header.get("__metadata__") or {})
        except Exception as exc:
            raise ModelLoadError(path, f"not a readable safetensors file: {exc}") from None
    if not (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):  # torch zip archive, or a bare pickle
        raise ModelLoadError(path, "not a weights file (neither safetensors nor a torch state dict)")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError):
            # weights_only refuses any global other than tensors and plain containers
            # *before* calling it, so a smuggled payload lands here without ever running.
            lines = [ln.strip() for ln in str(exc).splitlines() if "unsupported" in ln.lower()]
            refused = lines[0] if lines else type(exc).__name__
            raise ModelLoadError(
                path, f"refused to load: the checkpoint pickles more than tensors ({refused}); "
                "use safetensors or a plain state dict",
            ) from None
        raise ModelLoadError(path, f"not a readable torch file: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict):  # common training-checkpoint wrappers
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(path, "not a state dict of tensors")
    return obj, {}


def _is_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


def _mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """'' when ``given`` fits ``expected`` key for key and shape for shape, else a summary."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: file {tuple(given[k].shape)}, model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {items[0]})")
    return "; ".join(parts)
