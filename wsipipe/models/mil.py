"""Gated-attention multiple-instance learning (Ilse, Tomczak and Welling, 2018): a slide label from
the features of its patches, with an attention weight per patch that says which patches the
slide-level call rests on.

    h_i = ReLU(W x_i)                                   per patch: (N, D) -> (N, H)
    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) )   gated attention, sums to 1 over the slide
    logit = c^T sum_i a_i h_i

Features are standardised by the training set's per-feature mean and std, stored with the
weights, so an encoder with any feature scale trains the same way.

A MIL model is a folder: ``model.safetensors`` (weights, feature mean/std) and ``card.json``
(a :class:`~wsipipe.models.card.ModelCard` with ``kind: "mil"``, the feature encoder's identity,
the feature dimension, cross-validation metrics and the training slides). No torch is needed
to read the card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsipipe.errors import ModelLoadError
from wsipipe.files import write_atomic
from wsipipe.models.card import CARD_FILE, ModelCard, read_card

WEIGHTS_FILE = "model.safetensors"
KIND = "mil"
FORMAT = "wsipipe-mil-1"


class GatedAttentionMIL(nn.Module):
    """(N, D) features of one slide -> (slide logit, attention (N,) summing to 1)."""

    def __init__(self, dim: int, hidden: int = 128, attention: int = 64, dropout: float = 0.25):
        super().__init__()
        self.dim, self.hidden, self.attention_dim = dim, hidden, attention
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed((x - self.mean) / self.std)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        a = torch.softmax(scores, dim=0)
        return self.classifier(a @ h).squeeze(-1), a


@dataclass(frozen=True)
class MilPrediction:
    probability: float
    attention: np.ndarray  # (N,) float32, sums to 1 over the patches given


def predict(model: GatedAttentionMIL, features: np.ndarray) -> MilPrediction:
    """Slide probability and attention for one slide's (N, D) features (CPU, eval mode)."""
    model.eval()
    with torch.inference_mode():
        logit, a = model(torch.from_numpy(np.asarray(features, dtype=np.float32)))
    return MilPrediction(float(torch.sigmoid(logit)), a.numpy().astype(np.float32))


def save_mil(model: GatedAttentionMIL, out_dir: str | Path, card: dict[str, Any]) -> ModelCard:
    """``model.safetensors`` then ``card.json`` (with the weights' sha256): the card last, as the marker."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "dim": str(model.dim), "hidden": str(model.hidden), "attention": str(model.attention_dim)}
    data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, metadata=meta)
    write_atomic(out_dir / WEIGHTS_FILE, data)
    full = ModelCard.model_validate({
        **card, "kind": KIND, "arch": "gated-attention-mil", "num_classes": 1,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "mil": {"dim": model.dim, "hidden": model.hidden, "attention": model.attention_dim},
    })
    write_atomic(out_dir / CARD_FILE, full.to_json())
    return full


def read_mil_card(model_dir: str | Path) -> ModelCard:
    """The card of a MIL model folder; a ModelLoadError naming the folder when it is not one."""
    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    if not path.is_file():
        raise ModelLoadError(model_dir, f"not a MIL model folder (no {CARD_FILE}; train one with `wsipipe mil train`)")
    card = read_card(path)
    extra = card.model_extra or {}
    if extra.get("kind") != KIND:
        raise ModelLoadError(path, f"not a MIL model card (kind {extra.get('kind')!r}); `wsipipe run --model` takes patch classifiers")
    if not isinstance(extra.get("encoder"), dict):
        raise ModelLoadError(path, "the MIL card names no feature encoder")
    return card


def load_mil(model_dir: str | Path) -> tuple[GatedAttentionMIL, ModelCard]:
    """The model of a MIL folder in eval mode, checked against its card's sha256."""
    from safetensors.torch import load

    model_dir = Path(model_dir)
    card = read_mil_card(model_dir)
    path = model_dir / WEIGHTS_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the MIL weights: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != card.weights_sha256:
        raise ModelLoadError(path, "weights do not match the card's weights_sha256")
    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        model = GatedAttentionMIL(int(meta["dim"]), int(meta["hidden"]), int(meta["attention"]))
        model.load_state_dict(load(data), strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(path, f"not a readable MIL weights file: {str(exc)[:200]}") from None
    return model.eval(), card


def card_encoder(card: ModelCard) -> dict[str, Any]:
    """The feature encoder a MIL card records: identity (kind, arch, sha256, dim), spec and weights file."""
    return dict((card.model_extra or {}).get("encoder") or {})
