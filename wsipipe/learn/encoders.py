"""Which patch encoder an ``--encoder`` spec names, loaded from local files only.

Here, not in :mod:`wsipipe.models`, because a pretraining checkpoint is read by
:mod:`wsipipe.learn.pretrain`, which models/ may not import. A spec is one of:

- a pretraining checkpoint folder, or its ``encoder.safetensors`` (``wsipipe pretrain``);
- a classifier weights file :func:`wsipipe.models.model.load_model` reads: its penultimate
  layer (the classification layer replaced by identity);
- ``torchvision:<arch>`` or ``timm:<name>`` with ``weights``: the architecture built without
  pretrained weights and filled from that file (a classifier's head is dropped).

Every encoder comes with its identity: ``kind``, ``arch``, ``sha256`` (of the weights file),
``dim`` (features per patch), plus ``spec`` and ``weights`` (where it came from; not compared).
New sources plug in as one more branch of :func:`load_encoder_spec` returning the same pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsipipe.errors import ModelLoadError
from wsipipe.models.identity import _safetensors_metadata, file_sha256
from wsipipe.models.model import _head, _read_state, build_model, load_model

ENCODER_FILE = "encoder.safetensors"  # the encoder of a pretraining checkpoint folder
PRETRAIN_FORMAT = "wsipipe-encoder-1"


def feature_dim(encoder: nn.Module, size: int = 224) -> int:
    """Features per patch: one forward pass of a black patch (CPU, eval mode, no gradients)."""
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    with torch.inference_mode():
        out = encoder.eval()(torch.zeros(1, 3, size, size, device=device))
    return int(out.reshape(1, -1).shape[1])


def _strip_head(model: nn.Module, where: Path | str) -> nn.Module:
    try:
        parent, name = _head(model)
    except ValueError as exc:
        raise ModelLoadError(where, f"cannot use it as an encoder: {exc}") from None
    setattr(parent, name, nn.Identity())
    return model.eval()


def load_encoder_spec(spec: str | Path, weights: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """(encoder in eval mode, its identity) for ``spec`` (see the module doc)."""
    text = str(spec)
    for prefix, loader in (("torchvision:", _torchvision), ("timm:", _timm)):
        if text.startswith(prefix):
            if weights is None:
                raise ModelLoadError(None, f"--encoder {text}: give its weights with --weights FILE (nothing is downloaded)")
            model, arch = loader(text.removeprefix(prefix), Path(weights))
            return _with_identity(model, prefix.rstrip(":"), arch, Path(weights), text)
    path = Path(text)
    if path.is_dir():
        if not (path / ENCODER_FILE).is_file():
            raise ModelLoadError(path, f"not a pretraining checkpoint folder (no {ENCODER_FILE})")
        path = path / ENCODER_FILE
    if not path.is_file():
        raise ModelLoadError(path, "encoder not found (a pretraining checkpoint, a weights file, torchvision:ARCH or timm:NAME)")
    if _is_pretrain(path):
        from wsipipe.learn.pretrain import load_encoder

        encoder, meta = load_encoder(path)
        return _with_identity(encoder, "pretrain", str(meta["arch"]), path, str(path))
    model, info = load_model(path)
    return _with_identity(_strip_head(model, path), "classifier", info.arch, path, str(path), sha256=info.sha256)


def _is_pretrain(path: Path) -> bool:
    try:
        return _safetensors_metadata(path.read_bytes()).get("format") == PRETRAIN_FORMAT
    except OSError:
        return False


def _with_identity(model: nn.Module, kind: str, arch: str, weights: Path, spec: str, sha256: str | None = None):
    identity = {
        "kind": kind, "arch": arch, "sha256": sha256 or file_sha256(weights), "dim": feature_dim(model),
        "spec": spec, "weights": str(weights.resolve()),
    }
    return model.eval(), identity


def _torchvision(arch: str, weights: Path) -> tuple[nn.Module, str]:
    model = build_model(arch, 1)
    state, _ = _read_state(weights, _read(weights))
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    parent, name = _head(model)
    head_prefix = next(n for n, m in model.named_modules() if m is getattr(parent, name)) + "."
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}  # a classifier's head, if any
    _strip_head(model, weights)
    _load(model, body, weights, f"torchvision {arch}")
    return model, arch


def _timm(name: str, weights: Path) -> tuple[nn.Module, str]:
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)  # num_classes=0: pooled features
    except Exception as exc:  # unknown name, or one timm cannot build offline
        raise ModelLoadError(weights, f"timm cannot build {name!r}: {exc}") from None
    state, _ = _read_state(weights, _read(weights))
    head = str(getattr(model, "default_cfg", {}).get("classifier") or "head")
    body = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    _load(model, body, weights, f"timm {name}")
    return model.eval(), name


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ModelLoadError(path, "weights file not found")
    return path.read_bytes()


def _load(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(path, f"weights do not fit {what}: {str(exc).splitlines()[0][:200]}") from None
