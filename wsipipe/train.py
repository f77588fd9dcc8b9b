"""Minimal supervised fit of a patch classifier (the demo's; the training issue generalises it).

    labels = label_patches(coords, patch_size_l0, tumor_polygons)      # 1 / 0 / -1
    model = fit_classifier(patches, labels, epochs=3)
    save_weights(model, "tumor.safetensors", "resnet18", 1)

Labels come from annotation polygons: a patch is tumor when at least ``min_overlap`` of
its square lies in tumor, normal when at most ``max_normal_overlap`` does, and left out
(-1) in between, because annotation borders are drawn by hand and a patch straddling
one would teach the model the annotator's pen stroke.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import shapely
import torch
from shapely.geometry.base import BaseGeometry
from torch import nn

from wsipipe.inference import resolve_device, resolve_precision, to_tensor
from wsipipe.model import build_model

Progress = Callable[[int, int], None]
AMBIGUOUS = -1


def label_patches(
    coords: np.ndarray,
    patch_size_l0: float,
    tumor: BaseGeometry | None,
    min_overlap: float = 0.5,
    max_normal_overlap: float = 0.1,
) -> np.ndarray:
    """int8 label per patch from its level-0 square ``[x, x+size) x [y, y+size)``:
    1 = tumor (fraction of the square inside ``tumor`` >= ``min_overlap``), 0 = normal
    (fraction <= ``max_normal_overlap``), -1 = ambiguous (left out of training)."""
    if not 0.0 <= max_normal_overlap < min_overlap <= 1.0:
        raise ValueError(f"need 0 <= max_normal_overlap ({max_normal_overlap}) < min_overlap ({min_overlap}) <= 1")
    labels = np.zeros(len(np.asarray(coords).reshape(-1, 2)), dtype=np.int8)
    if tumor is None or tumor.is_empty or len(labels) == 0:
        return labels
    overlap = overlap_fraction(coords, patch_size_l0, tumor)
    labels[overlap > max_normal_overlap] = AMBIGUOUS
    labels[overlap >= min_overlap] = 1
    return labels


def overlap_fraction(coords: np.ndarray, patch_size_l0: float, region: BaseGeometry) -> np.ndarray:
    """Fraction (0..1) of each level-0 square ``[x, x+size) x [y, y+size)`` inside ``region``."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if region is None or region.is_empty or len(coords) == 0:
        return np.zeros(len(coords))
    x, y = coords[:, 0], coords[:, 1]
    squares = shapely.box(x, y, x + patch_size_l0, y + patch_size_l0)
    shapely.prepare(region)
    # Only squares crossing the region's border need an exact intersection: on a slide most
    # patches are clear of it or deep inside it, and the prepared predicates are cheap.
    touching = shapely.intersects(region, squares)
    inside = touching & shapely.contains_properly(region, squares)
    border = np.flatnonzero(touching & ~inside)
    overlap = inside.astype(np.float64)
    overlap[border] = shapely.area(shapely.intersection(squares[border], region)) / float(patch_size_l0) ** 2
    return overlap


def augment(patches: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per patch: a random ``size`` crop, a random 90° rotation and a random flip.

    Tissue has no orientation, so the 8 symmetries of the square are free extra data."""
    n, h, w, c = patches.shape
    size = min(size, h, w)
    out = np.empty((n, size, size, c), dtype=patches.dtype)
    for j in range(n):
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        crop = np.rot90(patches[j, top : top + size, left : left + size], k=int(rng.integers(4)))
        out[j] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def fit_classifier(
    patches: np.ndarray,
    labels: np.ndarray,
    arch: str = "resnet18",
    num_classes: int = 1,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    train_size: int | None = 128,
    progress: Progress | None = None,
) -> nn.Module:
    """Fit a from-scratch ``arch`` (``weights=None``) on (N, H, W, 3) uint8 patches.

    ``labels``: 0/1 for ``num_classes=1`` (one logit, BCE), class indices for more
    (cross-entropy); -1 = ambiguous, skipped. Each epoch draws N patches class-balanced
    (tumor is the minority on most slides). AdamW with a one-cycle schedule; bf16
    autocast where the hardware has it. BatchNorm statistics are re-estimated on whole
    patches at the end (:func:`recalibrate_batchnorm`). Returns the model in eval mode.

    ``train_size`` trains on random crops of that edge at full resolution, not on
    downscaled patches: the network is fully convolutional with global pooling, so it
    classifies whole patches at inference at the same µm per pixel it learned, and a
    128-px crop costs a third of a 224-px patch per step. None = whole patches.

    Deterministic for a given ``seed`` on a given machine (same init, sampling, crops)."""
    patches = np.asarray(patches)
    labels = np.asarray(labels).astype(np.int64)
    if patches.ndim != 4 or len(labels) != len(patches):
        raise ValueError(f"need (N, H, W, 3) patches and N labels, got {patches.shape} and {labels.shape}")
    keep = np.flatnonzero(labels >= 0)
    classes, counts = np.unique(labels[keep], return_counts=True)
    n_out = max(num_classes, 2)
    if len(classes) < 2 or classes[-1] >= n_out:
        raise ValueError(f"need labels from at least two of the classes 0..{n_out - 1} (got {classes.tolist()})")

    torch.manual_seed(seed)  # the initial weights
    rng = np.random.default_rng(seed)  # sampling, crops, flips
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = build_model(arch, num_classes).to(dev).to(memory_format=torch.channels_last)
    # Class-balanced: each class is drawn equally often, whatever its count.
    weights = 1.0 / counts[np.searchsorted(classes, labels[keep])]
    weights /= weights.sum()
    # A last batch of one is dropped: BatchNorm can't normalise a single sample.
    starts = [b for b in range(0, len(keep), batch_size) if len(keep) - b >= 2]
    total = epochs * len(starts)
    # fused: one kernel over all 11M parameters instead of a loop of small ones (~3x faster steps on CPU).
    fused = dev.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=fused)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    loss_fn = nn.BCEWithLogitsLoss() if num_classes == 1 else nn.CrossEntropyLoss()
    model.train()
    step = 0
    for _ in range(epochs):
        order = rng.choice(keep, size=len(keep), replace=True, p=weights)
        for b in starts:
            idx = order[b : b + batch_size]
            batch = augment(patches[idx], train_size or patches.shape[1], rng)
            x = to_tensor(batch, dev).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(labels[idx], device=dev)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x).float()
            loss = loss_fn(logits[:, 0], y.float()) if num_classes == 1 else loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total)
    sample = rng.choice(keep, size=min(len(keep), 256), replace=False, p=weights)
    recalibrate_batchnorm(model, patches, np.sort(sample), max(batch_size, 2), dev, dtype)
    return model.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, patches: np.ndarray, idx: np.ndarray, batch_size: int,
                          device: torch.device, dtype: torch.dtype | None) -> None:
    """Re-estimate BatchNorm statistics on whole, unaugmented patches ``idx``.

    Training leaves running averages that lag the last weights (few hundred steps, momentum
    0.1) and were taken on crops; inference normalises whole patches with them. An exact
    average over whole patches costs one forward pass and fixes both."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for b in range(0, len(idx), batch_size):
            if len(idx[b : b + batch_size]) >= 2:
                model(to_tensor(patches[idx[b : b + batch_size]], device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
