"""Minimal supervised fit of a patch classifier (the demo's; the training issue generalises it).

Labels come from annotation polygons: a patch is tumor when most of its square lies in
a tumor polygon, normal when almost none of it does, and left out in between.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import shapely
import torch
from shapely.geometry.base import BaseGeometry
from torch import nn

from wsipipe.inference import resolve_device, resolve_precision, to_tensor
from wsipipe.model import build_model

Progress = Callable[[int, int], None]


def label_patches(
    coords: np.ndarray, patch_size_l0: float, tumor: BaseGeometry, min_overlap: float = 0.5, max_normal_overlap: float = 0.1
) -> np.ndarray:
    """int8 label per patch: 1 = tumor (overlap fraction >= min_overlap), 0 = normal
    (overlap <= max_normal_overlap), -1 = ambiguous (left out of training)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    squares = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + patch_size_l0, coords[:, 1] + patch_size_l0)
    if tumor.is_empty:
        return np.zeros(len(coords), dtype=np.int8)
    shapely.prepare(tumor)
    overlap = shapely.area(shapely.intersection(squares, tumor)) / (patch_size_l0 * patch_size_l0)
    labels = np.full(len(coords), -1, dtype=np.int8)
    labels[overlap >= min_overlap] = 1
    labels[overlap <= max_normal_overlap] = 0
    return labels


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations: tissue has no orientation."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (1,), generator=gen).item())
    return torch.rot90(x, k, dims=(2, 3)) if k else x


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
    train_size: int | None = 112,
    progress: Progress | None = None,
) -> nn.Module:
    """Fit a from-scratch ``arch`` on (N, H, W, 3) uint8 patches with int labels.

    Class-balanced sampling (tumor is the minority on most slides); AdamW with a cosine
    schedule; bf16 autocast where the hardware has it. ``train_size`` trains on random
    crops of that edge at full resolution (the network is fully convolutional with global
    pooling, so it runs on whole patches at inference, at the same scale): 4x less
    compute per step on a CPU for 112 of 224 px."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = np.asarray(labels)
    if len(labels) != len(patches) or len(labels) == 0:
        raise ValueError("need as many labels as patches, and at least one")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    model = build_model(arch, num_classes).to(dev).to(memory_format=torch.channels_last)
    classes, counts = np.unique(labels, return_counts=True)
    weights = torch.tensor(1.0 / counts[np.searchsorted(classes, labels)], dtype=torch.double)
    steps_per_epoch = max(1, math.ceil(len(labels) / batch_size))
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    loss_fn = nn.BCEWithLogitsLoss() if num_classes == 1 else nn.CrossEntropyLoss()
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.multinomial(weights, len(labels), replacement=True, generator=gen).numpy()
        for b in range(0, len(order), batch_size):
            idx = np.sort(order[b : b + batch_size])
            x = to_tensor(patches[idx], dev)
            if train_size and x.shape[-1] > train_size:
                top, left = (int(v) for v in torch.randint(0, x.shape[-1] - train_size + 1, (2,), generator=gen))
                x = x[:, :, top : top + train_size, left : left + train_size]
            x = _augment(x, gen).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(labels[idx], device=dev)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                logits = model(x)
            logits = logits.float()
            loss = loss_fn(logits[:, 0], y.float()) if num_classes == 1 else loss_fn(logits, y.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total)
    model.eval()
    return model
