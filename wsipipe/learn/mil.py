"""Training slide-level attention-MIL models from slide labels and stored patch features.

    result = train_mil(["a.zarr", "b.zarr", ...], "labels.csv", "runs/mil", cfg.mil)

``labels.csv`` has a ``slide`` column (a store path, or a slide's name or stem, or the name of
a ``wsipipe run`` slide folder), a ``label`` column (0/1, or two class names) and optionally a
``patient`` column. Cross-validation folds split by patient when given (one patient's slides
never straddle training and test), else by slide, stratified by label; its out-of-fold
predictions give the held-out AUC and the decision threshold. The final model is then fitted
on every slide and written with its card (:func:`wsipipe.models.mil.save_mil`), beside a copy
of the feature encoder's weights so that ``wsipipe run --mil`` can embed new slides.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsipipe.config import MilConfig
from wsipipe.errors import StoreError, TrainingDataError
from wsipipe.learn.metrics import binary_auc, choose_threshold
from wsipipe.models import embed
from wsipipe.models.identity import file_sha256
from wsipipe.models.card import ModelCard
from wsipipe.models.mil import GatedAttentionMIL, predict, save_mil
from wsipipe.tiles import store

log = logging.getLogger(__name__)
# (what, done, total) -> None: "fold 2/5" epochs, then "final" epochs.
MilProgress = Callable[[str, int, int], None]


@dataclass
class Bag:
    """One labelled slide: its features and where they came from."""

    slide: str  # as the CSV names it
    store: Path
    label: int  # 1 = the positive class
    group: str  # patient, else the slide: what folds keep together
    features: np.ndarray  # (N, D) float32


# ---------------------------------------------------------------------------- labels


def _store_keys(path: Path) -> set[str]:
    """The names a CSV may give a store by: its path, folder names, the slide's name and stem."""
    keys = {str(path.resolve())}
    if path.stem != "patches":
        keys.add(path.stem)
        keys.add(path.name)
    keys.add(path.resolve().parent.name)  # the `wsipipe run` slide folder, <stem>-<id>
    try:
        slide = store.meta(store.open_store(path, mode="r")).get(store.META_SLIDE) or {}
    except StoreError:
        return keys
    for value in (slide.get("name"), slide.get("path")):
        if value:
            keys.update({Path(str(value)).name, Path(str(value)).stem})
    return keys


def _read_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if isinstance(v, str) or v is None}
                   for row in reader]
    except OSError as exc:
        raise TrainingDataError(csv_path, f"cannot read the labels: {exc.strerror or exc}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise TrainingDataError(csv_path, f"not a readable CSV: {exc}") from None
    for column in ("slide", "label"):
        if column not in columns:
            raise TrainingDataError(csv_path, f"no '{column}' column (columns: {', '.join(columns) or 'none'})")
    return columns, raw


def _match(csv_path: Path, number: int, slide: str, index: dict[str, list[Path]], n_stores: int) -> Path:
    """The one store a CSV row's slide names (a path to a store is taken as it is)."""
    candidate = Path(slide) if Path(slide).is_absolute() else csv_path.parent / slide
    matches = index.get(slide) or index.get(str(candidate.resolve())) or (
        [candidate] if (candidate / "zarr.json").is_file() else [])
    found = list(dict.fromkeys(p.resolve() for p in matches))
    if not found:
        raise TrainingDataError(csv_path, f"row {number}: slide {slide!r} matches none of the {n_stores} stores given")
    if len(found) > 1:
        raise TrainingDataError(csv_path, f"row {number}: slide {slide!r} matches {len(found)} stores; give its store path")
    return found[0]


def _classes(csv_path: Path, names: list[str], positive: str | None) -> tuple[list[str], str]:
    """(negative, positive) class names: 0/1, or two names (the positive one given, else the last sorted)."""
    if len(names) != 2:
        which = f"only {names[0]!r}" if len(names) == 1 else f"{len(names)}: {', '.join(names[:5])}"
        raise TrainingDataError(csv_path, f"labels must be two classes (present/absent), found {which}")
    pos = positive or ("1" if set(names) == {"0", "1"} else names[-1])
    if pos not in names:
        raise TrainingDataError(csv_path, f"positive class {pos!r} is not one of the labels {names}")
    return [n for n in names if n != pos] + [pos], pos


def read_labels(
    csv_path: str | Path, stores: Sequence[str | Path], positive: str | None = None
) -> tuple[list[tuple[int, str, Path, str, str]], list[str], str]:
    """Rows of ``csv_path`` matched to stores: (row number, slide, store, label text, group);
    the two class names (negative, positive) and the positive one. A missing column, a slide
    matching no store (or several, or labelled twice), or a label set that is not two classes
    is a TrainingDataError naming the CSV and the row."""
    csv_path = Path(csv_path)
    columns, raw = _read_csv(csv_path)
    has_patient = "patient" in columns
    index: dict[str, list[Path]] = {}
    for s in stores:
        for key in _store_keys(Path(s)):
            index.setdefault(key, []).append(Path(s))
    rows = []
    seen: dict[Path, int] = {}
    for number, row in enumerate(raw, start=2):  # line 1 is the header
        slide, label = row.get("slide", ""), row.get("label", "")
        if not slide or not label:
            raise TrainingDataError(csv_path, f"row {number}: empty slide or label")
        path = _match(csv_path, number, slide, index, len(stores))
        if path in seen:
            raise TrainingDataError(csv_path, f"row {number}: slide {slide!r} is labelled again (first in row {seen[path]})")
        seen[path] = number
        group = row.get("patient", "") if has_patient else ""
        rows.append((number, slide, path, label, group or f"slide:{path}"))
    if not rows:
        raise TrainingDataError(csv_path, "no labelled slides")
    classes, pos = _classes(csv_path, sorted({r[3] for r in rows}), positive)
    return rows, classes, pos


def load_bags(
    csv_path: str | Path, stores: Sequence[str | Path], positive: str | None = None
) -> tuple[list[Bag], list[str], dict[str, Any]]:
    """The labelled slides with their features, the class names and the encoder every store's
    features share; a store without complete features, or with another encoder's, is a
    TrainingDataError naming the CSV row."""
    for path in stores:
        store.open_store(path, mode="r")  # a StoreError naming a store that is not there
    rows, classes, pos = read_labels(csv_path, stores, positive)
    bags: list[Bag] = []
    encoder: dict[str, Any] | None = None
    for number, slide, path, label, group in rows:
        found = embed.stored_encoder(store.open_store(path, mode="r"))
        if found is None:
            raise TrainingDataError(csv_path, f"row {number}: slide {slide!r} ({path}) has no patch features; "
                                    "run `wsipipe embed` on it first")
        ident = {k: found.get(k) for k in embed.IDENTITY_KEYS}
        if encoder is None:
            encoder = found
        elif ident != {k: encoder.get(k) for k in embed.IDENTITY_KEYS}:
            raise TrainingDataError(csv_path, f"row {number}: slide {slide!r} was embedded with another encoder "
                                    f"({found.get('arch')} {str(found.get('sha256'))[:12]}) than the slides before it "
                                    f"({encoder.get('arch')} {str(encoder.get('sha256'))[:12]})")
        features = _usable(path, embed.read_features(path))
        if not len(features):
            raise TrainingDataError(csv_path, f"row {number}: slide {slide!r} ({path}) has no usable patches")
        bags.append(Bag(slide, path, int(label == pos), group, features))
    if len({b.label for b in bags}) < 2:
        raise TrainingDataError(csv_path, "every labelled slide has the same label")
    assert encoder is not None
    return bags, classes, encoder


def _usable(path: Path, features: np.ndarray) -> np.ndarray:
    """Features of the patches that carry data (not skipped as corrupt tiles)."""
    corrupt = store.optional_array(store.open_store(path, mode="r"), store.CORRUPT)
    keep = np.isfinite(features).all(axis=1)
    if corrupt is not None and corrupt.shape[0] == len(features):
        keep &= ~np.asarray(corrupt[:], dtype=bool)
    return features[keep]


# ---------------------------------------------------------------------------- folds, fitting


def folds_by_group(labels: np.ndarray, groups: Sequence[str], k: int, seed: int) -> list[np.ndarray]:
    """``k`` test index sets; a group's slides stay together, groups of each label spread evenly."""
    rng = np.random.default_rng(seed)
    group_label: dict[str, int] = {}
    for g, y in zip(groups, labels, strict=True):
        group_label[g] = max(group_label.get(g, 0), int(y))
    order: list[str] = []
    for y in (1, 0):  # positives first: the scarcer class in most slide sets lands evenly
        names = sorted(g for g, v in group_label.items() if v == y)
        order.extend(names[i] for i in rng.permutation(len(names)))
    fold_of = {g: i % k for i, g in enumerate(order)}
    groups = list(groups)
    return [np.flatnonzero([fold_of[g] == f for g in groups]) for f in range(k)]


def fit(bags: Sequence[Bag], cfg: MilConfig, progress: Callable[[int, int], None] | None = None) -> GatedAttentionMIL:
    """A gated-attention MIL model fitted on ``bags`` (Adam, one slide per step, the positive
    class weighted by the negatives-to-positives ratio)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dim = bags[0].features.shape[1]
    model = GatedAttentionMIL(dim, cfg.hidden, cfg.attention, cfg.dropout)
    stacked = np.concatenate([b.features for b in bags])
    model.mean.copy_(torch.from_numpy(stacked.mean(axis=0)))
    model.std.copy_(torch.from_numpy(np.maximum(stacked.std(axis=0), 1e-3)))
    labels = np.array([b.label for b in bags])
    # Balance the classes: the rarer one weighs the ratio of the counts.
    weight = {1: max(1.0, float((labels == 0).sum()) / max(1, int((labels == 1).sum()))),
              0: max(1.0, float((labels == 1).sum()) / max(1, int((labels == 0).sum())))}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    tensors = [torch.from_numpy(b.features) for b in bags]
    model.train()
    for epoch in range(cfg.epochs):
        for i in rng.permutation(len(bags)):
            x = tensors[i]
            if len(x) > cfg.max_patches:
                x = x[torch.from_numpy(rng.choice(len(x), cfg.max_patches, replace=False))]
            logit, _ = model(x)
            y = torch.tensor(float(bags[i].label))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y) * weight[bags[i].label]
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress:
            progress(epoch + 1, cfg.epochs)
    return model.eval()


def cross_validate(bags: Sequence[Bag], cfg: MilConfig, progress: MilProgress | None = None) -> dict[str, Any]:
    """k-fold cross-validation: per-fold AUC (folds holding both labels), its mean and std, and the
    AUC of the pooled out-of-fold probabilities (the held-out AUC)."""
    labels = np.array([b.label for b in bags])
    groups = [b.group for b in bags]
    n_groups = {y: len({g for g, v in zip(groups, labels, strict=True) if v == y}) for y in (0, 1)}
    k = min(cfg.folds, len(set(groups)))
    oof = np.full(len(bags), np.nan)
    fold_aucs: list[float] = []
    for f, test in enumerate(folds_by_group(labels, groups, k, cfg.seed)):
        train = np.setdiff1d(np.arange(len(bags)), test)
        if not len(test) or len(set(labels[train])) < 2:
            continue
        bar = (lambda d, t, f=f: progress(f"fold {f + 1}/{k}", d, t)) if progress else None
        model = fit([bags[i] for i in train], cfg, bar)
        for i in test:
            oof[i] = predict(model, bags[i].features).probability
        value = binary_auc(oof[test], labels[test] == 1)
        if not np.isnan(value):
            fold_aucs.append(value)
    done = ~np.isnan(oof)
    pooled = binary_auc(oof[done], labels[done] == 1) if done.any() else float("nan")
    chosen = choose_threshold(oof[done], labels[done]) if done.any() else None
    return {
        "folds": k, "split_by": "patient" if any(not g.startswith("slide:") for g in groups) else "slide",
        "groups_per_class": {"negative": n_groups[0], "positive": n_groups[1]},
        "fold_auc": [round(v, 6) for v in fold_aucs],
        "auc_mean": round(float(np.mean(fold_aucs)), 6) if fold_aucs else None,
        "auc_std": round(float(np.std(fold_aucs)), 6) if fold_aucs else None,
        "held_out_auc": None if np.isnan(pooled) else round(float(pooled), 6),
        "threshold": None if chosen is None else round(chosen[0], 6),
        "out_of_fold": [None if np.isnan(p) else round(float(p), 6) for p in oof],
    }


# ---------------------------------------------------------------------------- the command


def _copy_encoder(encoder: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The card's encoder entry, with its weights copied into the model folder (so the folder
    applies anywhere); where the file is gone or changed, the original path is kept."""
    entry = {k: encoder.get(k) for k in embed.IDENTITY_KEYS}
    spec, weights = str(encoder.get("spec") or ""), encoder.get("weights")
    typed = spec.startswith(("torchvision:", "timm:"))
    source = Path(str(weights)) if weights else None
    if source is not None and source.is_file() and file_sha256(source) == entry["sha256"]:
        name = "encoder" + "".join(source.suffixes[-1:])
        shutil.copy2(source, out_dir / name)
        return {**entry, "spec": spec if typed else name, "weights": name}
    log.warning("%s: encoder weights %s not found or changed; the card records the path only", out_dir, weights)
    return {**entry, "spec": spec, "weights": str(weights) if weights else None}


def train_mil(
    stores: Sequence[str | Path], labels_csv: str | Path, out_dir: str | Path, cfg: MilConfig | None = None,
    positive: str | None = None, progress: MilProgress | None = None,
) -> dict[str, Any]:
    """Cross-validate, fit the final model on every slide and write ``out_dir`` (model.safetensors,
    card.json, the encoder's weights). Returns the card as a dict."""
    cfg = cfg or MilConfig()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    bags, classes, encoder = load_bags(labels_csv, stores, positive)
    for label in (0, 1):
        if len({b.group for b in bags if b.label == label}) < 2:
            unit = "patients" if any(not b.group.startswith("slide:") for b in bags) else "slides"
            raise TrainingDataError(labels_csv, f"class {classes[label]!r} has fewer than 2 {unit}: cannot cross-validate")
    cv = cross_validate(bags, cfg, progress)
    final = fit(bags, cfg, (lambda d, t: progress("final", d, t)) if progress else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    tile = store.meta(store.open_store(bags[0].store, mode="r")).get(store.META_TILE) or {}
    card = {
        "classes": classes, "positive_class": classes[1], "mpp": tile.get("mpp"), "patch_size": tile.get("patch_size"),
        "training_data": f"{len(bags)} slides ({sum(b.label for b in bags)} {classes[1]}) labelled in {Path(labels_csv).name}",
        "threshold": cv["threshold"] if cv["threshold"] is not None else 0.5,
        "encoder": _copy_encoder(encoder, out_dir), "feature_dim": int(bags[0].features.shape[1]),
        "cv": cv,
        "training_slides": [
            {"slide": b.slide, "store": str(b.store), "label": classes[b.label],
             "patient": None if b.group.startswith("slide:") else b.group, "n_patches": int(len(b.features))}
            for b in bags
        ],
        "config": cfg.model_dump(mode="json", exclude={"model"}),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    written: ModelCard = save_mil(final, out_dir, card)
    return written.model_dump(mode="json")
