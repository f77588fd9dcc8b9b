"""Patch classifiers from local files: torchvision and timm architectures by name, TorchScript
files, ``torch.export`` programs and WSInfer model folders, all through :func:`load_model`.

Nothing here downloads: every architecture is built with ``weights=None`` / ``pretrained=False``
and filled from a local file. Loading never unpickles arbitrary code: safetensors holds only
tensors, torch files go through ``torch.load(weights_only=True)``, whose unpickler refuses any
global that is not a tensor or a plain container before it can run, and TorchScript and export
programs are compiled code and graphs (:mod:`wsipipe.models.sources`).

Every model comes with its :class:`ModelCard` (``info.card``): the ``card.json`` beside the
weights when it describes these very bytes, a WSInfer folder's config, else one made from what
the file says.

    model = build_model("timm:vit_tiny_patch16_224", num_classes=2)
    info = save_weights(model, "tumor.safetensors", "timm:vit_tiny_patch16_224", 2)
    model, info = load_model("tumor.safetensors")      # arch and classes read from the file
    model, info = load_model("breast-tumor-resnet34.tcga-brca/")   # a WSInfer model folder
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsipipe.errors import ModelLoadError, ParameterError, writing_outputs
from wsipipe.files import write_atomic
from wsipipe.models import sources, wsinfer
from wsipipe.models.card import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (callers import them from here)
from wsipipe.models.card import CARD_FILE, ModelCard, card_beside, card_from_dict, source_of
from wsipipe.models.identity import (  # noqa: F401  (file_sha256: callers import it from here)
    DEFAULT_ARCH, PROGRAM_KINDS, ModelInfo, file_kind, file_sha256, folder_model, folder_sha256,
)

FORMAT = "wsipipe-classifier-1"  # safetensors metadata "format" of files we write


def available_architectures() -> list[str]:
    """torchvision classification model names (resnet18, efficientnet_b0, vit_b_16, ...)."""
    return list(_architectures())


@lru_cache(maxsize=1)
def _architectures() -> tuple[str, ...]:
    import torchvision  # seconds to import: only when a model is actually wanted

    return tuple(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str = "resnet18", num_classes: int = 1, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised model whose last layer has ``num_classes`` outputs: a torchvision
    name (resnet18, efficientnet_b0, vit_b_16) or ``timm:<name>`` (``timm:vit_tiny_patch16_224``,
    ``timm:resnet18.a1_in1k``; ``timm_kwargs`` go to ``timm.create_model``, e.g. ``img_size``)."""
    if num_classes < 1:
        raise ParameterError(None, f"num_classes must be >= 1, got {num_classes}")
    if arch.startswith(TIMM):
        return _build_timm(arch.removeprefix(TIMM), num_classes, timm_kwargs)
    import torchvision

    if arch not in _architectures():
        hint = f"; timm has it: give timm:{arch}" if _timm_has(arch) else ""
        raise ParameterError(None, f"unknown architecture {arch!r} (torchvision has e.g. resnet18, efficientnet_b0, vit_b_16; "
                             f"timm models are named timm:<name>){hint}")
    # Inception-style nets otherwise return (logits, aux_logits) in train mode, with a
    # 1000-class aux head that the patch task never uses (init_weights: no FutureWarning).
    extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, **extra)
    _set_head(model, num_classes)
    return model


TIMM = "timm:"
# create_model arguments that would fetch or read weights: a card may not pass them.
_TIMM_FORBIDDEN = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _build_timm(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if ":" in name or "/" in name:  # hf-hub:org/model, local-dir:...: resolving them reads or downloads
        raise ParameterError(None, f"timm architecture {name!r}: give a timm model name (e.g. vit_large_patch16_224); "
                             "hub models are downloaded once with their own tools and loaded from the local weights file")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        part = name.split(".")[0].split("_")[0]
        close = close or timm.list_models(f"*{part}*")[:5]
        raise ParameterError(None, f"unknown timm architecture {name!r}" + (f" (close: {', '.join(close)})" if close else ""))
    bad = sorted(k for k in kwargs if k in _TIMM_FORBIDDEN)
    if bad:
        raise ParameterError(None, f"timm_kwargs {bad} are not allowed: weights come from the local file only")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:  # an argument the architecture does not take
        raise ParameterError(None, f"timm:{name} with {kwargs}: {exc}") from None


def _timm_has(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def _head(model: nn.Module) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the final classification layer.

    timm models say which it is (``get_classifier``). torchvision families name it
    differently: ``fc`` (ResNet, RegNet, ShuffleNet, GoogLeNet), ``classifier`` or its last
    Linear (DenseNet, EfficientNet, MobileNet, ConvNeXt, VGG, MaxViT), ``heads.head`` (ViT),
    ``head`` (Swin), and a 1x1 conv in ``classifier`` (SqueezeNet)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        layer = get_classifier()
        qualified = next((n for n, m in model.named_modules() if m is layer and n), None)
        if isinstance(layer, nn.Linear) and qualified:
            parent, _, name = qualified.rpartition(".")
            return model.get_submodule(parent), name
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
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):  # timm: the model knows its head (and any head_dist / pooling that goes with it)
        reset(num_classes)
        return
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
    """A model from a local file or folder, in eval mode, with its card in ``info.card``.

    ``path``: safetensors or a ``weights_only`` torch state dict (torchvision or timm
    architecture), a TorchScript file, a ``torch.export`` program, a WSInfer model folder, or a
    folder with ``card.json`` beside its weights. The format is read from the content, not the
    suffix. ``arch`` / ``num_classes`` default to the card beside, then what a safetensors file
    records, else resnet18 and the size of the state dict's classification layer; files that are
    their own architecture (TorchScript, export, WSInfer) ignore ``arch``. Every failure is a
    :class:`ModelLoadError` naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, arch, num_classes)
    if not path.is_file():
        raise ModelLoadError(path, "weights file not found")
    data = path.read_bytes()  # hash exactly the bytes that get loaded
    sha = hashlib.sha256(data).hexdigest()
    kind = file_kind(data)
    beside = card_beside(path, sha)
    if kind in PROGRAM_KINDS:
        known = num_classes or (beside.num_classes if beside else None)
        size = _input_size(beside)
        model, n = sources.load_program(path, data, str(kind), known, size)
        card = _fitted_card(beside, kind, n, sha) if beside else _made_card(path, kind, n, sha, {})
        return model, ModelInfo(str(kind), n, sha, path, card)
    state, meta = _read_state(path, data)
    model, arch, num_classes = _fill(path, state, meta, arch or (beside.arch if beside else None),
                                     num_classes or (beside.num_classes if beside else None), _timm_kwargs(beside))
    card = _fitted_card(beside, arch, num_classes, sha) if beside else _made_card(path, arch, num_classes, sha, meta)
    return model, ModelInfo(arch, num_classes, sha, path, card)


def _fill(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str], arch: str | None,
          num_classes: int | None, timm_kwargs: dict[str, Any]) -> tuple[nn.Module, str, int]:
    """Build ``arch`` and load ``state`` into it strictly: (model in eval mode, arch, num_classes)."""
    recorded = meta.get("arch")
    arch = arch or recorded or DEFAULT_ARCH
    try:
        model = build_model(arch, 1, **timm_kwargs)
        state = strip_prefix(state, model.state_dict())
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
    return model, arch, num_classes


# Wrappers training code puts around a model's keys: DDP (module.), torch.compile (_orig_mod.),
# Lightning and most training scripts (model.), self-supervised checkpoints (backbone.).
PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")


def strip_prefix(state: dict[str, torch.Tensor], expected: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """``state`` without the wrapper prefixes that all of its keys share (nested too:
    ``module.model.``). A prefix the model's own keys all share (``expected``) stays."""
    while state:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)
                       and not (expected and all(k.startswith(p) for k in expected))), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _load_folder(folder: Path, arch: str | None, num_classes: int | None) -> tuple[nn.Module, ModelInfo]:
    found = folder_model(folder)
    if found is None:
        raise ModelLoadError(folder, "not a model folder: expected a WSInfer model folder (config.json with "
                             "torchscript_model.pt or model.safetensors) or card.json beside model.safetensors")
    kind, weights, config = found
    if kind == "card":
        return load_model(weights, arch, num_classes)
    assert config is not None
    spec = wsinfer.read_config(config)  # the config is checked before any weights are read
    data = weights.read_bytes()
    sha = folder_sha256(config, weights)
    what = file_kind(data)
    size = spec.normalisation.resize or spec.patch_size_pixels
    if what in PROGRAM_KINDS:
        model, n = sources.load_program(weights, data, str(what), None, size)
        arch = str(what)
    elif what == "safetensors":
        state, meta = _read_state(weights, data)
        arch = TIMM + spec.architecture
        try:
            model, arch, n = _fill(weights, state, {}, arch, None, {})
        except ModelLoadError as exc:
            raise ModelLoadError(exc.path, f"{exc.problem} (architecture {spec.architecture!r} from {config.name})") from None
    else:
        raise ModelLoadError(weights, "neither TorchScript nor safetensors (a WSInfer folder holds one of them)")
    if n != spec.num_classes or (num_classes is not None and num_classes != n):
        raise ModelLoadError(config, f"num_classes {spec.num_classes} (class_names {spec.class_names}) but "
                             f"{weights.name} outputs {n} column(s)" if n != spec.num_classes else
                             f"the model has {n} classes, the caller asks for {num_classes}")
    card = wsinfer.wsinfer_card(spec, arch, sha, folder.resolve().name, config)
    return model, ModelInfo(arch, n, sha, folder, card)


def _input_size(card: ModelCard | None) -> int | None:
    """The input edge a card says the model takes: its resize, else its patch size."""
    if card is None:
        return None
    return card.normalisation.resize or card.patch_size


def _timm_kwargs(card: ModelCard | None) -> dict[str, Any]:
    """``timm_kwargs`` of a card: what a timm architecture needs beyond its name (a foundation
    model's ``img_size``, ``init_values``, ``dynamic_img_size``), kept as an extra card key."""
    extra = (card.model_extra or {}) if card is not None else {}
    kwargs = extra.get("timm_kwargs") or {}
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def _fitted_card(card: ModelCard, arch: str, num_classes: int, sha: str) -> ModelCard:
    """The card beside, saying what was loaded: the arch or class count the caller gave wins."""
    if card.arch == arch and card.num_classes == num_classes:
        return card
    update: dict[str, Any] = {"arch": arch, "source": source_of(arch), "num_classes": num_classes, "weights_sha256": sha}
    if card.num_classes != num_classes:
        update.update(classes=[], positive_class=None)  # named for another number of outputs
    return card.model_copy(update=update)


def _made_card(path: Path, arch: str, num_classes: int, sha: str, meta: dict[str, str]) -> ModelCard:
    """A card from what a bare file says: its arch, outputs, and the class names and slide a
    safetensors file of ours records (``save_weights`` metadata)."""
    data: dict[str, Any] = {"source": source_of(arch), "arch": arch, "num_classes": num_classes, "weights_sha256": sha}
    try:
        classes = json.loads(meta.get("classes", "[]"))
    except ValueError:
        classes = []
    fits = len(classes) == (2 if num_classes == 1 else num_classes)
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes) and fits and len(set(classes)) == len(classes):
        data["classes"] = classes
    if meta.get("trained_on"):
        data["training_data"] = f"trained on {meta['trained_on']}"
    return card_from_dict(data, path)


def export_model(source: str | Path, fmt: str, out: str | Path, arch: str | None = None,
                 num_classes: int | None = None) -> ModelInfo:
    """Write the model at ``source`` (any source :func:`load_model` reads) as a TorchScript file
    (``fmt`` 'torchscript') or ``torch.export`` program ('export') at ``out``, and its card as
    ``card.json`` beside it: the source's card with the new file's sha256, source and arch.

    Refuses to overwrite a card.json beside ``out`` that describes other weights."""
    if not Path(source).exists():  # the input first: a missing model is the problem to name
        raise ModelLoadError(source, "model not found (a weights file, TorchScript or export file, or model folder)")
    if fmt not in PROGRAM_KINDS:
        raise ParameterError(None, f"--format {fmt!r}: torchscript or export")
    out = Path(out)
    card_path = out.parent / CARD_FILE
    model, info = load_model(source, arch, num_classes)
    if Path(source).resolve() in (out.resolve(), out.parent.resolve()):
        raise ModelLoadError(out, "is the source model (or its folder): write the export elsewhere")
    if card_path.is_file():
        try:
            other = json.loads(card_path.read_text()).get("weights_sha256")
        except (OSError, ValueError, AttributeError):
            other = None
        # Only the card of an earlier export to this very file may be replaced: any other card
        # (the source's own, another model's) would be left describing nothing.
        if not (out.is_file() and other == file_sha256(out)):
            raise ModelLoadError(card_path, "exists and describes other weights: write the export into another folder")
    assert info.card is not None
    size = _input_size(info.card) or sources.DEFAULT_SIZE
    data = sources.program_bytes(model, fmt, size)
    with writing_outputs(out):
        written = write_atomic(out, data)
        sha = hashlib.sha256(data).hexdigest()
        card = info.card.model_copy(update={"weights_sha256": sha, "source": fmt, "arch": fmt})
        fields = json.loads(card.to_json())
        fields["exported_from"] = {"sha256": info.sha256, "arch": info.arch, "source": info.card.source}
        write_atomic(card_path, (json.dumps(fields, indent=2) + "\n").encode())
    return ModelInfo(fmt, info.num_classes, sha, written, card_from_dict(fields, card_path))


def _rows(weight: torch.Tensor | None, default: int) -> int:
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else default


def _read_state(path: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from a safetensors file or a torch state dict."""
    if file_kind(data) == "safetensors":
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
            parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:2])})")
    return "; ".join(parts)
