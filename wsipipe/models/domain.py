"""The out-of-domain check: how far a slide's patches lie from the model's training patches
in the model's own feature space.

A classifier trained on one kind of tissue (or on generated slides) still answers on any other,
often with full confidence. What it saw in training is summarised, once, in feature space, in two
views: the penultimate features (the input of the classification layer) and the channel means
and deviations of an early block's output (see :class:`FeatureTap` for why both). Per view:
a mean, the top principal components with their variances, and the variance left outside them
(:func:`fit_domain`). A patch's distance (:func:`domain_distances`) is, per view, its Mahalanobis
distance in that subspace plus its residual outside it, scaled so that a training patch lies
near 1, and the larger of the views. The distances of training patches *held out of the fit*
give the quantiles, so p99 is what a new in-domain patch reaches, not what the fitted ones do.
A slide is out of domain when more than a set fraction of its analysed patches lie beyond p99
(:func:`slide_domain`).

The features come from the same forward pass that gives the logits: :class:`FeatureTap` hooks
the classification layer and the early block. Models without a known classification layer
(TorchScript, an exported program) have no tap, and the check is reported as unavailable.

Everything but the tap is numpy: ``summary.json`` readers and stitching never load torch here.

    tap = FeatureTap.attach(model)              # None: no classification layer known
    logits = tap.wrap(model)(x); feats = tap.take()
    domain = fit_domain(feats_of_training_patches)           # into the model card
    d = domain_distances(feats, domain)                      # (N,) per patch, stored by inference
    slide_domain(d, domain, fraction=0.5)                    # {"fraction_beyond": ..., "out_of_domain": ...}
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from wsipipe.tiles import store

if TYPE_CHECKING:
    import torch
    from torch import nn

DOMAIN_FORMAT = "wsipipe-domain-1"
DISTANCE_KIND = "max-over-views(pca-mahalanobis+residual / held-out median)"
DISTANCE_ARRAY = store.OOD_DISTANCE  # the store's (N,) float32 per-patch distances, beside probabilities
MAX_COMPONENTS = 32
HELD_OUT = 0.2  # share of the training patches kept out of the fit for the distance quantiles
QUANTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "max": 100.0}
# Variance floor, relative to the mean component variance: a feature channel that never fires
# on the training patches (a dead ReLU) would otherwise turn any activation into an infinite distance.
_FLOOR = 1e-3


# --------------------------------------------------------------------------- the feature tap


def feature_layer(model: Any) -> nn.Module | None:
    """The classification layer whose input is the penultimate features; None when unknown.

    timm models name it (``get_classifier()``); torchvision families are found by
    :func:`wsipipe.models.model._head`; a TorchScript module or an exported program takes no hooks."""
    import torch
    from torch import nn

    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return None
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            layer = get()
        except Exception:  # a wrapper whose get_classifier needs more than the model: no tap
            layer = None
        # timm hands back an Identity when the model was built without a head: nothing to tap.
        if isinstance(layer, nn.Module) and any(True for _ in layer.parameters()):
            return layer
    from wsipipe.models.model import _head

    try:
        parent, name = _head(model)
    except ValueError:
        return None
    layer = getattr(parent, name)
    return layer if isinstance(layer, nn.Module) else None


def early_layer(model: Any) -> nn.Module | None:
    """An early block whose output statistics describe the input's colour and texture: a ResNet's
    ``layer1`` (torchvision and timm), else the Conv2d a quarter of the way through the model's
    convolutions; None for a model without convolutions (a ViT: its head features only)."""
    from torch import nn

    block = getattr(model, "layer1", None)
    if isinstance(block, nn.Module) and _last_conv(block) is not None:
        return block
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[len(convs) // 4] if len(convs) >= 4 else None


def _last_conv(module: nn.Module) -> nn.Module | None:
    from torch import nn

    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def view_widths(model: Any) -> list[tuple[str, int]] | None:
    """The feature views a tap on ``model`` records, (name, width) in column order, known without
    running it; None when there is no tap (see :func:`feature_layer`)."""
    head = feature_layer(model)
    if head is None:
        return None
    width = getattr(head, "in_features", None) or getattr(head, "in_channels", None)
    views = [("head", int(width or 0))]
    early = early_layer(model)
    conv = None if early is None else _last_conv(early)
    if conv is not None:
        views.append(("early", 2 * int(getattr(conv, "out_channels", 0))))
    return views


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """(N, D) float32 from a classification layer's input: (N, D) as is, (N, D, H, W) averaged
    over space (a 1x1-conv head), (N, T, D) averaged over tokens."""
    if x.ndim == 4:
        x = x.mean(dim=(2, 3))
    elif x.ndim == 3:
        x = x.mean(dim=1)
    elif x.ndim != 2:
        x = x.reshape(x.shape[0], -1)
    return x.detach().float()


def channel_statistics(x: torch.Tensor) -> torch.Tensor:
    """(N, 2C) float32: each channel's mean and standard deviation over space of (N, C, H, W)."""
    import torch

    x = x.detach().float()
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)], dim=1)


class FeatureTap:
    """Features of every successful forward pass of a model, in call order, as (N, D) rows:
    the penultimate features (the input of the classification layer, a forward pre-hook) and,
    where the model has one, the channel means and deviations of an early block's output
    (:func:`early_layer`, a forward hook), side by side (:attr:`views`).

    Why both: a classifier's penultimate features are trained to separate its classes and are
    blind to much else; on the demo model (trained on generated slides) they put only 55-58 % of
    the real CMU-1 and TCGA patches beyond the training p99, and none of TCGA at 1 µm/px, while
    the early block's statistics (stain, texture) put 100 % there (BENCHMARKS.md).

    :meth:`wrap` keeps a call's features only when the call returns, so a forward pass that fails
    (out of memory, retried smaller) leaves nothing behind and features stay aligned with the logits."""

    def __init__(self, layer: nn.Module, early: nn.Module | None = None):
        self.layer, self.early = layer, early
        self._head: torch.Tensor | None = None
        self._early: torch.Tensor | None = None
        self._parts: list[torch.Tensor] = []
        self._handles = [layer.register_forward_pre_hook(self._hook)]
        if early is not None:
            self._handles.append(early.register_forward_hook(self._early_hook))

    @classmethod
    def attach(cls, model: Any) -> FeatureTap | None:
        layer = feature_layer(model)
        return None if layer is None else cls(layer, early_layer(model))

    @property
    def views(self) -> list[str]:
        return ["head"] if self.early is None else ["head", "early"]

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if args:
            self._head = pool_features(args[0])

    def _early_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if hasattr(output, "ndim") and output.ndim == 4:
            self._early = channel_statistics(output)

    def wrap(self, net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        import torch

        def tapped(x: torch.Tensor) -> torch.Tensor:
            self._head = self._early = None
            out = net(x)
            head, early = self._head, self._early
            if head is None or len(head) != len(x) or (self.early is not None and (early is None or len(early) != len(x))):
                raise RuntimeError("the feature tap saw no classification-layer input for this batch")
            self._parts.append(head if early is None else torch.cat([head, early], dim=1))
            self._head = self._early = None
            return out

        return tapped

    def take(self) -> torch.Tensor | None:
        """The features recorded since the last take, concatenated (on the model's device)."""
        import torch

        parts, self._parts = self._parts, []
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._parts, self._head, self._early = [], None, None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the reference


def _pack(a: np.ndarray) -> dict[str, Any]:
    # float32 little-endian in base64: a quarter the size of the same numbers as JSON text, exact.
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        data = np.frombuffer(base64.b64decode(value["base64"]), dtype="<f4")
        return data.reshape([int(s) for s in value["shape"]]).astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def fit_domain(
    features: np.ndarray, views: list[tuple[str, int]] | None = None, components: int = MAX_COMPONENTS,
    held_out: float = HELD_OUT, seed: int = 0, layer: str | None = None, groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """A compact, JSON-able description of training ``features`` (N, D).

    ``views``: (name, width) column blocks of ``features`` fitted separately (default: one,
    "head"), as :class:`FeatureTap` records them. Per view, the fit (mean, top ``components``
    principal directions and their variances, the mean variance left in the other directions)
    uses all but a random ``held_out`` share of the patches; each view's distance is divided by
    its median on the held-out patches, and a patch's distance is the largest over the views.
    The quantiles are those of the held-out patches' distances. ``groups`` (N,): rows of one
    group (a patch and its augmented copies) go to the same side of the held-out split."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 10:
        raise ValueError(f"need (N, D) features of at least 10 patches, got shape {x.shape}")
    n, dim = x.shape
    views = views or [("head", dim)]
    if sum(w for _, w in views) != dim:
        raise ValueError(f"views {views} do not add up to the {dim} feature columns")
    ids = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_ids = int(ids.max()) + 1
    order = np.random.default_rng(seed).permutation(n_ids)
    n_held = min(max(int(round(n_ids * held_out)), 5), n_ids - 5)
    is_held = np.isin(ids, order[:n_held])
    held, fit = x[is_held], x[~is_held]
    fitted, col = [], 0
    for name, width in views:
        view = {"name": name, "start": col, "stop": col + width, **_fit_view(fit[:, col : col + width], components)}
        view["scale"] = max(float(np.median(_view_distances(held[:, col : col + width], view))), 1e-12)
        fitted.append(view)
        col += width
    domain: dict[str, Any] = {
        "format": DOMAIN_FORMAT, "distance": DISTANCE_KIND, "layer": layer, "dim": int(dim),
        "n_fit": int(len(fit)), "n_held_out": int(len(held)), "views": fitted,
    }
    d = domain_distances(held, domain)
    domain["quantiles"] = {name: float(np.percentile(d, q)) for name, q in QUANTILES.items()}
    return domain


def _fit_view(fit: np.ndarray, components: int) -> dict[str, Any]:
    dim = fit.shape[1]
    mean = fit.mean(axis=0)
    # Eigen-decomposition of the covariance through the SVD of the centred data (N x D, small).
    _, sing, vt = np.linalg.svd(fit - mean, full_matrices=False)
    var = sing**2 / max(len(fit) - 1, 1)
    total = float(var.sum())
    # At most a quarter as many directions as fitted patches: with k near their number the fit
    # spans them exactly, the variance left outside is ~0, and every new patch looks infinitely far.
    k = int(max(1, min(components, len(fit) // 4, len(var), dim - 1 if dim > 1 else 1)))
    floor = _FLOOR * (total / dim if total > 0 else 1.0)
    eig = np.maximum(var[:k], floor)
    rest = dim - k
    residual = max(float(var[k:].sum()) / rest, floor) if rest > 0 else floor
    return {"dim": int(dim), "mean": _pack(mean), "components": _pack(vt[:k]), "eigenvalues": _pack(eig),
            "residual_variance": float(residual)}


def unpacked(domain: dict[str, Any]) -> dict[str, Any]:
    """``domain`` with its arrays decoded once (for a caller computing distances batch after batch)."""
    views = [{**v, **{k: _unpack(v[k]) for k in ("mean", "components", "eigenvalues")}} for v in domain["views"]]
    return {**domain, "views": views}


def _view_distances(x: np.ndarray, view: dict[str, Any]) -> np.ndarray:
    """``sqrt((sum_k z_k² / λ_k + |residual|² / σ²_rest) / D)``, with ``z`` the centred features in
    the principal directions and the residual what those directions leave: each term counts in
    units of the training spread along it."""
    mean, comps, eig = (_unpack(view[k]) for k in ("mean", "components", "eigenvalues"))
    c = np.asarray(x, dtype=np.float32) - mean
    z = c @ comps.T
    inside = (z * z / eig).sum(axis=1)
    residual = np.maximum((c * c).sum(axis=1) - (z * z).sum(axis=1), 0.0)
    return np.sqrt((inside + residual / float(view["residual_variance"])) / float(view["dim"]))


def domain_distances(features: np.ndarray, domain: dict[str, Any]) -> np.ndarray:
    """(N,) float32: each patch's distance from the training patches, the largest over the views
    of the view's distance in units of its held-out median (a typical training patch lies near 1)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != int(domain["dim"]):
        raise ValueError(f"need (N, {domain['dim']}) features, got shape {x.shape}")
    out = np.zeros(len(x), dtype=np.float32)
    for view in domain["views"]:
        d = _view_distances(x[:, int(view["start"]) : int(view["stop"])], view) / float(view.get("scale", 1.0))
        np.maximum(out, d, out=out)
    return out


def reference(domain: dict[str, Any]) -> dict[str, Any]:
    """What a slide's check needs of ``domain``: its distance quantiles (kept with the store, small)."""
    return {"format": domain.get("format"), "distance": domain.get("distance"), "layer": domain.get("layer"),
            "quantiles": dict(domain.get("quantiles") or {})}


def slide_domain(distances: np.ndarray, domain: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The share of a slide's analysed patches beyond the training p99, and whether it exceeds ``fraction``.

    ``domain``: a :func:`fit_domain` result or its :func:`reference`. NaN distances (patches
    not classified) are left out."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    d = d[np.isfinite(d)]
    p99 = float(domain["quantiles"]["p99"])
    n = int(d.size)
    beyond = int(np.count_nonzero(d > p99))
    share = beyond / n if n else 0.0
    return {
        "n_patches": n, "n_beyond": beyond, "fraction_beyond": share, "p99_distance": p99,
        "median_distance": float(np.median(d)) if n else None,
        "training_median_distance": float(domain["quantiles"].get("p50", np.nan)),
        "flag_fraction": float(fraction), "out_of_domain": bool(n and share > fraction),
    }
