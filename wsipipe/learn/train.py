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

import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import torch
from shapely.geometry.base import BaseGeometry
from torch import nn

from wsipipe.errors import ParameterError, TrainingDataError
from wsipipe.geometry import overlap_fraction
from wsipipe.models.inference import predict_patches, resolve_device, resolve_precision, to_tensor
from wsipipe.models.model import build_model

if TYPE_CHECKING:
    from typing_extensions import Unpack

Progress = Callable[[int, int], None]
StepLog = Callable[[int, int, float, float], None]  # step, total, loss, patches per second
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
        raise ParameterError(None, f"need 0 <= max_normal_overlap ({max_normal_overlap}) < min_overlap ({min_overlap}) <= 1")
    labels = np.zeros(len(np.asarray(coords).reshape(-1, 2)), dtype=np.int8)
    if tumor is None or tumor.is_empty or len(labels) == 0:
        return labels
    overlap = overlap_fraction(coords, patch_size_l0, tumor)
    labels[overlap > max_normal_overlap] = AMBIGUOUS
    labels[overlap >= min_overlap] = 1
    return labels


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


@dataclass(frozen=True)
class FitOptions:
    """What a fit is: the architecture, the schedule and where it runs (see :func:`fit_classifier`)."""

    arch: str = "resnet18"
    num_classes: int = 1  # 1 = one logit (BCE); more = cross-entropy over class indices
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    train_size: int | None = 128  # edge of the random training crops; None = whole patches

    @classmethod
    def from_train_config(cls, cfg: Any, num_classes: int) -> FitOptions:
        """The options of a :class:`wsipipe.config.TrainConfig` (``train`` section)."""
        return cls(arch=cfg.arch, num_classes=num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                   seed=cfg.seed, device=cfg.device, precision=cfg.precision, train_size=cfg.train_size)


@dataclass(frozen=True)
class FitHooks:
    """Where a fit starts from and who hears of it (retraining, progress bars, early stopping)."""

    progress: Progress | None = None  # (step, total steps)
    model: nn.Module | None = None  # start from these weights instead of a fresh ``arch``
    augmenter: Callable[[np.ndarray, int], np.ndarray] | None = None  # (batch, seed) after crops and flips
    on_step: StepLog | None = None
    on_epoch: Callable[[int, nn.Module], bool] | None = None  # True stops training


class FitKeywords(TypedDict, total=False):
    """The keyword form of :class:`FitOptions` and :class:`FitHooks` (``fit_classifier(..., epochs=3)``)."""

    arch: str
    num_classes: int
    epochs: int
    batch_size: int
    lr: float
    seed: int
    device: str
    precision: str
    train_size: int | None
    progress: Progress | None
    model: nn.Module | None
    augmenter: Callable[[np.ndarray, int], np.ndarray] | None
    on_step: StepLog | None
    on_epoch: Callable[[int, nn.Module], bool] | None


def fit_settings(
    options: FitOptions | None = None, hooks: FitHooks | None = None, **keywords: Unpack[FitKeywords]
) -> tuple[FitOptions, FitHooks]:
    """Options and hooks, with any keyword given replacing its field."""
    options, hooks = options or FitOptions(), hooks or FitHooks()
    option_names, hook_names = {f.name for f in fields(FitOptions)}, {f.name for f in fields(FitHooks)}
    given: dict[str, Any] = dict(keywords)
    unknown = set(given) - option_names - hook_names
    if unknown:
        raise TypeError(f"fit_classifier() got unexpected keyword arguments {sorted(unknown)}")
    options = replace(options, **{k: v for k, v in given.items() if k in option_names})
    hooks = replace(hooks, **{k: v for k, v in given.items() if k in hook_names})
    return options, hooks


def fit_classifier(
    patches: np.ndarray,
    labels: np.ndarray,
    options: FitOptions | None = None,
    hooks: FitHooks | None = None,
    **keywords: Unpack[FitKeywords],
) -> nn.Module:
    """Fit a from-scratch ``arch`` (``weights=None``) on (N, H, W, 3) uint8 patches.

    ``options`` (:class:`FitOptions`) says what to fit, ``hooks`` (:class:`FitHooks`) where
    from and who to tell; any of their fields may be given as a keyword instead
    (``fit_classifier(patches, labels, epochs=3, device="cpu")``).

    ``labels``: 0/1 for ``num_classes=1`` (one logit, BCE), class indices for more
    (cross-entropy); -1 = ambiguous, skipped. Each epoch draws N patches class-balanced
    (tumor is the minority on most slides). AdamW with a one-cycle schedule; bf16
    autocast where the hardware has it. BatchNorm statistics are re-estimated on whole
    patches at the end (:func:`recalibrate_batchnorm`). Returns the model in eval mode.

    ``train_size`` trains on random crops of that edge at full resolution, not on
    downscaled patches: the network is fully convolutional with global pooling, so it
    classifies whole patches at inference at the same µm per pixel it learned, and a
    128-px crop costs a third of a 224-px patch per step. None = whole patches.

    Deterministic for a given ``seed`` on a given machine (same init, sampling, crops).

    Retraining hooks: ``model`` starts from given weights instead of a fresh ``arch``;
    ``augmenter(batch, seed)`` runs after the crop and flips (e.g. a
    :class:`wsipipe.learn.augment.Augmenter`); ``on_step(step, total, loss, patches_per_s)``;
    ``on_epoch(epoch, model)`` after each epoch, returning True stops training."""
    opts, hooks = fit_settings(options, hooks, **keywords)
    num_classes, seed = opts.num_classes, opts.seed
    patches = np.asarray(patches)
    labels = np.asarray(labels).astype(np.int64)
    if patches.ndim != 4 or len(labels) != len(patches):
        raise TrainingDataError(None, f"need (N, H, W, 3) patches and N labels, got {patches.shape} and {labels.shape}")
    keep = np.flatnonzero(labels >= 0)
    classes, counts = np.unique(labels[keep], return_counts=True)
    n_out = max(num_classes, 2)
    if len(classes) < 2 or classes[-1] >= n_out:
        raise TrainingDataError(None, f"need labels from at least two of the classes 0..{n_out - 1} (got {classes.tolist()})")

    torch.manual_seed(seed)  # the initial weights
    rng = np.random.default_rng(seed)  # sampling, crops, flips
    dev = resolve_device(opts.device)
    dtype = resolve_precision(opts.precision, dev)
    start = hooks.model if hooks.model is not None else build_model(opts.arch, num_classes)
    model = start.to(dev).to(memory_format=torch.channels_last)
    # Class-balanced: each class is drawn equally often, whatever its count.
    weights = 1.0 / counts[np.searchsorted(classes, labels[keep])]
    weights /= weights.sum()
    run = _FitRun(opts, hooks, model, dev, dtype, patches, labels, rng)
    run.train(keep, weights)
    sample = rng.choice(keep, size=min(len(keep), 256), replace=False, p=weights)
    recalibrate_batchnorm(model, patches, np.sort(sample), max(opts.batch_size, 2), dev, dtype)
    return model.eval()


class _FitRun:
    """The training loop of one :func:`fit_classifier` call: optimiser, schedule, steps, epochs."""

    def __init__(
        self, opts: FitOptions, hooks: FitHooks, model: nn.Module, dev: torch.device, dtype: torch.dtype | None,
        patches: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
    ):
        self.opts, self.hooks, self.model, self.dev, self.dtype = opts, hooks, model, dev, dtype
        self.patches, self.labels, self.rng = patches, labels, rng
        self.loss_fn: nn.Module = nn.BCEWithLogitsLoss() if opts.num_classes == 1 else nn.CrossEntropyLoss()
        # fp16 autocast (CUDA GPUs without bf16) needs loss scaling; bf16 and fp32 don't.
        self.scaler = torch.amp.GradScaler(dev.type, enabled=dtype is torch.float16)
        self.step = 0
        self.total = 0
        self.t0 = time.perf_counter()

    def train(self, keep: np.ndarray, weights: np.ndarray) -> None:
        opts, model = self.opts, self.model
        # A last batch of one is dropped: BatchNorm can't normalise a single sample.
        starts = [b for b in range(0, len(keep), opts.batch_size) if len(keep) - b >= 2]
        self.total = opts.epochs * len(starts)
        # fused: one kernel over all 11M parameters instead of a loop of small ones (~3x faster steps on CPU).
        fused = self.dev.type in ("cpu", "cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=1e-4, fused=fused)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=self.total, pct_start=0.2)
        model.train()
        self.t0 = time.perf_counter()
        for epoch in range(opts.epochs):
            order = self.rng.choice(keep, size=len(keep), replace=True, p=weights)
            for b in starts:
                self._step(order[b : b + opts.batch_size], opt, sched)
            if self.hooks.on_epoch is not None and self.hooks.on_epoch(epoch, model):
                model.train()
                break
            model.train()

    def _step(self, idx: np.ndarray, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
        opts, hooks, dev, dtype = self.opts, self.hooks, self.dev, self.dtype
        batch = augment(self.patches[idx], opts.train_size or self.patches.shape[1], self.rng)
        if hooks.augmenter is not None:
            batch = hooks.augmenter(batch, opts.seed * 1_000_003 + self.step)
        x = to_tensor(batch, dev).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(self.labels[idx], device=dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = self.model(x).float()
        loss = self.loss_fn(logits[:, 0], y.float()) if opts.num_classes == 1 else self.loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()
        sched.step()
        self.step += 1
        if hooks.progress:
            hooks.progress(self.step, self.total)
        if hooks.on_step:
            rate = self.step * opts.batch_size / max(time.perf_counter() - self.t0, 1e-9)
            hooks.on_step(self.step, self.total, float(loss.detach()), rate)


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
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def initial_model(arch: str, num_classes: int, init: str = "scratch", path=None, registry=None) -> tuple[nn.Module, dict]:
    """The model retraining starts from, and a record of where it came from.

    ``scratch``: random init. ``encoder``: a pretraining checkpoint's encoder
    (:func:`wsipipe.learn.pretrain.load_encoder`) under a fresh head. ``weights``: a local
    weights file (its head too when the class count matches). ``production``: the
    registry's production model. Files are read as safetensors or ``weights_only`` torch
    state dicts: a checkpoint that pickles code is refused (:class:`ModelLoadError`)."""
    from wsipipe.errors import ModelLoadError
    from wsipipe.models.model import _head_key, file_sha256, load_model

    model = build_model(arch, num_classes)
    if init == "scratch":
        return model, {"init": "scratch"}
    if init == "encoder":
        from wsipipe.learn.pretrain import load_encoder

        encoder, meta = load_encoder(path)
        if meta["arch"] != arch:
            raise ModelLoadError(path, f"encoder is {meta['arch']}, training asks for {arch}")
        missing, _ = model.load_state_dict(encoder.state_dict(), strict=False)
        head = _head_key(model).rsplit(".", 1)[0]
        if any(not k.startswith(head + ".") for k in missing):
            raise ModelLoadError(path, f"encoder does not fit {arch}: missing {missing[:3]}")
        return model, {"init": "encoder", "path": str(path), "method": meta.get("method"), "step": meta.get("step"),
                       "data": (meta.get("data") or {}).get("hash")}
    if init == "production":
        from wsipipe.learn.registry import production

        entry = production(registry)
        if entry is None:
            raise ModelLoadError(registry, "registry has no production model to start from")
        path = entry["weights"]
    if init not in ("weights", "production") or path is None:
        raise ModelLoadError(path, f"init={init!r} needs a path (encoder / weights) or a registry (production)")
    source, info = load_model(path, arch)
    state = source.state_dict()
    if info.num_classes != num_classes:  # different classes: keep the body, fresh head
        head = _head_key(model).rsplit(".", 1)[0] + "."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
    model.load_state_dict(state, strict=False)
    return model, {"init": init, "path": str(path), "sha256": file_sha256(path)}


@dataclass
class _Best:
    """The best model of a retraining so far (by validation AUC, ties by validation log-loss)."""

    auc: float = -np.inf
    loss: float = np.inf
    model: nn.Module | None = None
    epoch: int = -1
    probs: np.ndarray | None = None  # its validation probabilities

    def beaten_by(self, auc: float, loss: float) -> bool:
        if self.model is None or auc > self.auc:
            return True
        return auc == self.auc and loss < self.loss

    def record(self, history: list[dict], epoch: int, probs: np.ndarray, labels: np.ndarray, train_losses: list[float],
               model: Callable[[], nn.Module]) -> None:
        """Score an epoch's validation probabilities, add its row to ``history``, and keep it when
        it is the best so far (``model()``: the epoch's model as kept, called only then)."""
        from wsipipe.learn.metrics import auc, balanced_log_loss

        score = auc(probs, labels) if len(labels) else float("nan")
        score = -np.inf if np.isnan(score) else score
        val_loss = balanced_log_loss(probs, labels)
        val_loss = np.inf if np.isnan(val_loss) else val_loss
        history.append({"epoch": epoch, "val_auc": float(score), "val_log_loss": float(val_loss),
                        "train_loss": float(np.mean(train_losses[-50:] or [np.nan]))})
        if self.beaten_by(float(score), float(val_loss)):
            self.auc, self.loss, self.model, self.epoch, self.probs = float(score), float(val_loss), model(), epoch, probs


def retrain(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], cfg, num_classes: int,
    model: nn.Module | None = None, augmenter=None, on_step: StepLog | None = None,
) -> tuple[nn.Module, list[dict], int]:
    """Fine-tune on ``train`` = (patches, labels), early-stopping on the validation AUC.

    After each epoch a copy of the model gets exact BatchNorm statistics and is scored on
    ``val``: the best copy (higher AUC; at equal AUC lower class-balanced log-loss, so a model
    that separates val perfectly from its first epoch still improves) is returned with the
    per-epoch history and its epoch. Training stops after ``cfg.patience`` epochs without a
    better copy, never before ``cfg.min_epochs``. ``cfg`` is a TrainConfig."""
    model, history, best = _retrain(train, val, cfg, num_classes, model, augmenter, on_step)
    return model, history, best.epoch


def _retrain(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], cfg, num_classes: int,
    model: nn.Module | None = None, augmenter=None, on_step: StepLog | None = None,
) -> tuple[nn.Module, list[dict], _Best]:
    import copy

    (xtr, ytr), (xva, yva) = train, val
    dev = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, dev)
    keep = np.flatnonzero(np.asarray(ytr) >= 0)
    rng = np.random.default_rng(cfg.seed + 1)
    bn_sample = np.sort(rng.choice(keep, size=min(len(keep), 256), replace=False))
    history: list[dict] = []
    best = _Best()
    losses: list[float] = []
    min_epochs = getattr(cfg, "min_epochs", 1)

    def step_log(step, total, loss, rate):
        losses.append(loss)
        if on_step:
            on_step(step, total, loss, rate)

    def epoch_end(epoch: int, current: nn.Module) -> bool:
        snapshot = copy.deepcopy(current)
        recalibrate_batchnorm(snapshot, xtr, bn_sample, cfg.batch_size, dev, dtype)
        best.record(history, epoch, predict_patches(snapshot, xva, dev), yva, losses, lambda: snapshot)
        return epoch + 1 >= min_epochs and epoch - best.epoch >= cfg.patience

    fit_classifier(xtr, ytr, FitOptions.from_train_config(cfg, num_classes),
                   FitHooks(model=model, augmenter=augmenter, on_step=step_log, on_epoch=epoch_end))
    if best.model is None:  # epoch_end keeps a model after the first epoch
        raise TrainingDataError(None, "retraining ran no epoch (no training patches)")
    return best.model.eval(), history, best


CARD_FORMAT = "wsipipe-model-card-1"
DOMAIN_PATCHES = 4000  # training patches the feature-space reference is fitted on (at most)


@torch.no_grad()
def training_domain(
    model: nn.Module, patches: np.ndarray, device: str = "auto", seed: int = 0, limit: int = DOMAIN_PATCHES,
    batch_size: int = 64, augmenter: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """The out-of-domain reference (:func:`wsipipe.models.domain.fit_domain`) of ``model``'s
    features on (up to ``limit`` of) its training ``patches``, as inference computes them (eval
    mode, the same input normalisation); None when the model has no classification layer to tap
    or there are too few patches.

    ``augmenter(batch, seed)`` (an :class:`wsipipe.learn.augment.Augmenter`): each patch once more
    as augmented, in the same held-out group. The stain and colour of one training slide is one
    point of the range slides of its kind span; without its augmented copies the reference is
    that tight (the demo model put 8-38 % of other generated slides' patches beyond p99, 0-0.7 %
    with them; the real slides stay at 100 %)."""
    from wsipipe.models.domain import FeatureTap, fit_domain, view_widths

    if len(patches) < 10:
        return None
    dev = resolve_device(device)
    idx = np.sort(np.random.default_rng(seed).choice(len(patches), min(len(patches), limit), replace=False))
    model = model.eval().to(dev)
    tap = FeatureTap.attach(model)
    if tap is None:
        return None
    passes = [None] if augmenter is None else [None, augmenter]
    with tap:
        run = tap.wrap(model)
        parts, groups = [], []
        for aug in passes:
            for b in range(0, len(idx), batch_size):
                batch = patches[idx[b : b + batch_size]]
                run(to_tensor(batch if aug is None else aug(batch, seed * 1_000_003 + b), dev))
                feats = tap.take()
                if feats is not None:
                    parts.append(feats.cpu().numpy())
                    groups.append(np.arange(b, b + len(feats)))
    layer = next((name for name, m in model.named_modules() if m is tap.layer), None)
    return fit_domain(np.concatenate(parts), views=view_widths(model), seed=seed, layer=layer, groups=np.concatenate(groups))


def store_provenance(stores: list) -> dict[str, Any]:
    """What the model card says of the training stores: ``training_data`` in words, and the
    ``mpp`` / ``patch_size`` they were tiled at (None where the stores disagree)."""
    from pathlib import Path

    from wsipipe.tiles import store

    names, mpps, sizes = [], set(), set()
    for path in stores:
        meta = store.meta(store.open_store(path))
        slide, tile = meta.get(store.META_SLIDE) or {}, meta.get(store.META_TILE) or {}
        names.append(str(slide.get("name") or Path(str(slide.get("path") or path)).name))
        mpps.add(tile.get("mpp"))
        sizes.add(tile.get("patch_size"))
    mpp = mpps.pop() if len(mpps) == 1 else None
    size = sizes.pop() if len(sizes) == 1 else None
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    words = f"labelled patches of {len(names)} slide{'s' if len(names) != 1 else ''}: {shown}"
    if mpp:
        words += f" (tiled at {float(mpp):g} µm/px" + (f", {int(size)} px patches)" if size else ")")
    return {"training_data": words, "mpp": float(mpp) if mpp else None, "patch_size": int(size) if size else None}


def _counts(labels: np.ndarray, classes: list[str]) -> str:
    return ", ".join(f"{name} {int(np.count_nonzero(labels == k))}" for k, name in enumerate(classes))


def train_model(stores: list, out_dir, cfg, progress: StepLog | None = None) -> dict:
    """Labelled stores -> split by slide/group -> retrain -> held-out metrics -> weights + model card.

    ``cfg`` is the whole PipelineConfig (train, augment). Writes ``out_dir/model.safetensors``
    and ``out_dir/card.json``; returns the card."""
    import datetime
    import json
    from pathlib import Path

    from wsipipe import __version__
    from wsipipe.learn.augment import Augmenter
    from wsipipe.files import write_atomic
    from wsipipe.learn.metrics import choose_threshold, classification_metrics
    from wsipipe.models.model import save_weights
    from wsipipe.learn.patchsets import load_patch_sets, split_identity, split_patch_set
    from wsipipe.models.card import Normalisation

    tc = cfg.train
    where = ", ".join(map(str, stores))
    data = load_patch_sets(stores)
    try:
        split = split_patch_set(data, tc.split, tc.split_by, tc.seed)
    except TrainingDataError as exc:
        raise TrainingDataError(None, f"{where}: {exc.problem}") from None
    splits = split.indices
    for name in ("train", "val", "test"):  # val picks the epoch and the threshold, test reports
        if len(splits[name]) == 0:
            raise TrainingDataError(None, f"{where}: split {name!r} is empty (train.split {tuple(tc.split)}); "
                                    "training needs train, val and test")
    if len(np.unique(data.labels[splits["train"]])) < 2:
        raise TrainingDataError(None, f"{where}: the training split has labelled patches of "
                                f"{len(np.unique(data.labels[splits['train']]))} class(es) of {data.classes} "
                                f"(class counts: {_counts(data.labels, data.classes)}); need at least two")
    num_classes = 1 if len(data.classes) == 2 else len(data.classes)
    model, init = initial_model(tc.arch, num_classes, tc.init, tc.init_path, tc.registry)
    tr, va, te = (data.subset(splits[k]) for k in ("train", "val", "test"))
    stain = None
    if cfg.augment.stain_normalise != "none":
        # fitted on the training slides only: the held-out ones must not shape the preprocessing
        from wsipipe.models.stain import fit_stain_normaliser

        ref = np.random.default_rng(tc.seed).choice(len(tr.patches), min(len(tr.patches), 64), replace=False)
        stain = fit_stain_normaliser(cfg.augment.stain_normalise, tr.patches[np.sort(ref)])
        for part in (tr, va, te):
            part.patches = stain.apply(part.patches)
    model, history, best = _retrain((tr.patches, tr.labels), (va.patches, va.labels), tc, num_classes, model,
                                    Augmenter(cfg.augment), progress)
    # The decision threshold of the tumor class (the last, as stitch.class_index), chosen on val.
    chosen = choose_threshold(best.probs, va.labels, tc.threshold_metric) if best.probs is not None else None
    threshold = None if chosen is None else round(chosen[0], 6)
    probs = predict_patches(model, te.patches, resolve_device(tc.device))
    metrics = classification_metrics(probs, te.labels, threshold=threshold)
    out_dir = Path(out_dir)
    where_xy = data.coords if split.by == "spatial" else None
    info = save_weights(model, out_dir / "model.safetensors", tc.arch, num_classes, {"classes": json.dumps(data.classes)})
    card = {
        "format": CARD_FORMAT, "wsipipe_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "arch": tc.arch, "num_classes": num_classes, "classes": data.classes, "weights_sha256": info.sha256,
        "init": init, "config": {"train": tc.model_dump(mode="json"), "augment": cfg.augment.model_dump(mode="json")},
        "config_hash": cfg.section_hash("train", "augment"),
        "data": {"identity": data.identity, "stores": [str(s) for s in stores],
                 "splits": {k: {"n": int(len(v)), "groups": sorted(set(data.groups[v].tolist())),
                               "class_counts": {c: int(np.count_nonzero(data.labels[v] == j)) for j, c in enumerate(data.classes)},
                               "split_id": split_identity(data.groups, v, where_xy)} for k, v in splits.items()}},
        "split": split.describe(),
        "test_split_id": split_identity(data.groups, splits["test"], where_xy),
        "history": history, "best_epoch": best.epoch,
        "threshold": threshold,
        "threshold_selection": {"split": "val", "metric": tc.threshold_metric,
                                "value": None if chosen is None else chosen[1],
                                "note": None if chosen is not None else "val lacks a class: no threshold chosen"},
        "test_metrics": metrics,
        "stain_normalisation": stain.to_dict() if stain else None,
        **store_provenance(stores),
        "normalisation": Normalisation().model_dump(mode="json"),
        # the training patches in feature space, for the out-of-domain flag at inference
        "domain": training_domain(model, tr.patches, tc.device, tc.seed, augmenter=Augmenter(cfg.augment)),
    }
    write_atomic(out_dir / "card.json", json.dumps(card, indent=2))
    return card
