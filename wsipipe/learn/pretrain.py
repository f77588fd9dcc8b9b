"""Self-supervised pretraining of a patch encoder: SimCLR, BYOL and SwAV, on unlabelled
patches streamed from any number of Zarr stores; checkpoints that resume; a linear probe.

    result = pretrain(["a.zarr", "b.zarr"], "runs/simclr", cfg.pretrain, cfg.augment)
    encoder, meta = load_encoder("runs/simclr")          # safetensors + JSON, never pickle
    probe = linear_probe(encoder, labelled_train, labelled_test)   # accuracy / AUC

Checkpoint folder: ``encoder.safetensors`` (the encoder alone: what fine-tuning starts
from), ``state.safetensors`` (every network and the optimiser's tensors, to resume) and
``checkpoint.json`` (method, config, data identity, step, loss history, optimiser
hyper-parameters), written in that order, each atomically: the JSON is the marker, so an
interruption mid-write resumes from the previous complete checkpoint. A resumed run draws
the same batches and augmentations as an uninterrupted one (both are seeded by step).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from wsipipe.tiles import store
from wsipipe.learn.augment import Augmenter
from wsipipe.config import AugmentConfig, PretrainConfig
from wsipipe.errors import (AnnotationError, ConfigError, ModelLoadError, OutputWriteError, ParameterError, StoreError,
                            TrainingDataError)
from wsipipe.models.inference import resolve_device, resolve_precision, to_tensor
from wsipipe.models.model import _head, build_model, _read_state
from wsipipe.files import write_atomic
from wsipipe.tiles.tiling import reads_from_slide, stored_patches

FORMAT = "wsipipe-encoder-1"
# Config fields a run may change and still resume: how long it runs, how often it saves, where.
RUN_CONTROL = ("steps", "checkpoint_every", "device", "precision")
# (step, total, loss, patches per second) -> None
PretrainProgress = Callable[[int, int, float, float], None]


def build_encoder(arch: str) -> tuple[nn.Module, int]:
    """A torchvision model with its classification layer replaced by identity; (encoder, feature dim)."""
    model = build_model(arch, 1)
    parent, name = _head(model)
    layer = getattr(parent, name)
    if not isinstance(layer, nn.Linear):
        raise ParameterError(None, f"{arch}: only architectures with a linear head can be used as encoders")
    setattr(parent, name, nn.Identity())
    return model, layer.in_features


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross entropy: each view must pick its partner
    among the 2N-1 other views of the batch."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(prediction, target projection), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()


class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, cfg: PretrainConfig):
        super().__init__()
        self.encoder, self.projector, self.temperature = encoder, mlp(dim, cfg.hidden_dim, cfg.projection_dim), cfg.effective_temperature()

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([v1, v2]))).chunk(2)
        return nt_xent(z1, z2, self.temperature)

    def after_step(self, step: int, total: int) -> None:
        pass


class BYOL(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, cfg: PretrainConfig):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(dim, cfg.hidden_dim, cfg.projection_dim)
        self.predictor = mlp(cfg.projection_dim, cfg.hidden_dim, cfg.projection_dim)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.ema = cfg.ema

    def loss(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        both = torch.cat([v1, v2])
        p1, p2 = self.predictor(self.projector(self.encoder(both))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_encoder(both)).chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        # EMA momentum rises from cfg.ema to 1 on a cosine (BYOL's schedule).
        tau = 1 - (1 - self.ema) * (np.cos(np.pi * step / max(total, 1)) + 1) / 2
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                pt.mul_(tau).add_(po.detach(), alpha=1 - tau)
            for bo, bt in zip(online.buffers(), target.buffers(), strict=True):
                bt.copy_(bo)

    def trainable(self):
        return [p for n, p in self.named_parameters() if not n.startswith("target_")]


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's soft codes: (B, K) prototype scores -> (B, K) assignments, each row a
    distribution over the K prototypes (sums to 1) and each prototype given an equal share of
    the batch (columns sum to B / K), as far as ``iterations`` rounds of Sinkhorn-Knopp get.

    The equal share is what keeps every image from landing on one prototype (the collapse a
    plain argmax would allow). ``exp(scores / epsilon)`` is scaled alternately so its
    prototype sums and then its image sums reach their marginals; the last scaling is the
    per-image one, so rows are exact and columns approximate after few rounds."""
    logits = scores.detach().float() / epsilon
    # A constant shift leaves the normalised result unchanged and keeps exp() finite.
    q = torch.exp(logits - logits.max()).T  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k  # each prototype: 1/K of the mass
        q /= q.sum(dim=0, keepdim=True)
        q /= b  # each image: 1/B of the mass
    return (q * b).T


def swapped_prediction(codes: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross entropy between one view's codes and another view's softmax over prototypes."""
    return -(codes * F.log_softmax(scores.float() / temperature, dim=1)).sum(dim=1).mean()


class SwAV(nn.Module):
    """Online clustering: views of one patch must predict each other's prototype codes.

    Codes come from the two full-size views only (as in the paper: small crops see too little
    of the patch to assign it); every view, small crops included, predicts the codes of each
    full-size view other than itself."""

    def __init__(self, encoder: nn.Module, dim: int, cfg: PretrainConfig):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(dim, cfg.hidden_dim, cfg.projection_dim)
        self.prototypes = nn.Linear(cfg.projection_dim, cfg.swav_prototypes, bias=False)
        self.temperature, self.epsilon = cfg.effective_temperature(), cfg.swav_epsilon
        self.iterations, self.freeze_steps = cfg.swav_sinkhorn_iterations, cfg.swav_freeze_steps
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.encoder(x))
        # Scores are cosines scaled by 1/epsilon (20 at the default) before exp(): in fp32.
        with torch.autocast(z.device.type, enabled=False):
            return self.prototypes(F.normalize(z.float(), dim=1))

    def loss(self, v1: torch.Tensor, v2: torch.Tensor, small: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        full = self.scores(torch.cat([v1, v2])).chunk(2)
        views = [*full, *(self.scores(torch.cat(list(small))).chunk(len(small)) if small else ())]
        total, terms = torch.zeros((), device=v1.device), 0
        for i, target in enumerate(full):
            codes = sinkhorn(target, self.epsilon, self.iterations)
            for j, pred in enumerate(views):
                if j != i:
                    total = total + swapped_prediction(codes, pred, self.temperature)
                    terms += 1
        return total / terms

    def before_update(self, step: int) -> None:
        """Called between backward and the optimiser step of step ``step`` (0-based): the
        prototypes take no update during the first ``freeze_steps`` steps, while the
        features are still random and would drag them anywhere."""
        if step < self.freeze_steps:
            self.prototypes.weight.grad = None  # AdamW skips parameters without a gradient

    def after_step(self, step: int, total: int) -> None:
        """``step`` steps are done: put the prototypes back on the unit sphere if they moved
        (renormalising unmoved ones would still change their last bits)."""
        if step > self.freeze_steps:
            self.normalize_prototypes()


class PatchStream:
    """Random batches from several stores, chunk-local: a batch takes a few patches from each
    of several random chunks, so reading costs a few chunk decodes, not one per patch."""

    def __init__(self, paths: Sequence[str | Path], per_chunk: int = 8):
        self.arrays: list[zarr.Array] = []
        self.chunks: list[tuple[int, int, int]] = []  # (array, first patch, end)
        ident: list[list[Any]] = []
        for p in paths:
            g = store.open_store(p)
            arr = stored_patches(g, p) if store.PATCHES in g or reads_from_slide(g) else None
            if arr is None or arr.shape[0] == 0:
                raise StoreError(p, "no patches in this store")
            self.arrays.append(arr)
            n, c = int(arr.shape[0]), int(arr.chunks[0])
            self.chunks += [(len(self.arrays) - 1, s, min(s + c, n)) for s in range(0, n, c)]
            slide = store.meta(g).get(store.META_SLIDE, {})
            ident.append([slide and slide.get("identity"), str(Path(p).name), n])
        shapes = {a.shape[1:] for a in self.arrays}
        if len(shapes) > 1:
            raise StoreError(paths[0], f"stores have different patch shapes {sorted(shapes)}")
        self.per_chunk = per_chunk
        self.identity = {"stores": ident, "hash": hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}

    def batch(self, size: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out: list[np.ndarray] = []
        while sum(len(x) for x in out) < size:
            i, start, stop = self.chunks[int(rng.integers(len(self.chunks)))]
            block = np.asarray(self.arrays[i][start:stop])
            take = min(self.per_chunk, len(block), size - sum(len(x) for x in out))
            out.append(block[rng.choice(len(block), take, replace=False)])
        return np.concatenate(out)


@dataclass
class PretrainResult:
    checkpoint: Path
    losses: list[float]
    resumed_from: int
    steps: int


def _view_config(aug: AugmentConfig, crop: int, patch: int) -> AugmentConfig:
    # Contrastive views need strong colour and geometry changes; the crop is what makes two
    # views of one patch differ in content.
    return aug.model_copy(update={"crop": min(crop, patch), "flip_rot90": True,
                                  "brightness": max(aug.brightness, 0.3), "contrast": max(aug.contrast, 0.3),
                                  "saturation": max(aug.saturation, 0.3), "hue": max(aug.hue, 0.05),
                                  "hed_sigma": max(aug.hed_sigma, 0.1), "blur_p": max(aug.blur_p, 0.3)})


def _small_views(cfg: PretrainConfig, aug: AugmentConfig, patch: int) -> Augmenter | None:
    """SwAV's multi-crop views: random crops of ``swav_small_crop`` px at the patch's own
    resolution (a smaller field of view, not a zoom: magnification carries meaning in
    pathology), with the full views' colour changes. None without small crops."""
    if cfg.method != "swav" or not cfg.swav_small_crops:
        return None
    if cfg.swav_small_crop > cfg.crop:
        raise ConfigError(None, f"pretrain.swav_small_crop {cfg.swav_small_crop} is larger than pretrain.crop {cfg.crop}: "
                          "small crops must not exceed the full views")
    return Augmenter(_view_config(aug, cfg.swav_small_crop, patch))


def pretrain(
    stores: Sequence[str | Path], out_dir: str | Path, cfg: PretrainConfig, aug: AugmentConfig | None = None,
    progress: PretrainProgress | None = None, stop_after: int | None = None, restart: bool = False,
) -> PretrainResult:
    """Run ``cfg.method`` for ``cfg.steps`` steps, checkpointing into ``out_dir`` every
    ``cfg.checkpoint_every`` steps and at the end. A checkpoint already in ``out_dir`` is
    resumed from its step up to ``cfg.steps`` (a run of 200 steps raised to 400 runs steps
    201..400; one already at or past ``cfg.steps`` runs nothing): it must have the same data
    and config apart from :data:`RUN_CONTROL` (steps, checkpoint_every, device, precision),
    else a :class:`ConfigError` names the checkpoint and the differences. ``restart`` ignores
    the checkpoint and starts over at step 0 (overwriting it). ``stop_after`` ends the run
    early (as an interruption would) after that many steps in total."""
    out_dir = Path(out_dir)
    cfg = cfg.resolved()  # the checkpoint records the temperature the run used
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputWriteError(out_dir, "is a file: the checkpoint needs a folder")
    stream = PatchStream(stores)
    patch = stream.arrays[0].shape[1]
    views = Augmenter(_view_config(aug or AugmentConfig(), cfg.crop, patch))
    dev = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, dev)
    torch.manual_seed(cfg.seed)
    encoder, dim = build_encoder(cfg.arch)
    methods: dict[str, type[SimCLR | BYOL | SwAV]] = {"simclr": SimCLR, "byol": BYOL, "swav": SwAV}
    net = methods[cfg.method](encoder, dim, cfg)
    net.to(dev)  # in place: a module's to() moves its own parameters
    small_views = _small_views(cfg, aug or AugmentConfig(), patch)
    params = net.trainable() if isinstance(net, BYOL) else list(net.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-6)
    config = cfg.model_dump(mode="json")
    start, losses = 0, []
    meta_path = out_dir / "checkpoint.json"
    if meta_path.is_file() and not restart:
        meta = _read_meta(meta_path)
        _check_resumable(meta_path, meta, config, stream.identity)
        _load_state(net, opt, out_dir / "state.safetensors", meta)
        start, losses = int(meta["step"]), list(meta["losses"])
    resumed_from = start
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    net.train()
    t0, seen = time.perf_counter(), 0
    for step in range(start, end):
        seed = cfg.seed * 1_000_003 + step
        raw = stream.batch(cfg.batch_size, seed)
        v1 = to_tensor(views(raw, 2 * seed), dev)
        v2 = to_tensor(views(raw, 2 * seed + 1), dev)
        # Seeds of their own, above the full views' (2 * seed + 1 < 2**40 while cfg.seed < 500 000).
        small = [to_tensor(small_views(raw, 2**40 + seed * 16 + k), dev)
                 for k in range(cfg.swav_small_crops)] if small_views else []
        try:
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                loss = net.loss(v1, v2, small) if isinstance(net, SwAV) else net.loss(v1, v2)
        except (AssertionError, RuntimeError) as exc:  # torchvision asserts input sizes (ViT: 224 px)
            if step > start or "out of memory" in str(exc):
                raise
            raise ConfigError(None, f"pretrain.arch={cfg.arch!r} cannot take {tuple(v1.shape[1:])} views "
                              f"(pretrain.crop {cfg.crop}, patches {patch} px): {str(exc)[:200]}") from None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if isinstance(net, SwAV):
            net.before_update(step)
        opt.step()
        net.after_step(step + 1, cfg.steps)
        losses.append(float(loss.detach()))
        seen += len(raw)
        if progress:
            progress(step + 1, cfg.steps, losses[-1], seen / max(time.perf_counter() - t0, 1e-9))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_checkpoint(out_dir, net, opt, cfg, stream.identity, step + 1, losses)
    if end <= start and (restart or not meta_path.is_file()):
        _save_checkpoint(out_dir, net, opt, cfg, stream.identity, start, losses)
    return PretrainResult(out_dir, losses, resumed_from, max(end, start))


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(meta_path, f"unreadable pretraining checkpoint ({exc}); pass --restart to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ModelLoadError(meta_path, "not a wsipipe pretraining checkpoint; pass --restart to start over in this folder")
    return meta


def _check_resumable(meta_path: Path, meta: dict, config: dict, data: dict) -> None:
    """A :class:`ConfigError` naming every difference that forbids resuming from ``meta``."""
    old = meta["config"]
    # A setting added since the checkpoint was written changes nothing while it keeps its
    # default (the SwAV settings, for a SimCLR or BYOL checkpoint of an earlier version).
    defaults = PretrainConfig().model_dump(mode="json")
    old = {**{k: v for k, v in defaults.items() if k not in old and config.get(k) == v}, **old}
    diffs = [f"{k} {repr(old[k]) + ' in' if k in old else 'not in'} the checkpoint, {config.get(k)!r} now"
             for k in sorted(set(old) | set(config)) if k not in RUN_CONTROL and old.get(k) != config.get(k)]
    before = (meta.get("data") or {}).get("stores")
    if (meta.get("data") or {}).get("hash") != data["hash"]:
        diffs.append(f"stores {[s[1] for s in before or []]} in the checkpoint, {[s[1] for s in data['stores']]} now "
                     "(or their contents differ)")
    if diffs:
        raise ConfigError(meta_path, f"cannot resume from this checkpoint (step {meta.get('step')}): "
                          f"{'; '.join(diffs)}; pass --restart to start over (overwrites it) or use another --out")


def _save_checkpoint(out_dir: Path, net: nn.Module, opt: torch.optim.Optimizer, cfg: PretrainConfig,
                     data: dict, step: int, losses: list[float]) -> None:
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    enc = {k: v.detach().cpu().contiguous() for k, v in net.get_submodule("encoder").state_dict().items()}
    write_atomic(out_dir / "encoder.safetensors", save(enc, metadata={"format": FORMAT, "arch": cfg.arch}))
    state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            state[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    write_atomic(out_dir / "state.safetensors", save(state))
    meta = {"format": FORMAT, "method": cfg.method, "arch": cfg.arch, "config": cfg.model_dump(mode="json"),
            "data": data, "step": step, "losses": losses, "optimizer_param_groups": opt_state["param_groups"]}
    write_atomic(out_dir / "checkpoint.json", json.dumps(meta, indent=1))


def _load_state(net: nn.Module, opt: torch.optim.Optimizer, path: Path, meta: dict) -> None:
    if not path.is_file():
        raise ModelLoadError(path, "checkpoint.json is there but its state is missing; pass --restart to start over")
    state, _ = _read_state(path, path.read_bytes())
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")}, strict=True)
    opt_state: dict = {}
    for key, value in state.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": opt_state, "param_groups": meta["optimizer_param_groups"]})


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """The encoder of a pretraining checkpoint (folder or its encoder.safetensors), in eval mode.

    Only safetensors and JSON are read: nothing is unpickled."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / "encoder.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise ModelLoadError(weights, "encoder checkpoint not found")
    state, meta = _read_state(weights, weights.read_bytes())
    if meta.get("format") != FORMAT:
        raise ModelLoadError(weights, f"not a wsipipe encoder checkpoint (format {meta.get('format')!r})")
    encoder, _ = build_encoder(meta["arch"])
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(weights, f"weights do not fit {meta['arch']}: {str(exc)[:200]}") from None
    info = json.loads((folder / "checkpoint.json").read_text()) if (folder / "checkpoint.json").is_file() else {}
    return encoder.eval(), {"arch": meta["arch"], **{k: info.get(k) for k in ("method", "step", "data", "config")}}


@torch.no_grad()
def embed(encoder: nn.Module, patches: np.ndarray, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    dev = torch.device(device)
    encoder = encoder.eval().to(dev)
    feats = [encoder(to_tensor(patches[b : b + batch_size], dev)).float().cpu().numpy()
             for b in range(0, len(patches), batch_size)]
    return np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)


def linear_probe(encoder: nn.Module, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                 epochs: int = 300, lr: float = 0.05, seed: int = 0) -> dict:
    """Logistic regression on frozen features (standardised, full batch, L2): the encoder's
    quality as linear separability. ``train`` / ``test`` are (patches, labels); returns
    accuracy and AUC on ``test`` (and on ``train``)."""
    from wsipipe.learn.metrics import auc

    (xtr, ytr), (xte, yte) = train, test
    if not len(ytr) or not len(yte):
        raise TrainingDataError(None, f"the linear probe needs patches to fit and to score (got {len(ytr)} and {len(yte)})")
    ftr, fte = embed(encoder, xtr), embed(encoder, xte)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    xs_tr, xs_te = torch.from_numpy((ftr - mean) / std), torch.from_numpy((fte - mean) / std)
    n_classes = int(max(ytr.max(), yte.max())) + 1
    torch.manual_seed(seed)
    head = nn.Linear(xs_tr.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-3)
    target = torch.as_tensor(ytr, dtype=torch.long)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(xs_tr), target).backward()
        opt.step()
    with torch.no_grad():
        ptr, pte = torch.softmax(head(xs_tr), 1).numpy(), torch.softmax(head(xs_te), 1).numpy()
    return {"accuracy": float((pte.argmax(1) == yte).mean()), "auc": auc(pte, yte),
            "train_accuracy": float((ptr.argmax(1) == ytr).mean()), "n_train": int(len(ytr)), "n_test": int(len(yte))}


def check_probe_sets(paths: Sequence[str | Path]) -> None:
    """Before pretraining, not after it: each probe store exists and carries labels."""
    for p in paths:
        g = store.open_store(p)
        if store.META_LABELS not in store.meta(g) or store.LABELS not in g:
            raise AnnotationError(p, "store has no labels for the linear probe; run `wsipipe patches` on it first")


def probe_on_sets(checkpoint: str | Path, labelled: Sequence[str | Path], seed: int = 0) -> dict:
    """Linear probe of a checkpoint's encoder on labelled stores; stored as ``probe.json``
    beside it, with ``split`` saying how train and test were drawn.

    Split by slide / group (2/3 of the groups fit the probe, 1/3 score it) when that leaves
    every class in both halves. Otherwise (one slide, or a class on one slide only) spatially
    within the slides (:func:`~wsipipe.learn.patchsets.split_spatial`: blocks of neighbouring
    patches, a one-patch gap between the halves), or by single patches when the stores have
    no positions (folder sets). Train and test are then parts of the same slides, so the
    score flatters the encoder. A :class:`TrainingDataError` with the class counts when no
    split has every class on both sides."""
    from wsipipe.learn.patchsets import load_patch_sets, split_by_group, split_spatial

    encoder, _ = load_encoder(checkpoint)
    data = load_patch_sets(labelled)
    counts = {name: int((data.labels == k).sum()) for k, name in enumerate(data.classes)}
    where = labelled[0] if len(labelled) == 1 else None
    if sum(n > 0 for n in counts.values()) < 2:
        raise TrainingDataError(where, f"the linear probe needs patches of two classes or more; class counts {counts}")
    splits = split_by_group(data.groups, (2, 0, 1), seed)
    train, test = splits["train"], splits["test"]
    n_groups = len(np.unique(data.groups))
    split = f"by slide ({len(np.unique(data.groups[train]))} fit, {len(np.unique(data.groups[test]))} scored)"
    if not _both_sides(data.labels, train, test):
        note = (f"{n_groups} slide(s)/group(s) cannot be split by slide with every class on both sides, so train and test "
                "are parts of the same slide(s) and the score flatters the encoder")
        if data.coords is not None and data.pitch is not None and (data.pitch > 0).all():
            spatial = split_spatial(data.groups, data.coords, data.pitch, data.labels, (2, 0, 1), seed, data.classes)
            train, test = spatial.indices["train"], spatial.indices["test"]
            split = (f"spatial (blocks of {spatial.block_patches}x{spatial.block_patches} patches, a "
                     f"{spatial.gap_patches}-patch gap, {spatial.dropped} patches dropped): {note}")
        else:
            found = _split_patches(data.labels, seed)
            if found is None:
                raise TrainingDataError(where, "the linear probe needs every class on both sides of its split (at least "
                                        f"two patches each); class counts {counts}")
            train, test = found
            split = f"by patch: {note}"
    scores = linear_probe(encoder, (data.patches[train], data.labels[train]),
                          (data.patches[test], data.labels[test]), seed=seed)
    scores["split"] = split
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    write_atomic(folder / "probe.json", json.dumps({**scores, "data": data.identity, "stores": [str(p) for p in labelled]}, indent=1))
    return scores


def _both_sides(labels: np.ndarray, train: np.ndarray, test: np.ndarray) -> bool:
    present = set(np.unique(labels).tolist())
    return set(np.unique(labels[train]).tolist()) == present == set(np.unique(labels[test]).tolist())


def _split_patches(labels: np.ndarray, seed: int, tries: int = 50) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, test) indices, a third of the patches scored, every class on both sides; None
    when ``tries`` seeded draws find no such split."""
    n = len(labels)
    for t in range(tries):
        order = np.random.default_rng(seed + t).permutation(n)
        test, train = np.sort(order[: max(1, n // 3)]), np.sort(order[max(1, n // 3) :])
        if len(train) and _both_sides(labels, train, test):
            return train, test
    return None
