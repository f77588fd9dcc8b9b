"""A patch classifier trained from stored patch features: ``wsipipe train STORES --features --encoder SPEC``.

Fitting a linear head on frozen features takes seconds where fine-tuning from pixels takes
minutes, and the features are often in the stores already (``wsipipe embed``, a MIL run). The
result is still an ordinary classifier: the encoder's architecture with the fitted head as its
classification layer, so ``wsipipe run --model OUT`` runs it with no extra step, and its
probabilities on a patch are the head's on that patch's features (up to the float16 the
features are stored in).

The split, the early stopping rule, the threshold choice and the held-out metrics are those of
pixel training (:func:`~wsipipe.learn.patchsets.split_patch_set`,
:func:`~wsipipe.learn.metrics.choose_threshold`,
:func:`~wsipipe.learn.metrics.classification_metrics`), and its card has the same keys, plus
``head: "features"``, the encoder's identity and ``training_data``.

    card = train_features_head(["a.zarr", "b.zarr"], "out/", cfg, "runs/swav")
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsipipe.errors import AnnotationError, ConfigError, ModelLoadError, TrainingDataError
from wsipipe.learn.patchsets import PatchSet, load_patch_sets, split_identity, split_patch_set
from wsipipe.tiles import store

HEAD = "features"
# L2 on the head's weights (AdamW's decoupled decay), as the pixel fit uses: the head has one
# weight per feature, and a few hundred labelled patches can otherwise fit noise dimensions.
WEIGHT_DECAY = 1e-4
Embedded = Callable[[str, dict], None]  # (store, embed_store's stats) after each store


def classifier_arch(identity: dict[str, Any]) -> str:
    """The architecture name :func:`wsipipe.models.model.build_model` takes for an encoder."""
    arch = str(identity["arch"])
    return f"timm:{arch}" if identity.get("kind") == "timm" and not arch.startswith("timm:") else arch


def embed_stores(stores: list, encoder: nn.Module, identity: dict, cfg, on_store: Embedded | None = None) -> list[dict]:
    """Features of ``encoder`` into every store that lacks them (or holds another encoder's)."""
    from wsipipe.models.embed import embed_store

    out = []
    for s in stores:
        stats = embed_store(s, encoder, identity, cfg.inference)
        out.append(stats)
        if on_store:
            on_store(str(s), stats)
    return out


def load_feature_set(stores: list, identity: dict) -> PatchSet:
    """The labelled patches of ``stores`` as a :class:`PatchSet` whose rows are their features.

    Same rows, groups, positions and data identity as :func:`~wsipipe.learn.patchsets.load_patch_sets`
    gives for pixel training, so both split the stores alike (and their cards compare); only
    ``patches`` holds (N, D) float32 features instead of pixels."""
    from wsipipe.models.embed import read_features

    return load_patch_sets(stores, read_rows=lambda _group, path: read_features(path, identity))


def _probabilities(logits: torch.Tensor) -> np.ndarray:
    p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    return p.detach().cpu().numpy().astype(np.float32)


def fit_head(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], tc, num_classes: int):
    """A linear head on features: (head on raw features, per-epoch history, best epoch, its val probabilities).

    Features are standardised by the training split's mean and std while fitting (one step
    size suits every dimension), and the scaling is folded into the returned layer, so it
    applies to raw features as the classifier's own last layer does. Mini-batches of
    ``tc.batch_size`` drawn class-balanced, AdamW at ``tc.lr`` with :data:`WEIGHT_DECAY`;
    after each epoch the head is scored on val and the best kept by the pixel rule (higher AUC,
    ties lower balanced log-loss), stopping after ``tc.patience`` epochs without a better one,
    never before ``tc.min_epochs``."""
    from wsipipe.learn.train import _Best

    (xtr, ytr), (xva, yva) = train, val
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    mean = xtr.mean(0)
    std = xtr.std(0)
    std = np.where(std > 0, std, 1.0)  # a dead feature (constant) is left as it is, not divided by zero
    xt = torch.from_numpy(((xtr - mean) / std).astype(np.float32))
    xv = torch.from_numpy(((xva - mean) / std).astype(np.float32))
    yt = torch.from_numpy(ytr.astype(np.int64))
    head = nn.Linear(xt.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=tc.lr, weight_decay=WEIGHT_DECAY)
    loss_fn: nn.Module = nn.BCEWithLogitsLoss() if num_classes == 1 else nn.CrossEntropyLoss()
    classes, counts = np.unique(ytr, return_counts=True)
    weights = 1.0 / counts[np.searchsorted(classes, ytr)]  # class-balanced, as the pixel fit draws
    weights /= weights.sum()
    best = _Best()
    history: list[dict] = []
    for epoch in range(tc.epochs):
        order = rng.choice(len(ytr), size=len(ytr), replace=True, p=weights)
        losses = []
        head.train()
        for b in range(0, len(order), tc.batch_size):
            idx = torch.from_numpy(order[b : b + tc.batch_size])
            logits = head(xt[idx])
            loss = loss_fn(logits[:, 0], yt[idx].float()) if num_classes == 1 else loss_fn(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        head.eval()
        with torch.no_grad():
            probs = _probabilities(head(xv))
        best.record(history, epoch, probs, yva, losses, lambda: copy.deepcopy(head))
        if epoch + 1 >= tc.min_epochs and epoch - best.epoch >= tc.patience:
            break
    assert isinstance(best.model, nn.Linear)
    # w·((x - m) / s) + b  ==  (w / s)·x + (b - w·(m / s)): the same logits on raw features.
    w = best.model.weight.detach().double()
    s, m = torch.from_numpy(std).double(), torch.from_numpy(mean).double()
    raw = nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        raw.weight.copy_((w / s).float())
        raw.bias.copy_((best.model.bias.detach().double() - (w * (m / s)).sum(1)).float())
    return raw.eval(), history, best.epoch, best.probs


def classifier_with_head(encoder: nn.Module, identity: dict, head: nn.Linear, where, size: int = 224) -> nn.Module:
    """The encoder's architecture with ``head`` as its classification layer, the encoder's weights elsewhere."""
    from wsipipe.models.model import _head, _head_key, build_model

    arch, num_classes = classifier_arch(identity), head.out_features
    model = build_model(arch, num_classes)
    head_prefix = _head_key(model).rsplit(".", 1)[0] + "."
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith(head_prefix) for k in missing):
        raise ModelLoadError(where, f"the encoder's weights do not fit {arch} outside its classification layer "
                             f"(missing {[k for k in missing if not k.startswith(head_prefix)][:3]}, unexpected {unexpected[:3]})")
    parent, name = _head(model)
    layer = getattr(parent, name)
    with torch.no_grad():
        if isinstance(layer, nn.Conv2d):  # SqueezeNet: a 1x1 conv before the pooling is the same linear map
            layer.weight.copy_(head.weight.reshape(layer.weight.shape))
        elif layer.weight.shape == head.weight.shape:
            layer.weight.copy_(head.weight)
        else:
            raise ModelLoadError(where, f"{arch}'s classification layer takes {tuple(layer.weight.shape)}, "
                                 f"the head {tuple(head.weight.shape)}")
        layer.bias.copy_(head.bias)
    model.eval()
    _check_same_logits(model, encoder, head, arch, where, size)
    return model


def _check_same_logits(model: nn.Module, encoder: nn.Module, head: nn.Linear, arch: str, where, size: int) -> None:
    """One forward pass both ways: an architecture whose head does not sit right on the features
    the encoder gives would otherwise save a classifier that disagrees with its own card."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = head(encoder.eval()(x).float().flatten(1))
        got = model(x).float()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-4):
        raise ModelLoadError(where, f"{arch} with the fitted head does not reproduce the head on the encoder's features")


def _tile_at(stores: list) -> tuple[float | None, int | None]:
    """The resolution and patch size all stores were tiled at (None where they differ or do not say)."""
    seen = {(t.get("mpp"), t.get("patch_size")) for t in (store.meta(store.open_store(s)).get(store.META_TILE) or {} for s in stores)}
    if len(seen) != 1:
        return None, None
    mpp, size = next(iter(seen))
    return (float(mpp) if mpp else None), (int(size) if size else None)


def train_features_head(stores: list, out_dir, cfg, spec, weights=None, on_store: Embedded | None = None) -> dict:
    """Embed (where needed) -> split -> fit a linear head -> threshold on val -> test metrics ->
    classifier weights + card. ``cfg`` is the whole PipelineConfig (``train``: split, epochs,
    batch_size, lr, patience, min_epochs, seed, threshold_metric; ``inference``: the embedding).
    Writes ``out_dir/model.safetensors`` and ``out_dir/card.json``; returns the card."""
    from wsipipe import __version__
    from wsipipe.files import write_atomic
    from wsipipe.learn.encoders import load_encoder_spec
    from wsipipe.learn.metrics import choose_threshold, classification_metrics
    from wsipipe.learn.train import CARD_FORMAT, _counts
    from wsipipe.models.model import save_weights

    tc = cfg.train
    where = ", ".join(map(str, stores))
    if cfg.augment.stain_normalise != "none":
        raise ConfigError(None, f"augment.stain_normalise {cfg.augment.stain_normalise!r}: stored features are "
                          "embedded without stain normalisation; train from pixels for it, or set it to none")
    for p in stores:  # before embedding anything: a store that cannot train is named first
        g = store.open_store(p)
        if store.META_LABELS not in store.meta(g) or store.LABELS not in g:
            raise AnnotationError(p, "store has no labels; run `wsipipe patches` on it first")
    encoder, identity = load_encoder_spec(spec, weights)
    embedded = embed_stores(stores, encoder, identity, cfg, on_store)
    data = load_feature_set(stores, identity)
    try:
        split = split_patch_set(data, tc.split, tc.split_by, tc.seed)
    except TrainingDataError as exc:
        raise TrainingDataError(None, f"{where}: {exc.problem}") from None
    splits = split.indices
    for name in ("train", "val", "test"):
        if len(splits[name]) == 0:
            raise TrainingDataError(None, f"{where}: split {name!r} is empty (train.split {tuple(tc.split)}); "
                                    "training needs train, val and test")
    if len(np.unique(data.labels[splits["train"]])) < 2:
        raise TrainingDataError(None, f"{where}: the training split has labelled patches of one class of {data.classes} "
                                f"(class counts: {_counts(data.labels, data.classes)}); need at least two")
    num_classes = 1 if len(data.classes) == 2 else len(data.classes)
    tr, va, te = (data.subset(splits[k]) for k in ("train", "val", "test"))
    head, history, best_epoch, val_probs = fit_head((tr.patches, tr.labels), (va.patches, va.labels), tc, num_classes)
    chosen = choose_threshold(val_probs, va.labels, tc.threshold_metric) if val_probs is not None else None
    threshold = None if chosen is None else round(chosen[0], 6)
    with torch.no_grad():
        probs = _probabilities(head(torch.from_numpy(te.patches)))
    metrics = classification_metrics(probs, te.labels, threshold=threshold)

    out_dir = Path(out_dir)
    mpp, patch_size = _tile_at(stores)
    model = classifier_with_head(encoder, identity, head, identity.get("weights") or spec, patch_size or 224)
    arch = classifier_arch(identity)
    info = save_weights(model, out_dir / "model.safetensors", arch, num_classes, {"classes": json.dumps(data.classes)})
    where_xy = data.coords if split.by == "spatial" else None
    encoder_id = {k: identity.get(k) for k in ("kind", "arch", "sha256", "dim", "spec", "weights")}
    card = {
        "format": CARD_FORMAT, "wsipipe_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "arch": arch, "num_classes": num_classes, "classes": data.classes, "weights_sha256": info.sha256,
        "init": {"init": "encoder-features", "path": str(identity.get("weights") or spec), "sha256": identity.get("sha256")},
        "config": {"train": tc.model_dump(mode="json"), "augment": None},  # stored features: no augmentation
        "config_hash": cfg.section_hash("train"),
        "data": {"identity": data.identity, "stores": [str(s) for s in stores],
                 "splits": {k: {"n": int(len(v)), "groups": sorted(set(data.groups[v].tolist())),
                               "class_counts": {c: int(np.count_nonzero(data.labels[v] == j)) for j, c in enumerate(data.classes)},
                               "split_id": split_identity(data.groups, v, where_xy)} for k, v in splits.items()}},
        "split": split.describe(),
        "test_split_id": split_identity(data.groups, splits["test"], where_xy),
        "history": history, "best_epoch": best_epoch,
        "threshold": threshold,
        "threshold_selection": {"split": "val", "metric": tc.threshold_metric,
                                "value": None if chosen is None else chosen[1],
                                "note": None if chosen is not None else "val lacks a class: no threshold chosen"},
        "test_metrics": metrics,
        "stain_normalisation": None,
        "head": HEAD,
        "encoder": encoder_id,
        "training_data": (f"a linear head on {identity['kind']} {identity['arch']} features ({identity['dim']} per patch, "
                          f"weights sha256 {str(identity['sha256'])[:12]}) of {int(len(splits['train']))} labelled patches "
                          f"of {where}"),
        "embedded": [{"store": str(s), "computed": int(e["computed"]), "seconds": round(float(e["seconds"]), 3)}
                     for s, e in zip(stores, embedded, strict=True)],
        **({"mpp": mpp} if mpp else {}), **({"patch_size": patch_size} if patch_size else {}),
    }
    write_atomic(out_dir / "card.json", json.dumps(card, indent=2))
    return card
