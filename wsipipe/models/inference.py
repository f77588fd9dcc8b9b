"""Batched patch classification from a slide's Zarr store.

Two threads, one direction. A background thread reads the pending Zarr chunks and turns
them into model-ready batches, at most ``prefetch_batches`` ahead; the calling thread
only runs the model and writes the (tiny) probabilities. So the model never waits on
I/O, decompression or normalisation, and memory stays bounded by the queue. A store tiled
with ``tile.store_patches: false`` has no patches to read: the background thread takes them
from a pool of threads reading the slide instead (:mod:`wsipipe.models.fused`).

On CPU the background thread normalises in numpy (single-threaded, so it doesn't fight
the model's OpenMP threads for the cores) into NHWC memory, which torch sees as a
channels_last NCHW tensor without a copy. On CUDA it pins the uint8 batch instead (4x
fewer bytes to move than float); the copy is asynchronous and normalisation happens on
the GPU. Both run the model in channels_last under ``torch.inference_mode`` and autocast.

The input is the model card's (:class:`InputSpec`): its stain normaliser on the uint8 patches
(background thread), its mean/std, and a resize to its input edge on the model's device. A
model without a card gets the ImageNet normalisation of the patches as tiled.

    model, info = load_model("tumor.safetensors")
    infer_store("slide.zarr", model, info, InferenceConfig(batch_size=64))
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any, NamedTuple, TypeVar
from collections.abc import Callable, Generator, Iterable, Iterator

import numpy as np
import torch
import zarr
from torch import nn

from wsipipe.tiles import store
from wsipipe.config import InferenceConfig
from wsipipe.errors import ConfigError, ModelLoadError, StoreError
from wsipipe.models import domain as ood
from wsipipe.models import fused
from wsipipe.models.card import CARD_FILE, ModelCard
from wsipipe.models.carded import with_model_card
from wsipipe.models.expected import OVERRIDE_KEY, departure_words
from wsipipe.models.identity import infer_identity
from wsipipe.models.model import IMAGENET_MEAN, IMAGENET_STD, ModelInfo
from wsipipe.models.stain import StainNormaliser
from wsipipe.tiles.tiling import reads_from_slide, slide_source

STAGE = store.STAGE_INFER
OOD_DISTANCE = ood.DISTANCE_ARRAY
log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
T = TypeVar("T")


def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(x / 255 - mean) / std  ==  x * scale + bias, per channel (last axis of NHWC), float32."""
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32)
    bias = (-np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)).astype(np.float32)
    return scale, bias


@dataclass(frozen=True, eq=False)
class InputSpec:
    """What a model's input is made of: ``(resize(stain(rgb)) / 255 - mean) / std``.

    ``stain``: the card's stain normaliser, applied to the uint8 patches before anything else;
    ``resize``: the square input edge (None, or the patch edge: as tiled)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int | None = None
    stain: StainNormaliser | None = None

    @cached_property
    def scale(self) -> np.ndarray:
        return _affine(self.mean, self.std)[0]

    @cached_property
    def bias(self) -> np.ndarray:
        return _affine(self.mean, self.std)[1]


DEFAULT_INPUT = InputSpec()


def input_spec(card: ModelCard | None, where=None) -> InputSpec:
    """The card's :class:`InputSpec` (the default for None). A stain normaliser the card names
    but that cannot run (unknown method, missing parameters) is a :class:`ModelLoadError`
    naming ``where`` (the card file), here rather than at the first batch."""
    if card is None:
        return DEFAULT_INPUT
    stain = None
    if card.stain_normalisation is not None:
        try:
            stain = StainNormaliser.from_dict(card.stain_normalisation)
            stain.apply(np.full((1, 4, 4, 3), 128, np.uint8))  # its parameters are all there
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            problem = getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}"
            raise ModelLoadError(where, f"model card stain_normalisation cannot be applied ({problem})") from None
    norm = card.normalisation
    return InputSpec(tuple(norm.mean), tuple(norm.std), norm.resize, stain)  # type: ignore[arg-type]


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' = the first CUDA GPU if there is one, else the CPU; 'cpu', 'cuda', 'cuda:N'."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(None, f"inference.device={spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(None, f"inference.device={spec!r}: no such CUDA device on this machine")
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``spec`` ('auto', 'fp32', 'bf16', 'fp16') on ``device``; None = plain fp32.

    'auto' picks bf16 where the hardware computes it natively: CUDA GPUs that support it
    (fp16 on older GPUs, whose tensor cores have no bf16) and CPUs with AVX512-BF16 or AMX,
    where ResNet18 runs ~3x faster than fp32. Elsewhere bf16 is emulated and slower: fp32."""
    if spec == "fp32":
        return None
    if spec in ("bf16", "fp16"):
        return torch.bfloat16 if spec == "bf16" else torch.float16
    if spec != "auto":
        raise ConfigError(None, f"inference.precision={spec!r}: use auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    # Private probes, so look them up defensively; a plain AVX512 capability isn't enough.
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def normalize(patches: np.ndarray, spec: InputSpec = DEFAULT_INPUT) -> np.ndarray:
    """(N, H, W, 3) uint8 -> float32 (N, H, W, 3), normalised by ``spec``, in two numpy passes."""
    out = np.empty(patches.shape, dtype=np.float32)
    np.multiply(patches, spec.scale, out=out)
    out += spec.bias
    return out


def host_batch(patches: np.ndarray, device: torch.device, spec: InputSpec = DEFAULT_INPUT) -> torch.Tensor:
    """The part of preparing a batch that runs off the model's thread (see module doc): the stain
    normaliser (numpy, per patch: the costliest step, so never on the model's thread), then
    normalisation on CPU or pinning for CUDA."""
    if spec.stain is not None and len(patches):
        patches = spec.stain.apply(patches)
    if device.type == "cuda":
        return torch.from_numpy(np.ascontiguousarray(patches)).pin_memory()
    # NCHW view of NHWC memory: already channels_last, no copy.
    return torch.from_numpy(normalize(patches, spec)).permute(0, 3, 1, 2)


def device_batch(host: torch.Tensor, device: torch.device, spec: InputSpec = DEFAULT_INPUT) -> torch.Tensor:
    """Finish a :func:`host_batch` on ``device``: a normalised (N, 3, H, W) channels_last float
    tensor, resized to the spec's input edge."""
    if device.type == "cpu":
        x = host
    elif device.type != "cuda":
        x = host.to(device)
    else:
        x = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        scale, bias = _constants(device, spec.mean, spec.std)
        x = x.mul_(scale).add_(bias)
    return _resized(x, spec.resize)


def _resized(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``x`` at ``size`` x ``size`` (bilinear, antialiased when shrinking); as is when already there.
    After normalising: the filter is linear with weights summing to 1, so the order does not
    change the values, and the device path does it on the GPU with the model."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


@lru_cache(maxsize=16)
def _constants(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device and normalisation: copying them from pageable memory per batch would
    # block the host until the GPU drained its queue, serialising host and device.
    scale, bias = (torch.from_numpy(c).to(device).view(1, 3, 1, 1) for c in _affine(mean, std))
    return scale, bias


def to_tensor(patches: np.ndarray, device: torch.device, spec: InputSpec = DEFAULT_INPUT) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float32, channels_last, on ``device``."""
    return device_batch(host_batch(patches, device, spec), device, spec)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, on ``device``, channels_last (in place: this is the caller's model)."""
    return model.eval().to(device).to(memory_format=torch.channels_last)


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def predict_patches(
    model: nn.Module,
    patches: np.ndarray,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 64,
    card: ModelCard | None = None,
) -> np.ndarray:
    """Probabilities for in-memory (N, H, W, 3) uint8 patches: (N,) float32 for a one-logit
    model (sigmoid), (N, C) for C > 1 (softmax). Same arithmetic as :func:`infer_store`,
    including the input ``card`` describes (stain normaliser, normalisation, resize)."""
    device = device or next(model.parameters()).device
    spec = input_spec(card)
    net = prepare_model(model, device)
    outs = []
    with torch.inference_mode(), _autocast(device, dtype):
        for b in range(0, max(len(patches), 1), batch_size):  # an empty input still gives the right shape
            outs.append(_probabilities(net(to_tensor(patches[b : b + batch_size], device, spec))))
    return torch.cat(outs).cpu().numpy().astype(np.float32, copy=False)


@dataclass
class BatchLimit:
    """The largest batch the model has run without running out of memory (shrinks, never grows)."""

    size: int
    backoffs: int = 0


def forward_with_backoff(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, limit: BatchLimit,
    output: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Probabilities for the batch ``x`` (``output``: another function of the model's output, such
    as embeddings), in slices of at most ``limit.size``. On an out-of-memory error (CUDA or any
    other device: torch.cuda.OutOfMemoryError is torch.OutOfMemoryError) the slice is halved
    and retried, and the smaller size is kept for the batches that follow; a single patch that
    still does not fit re-raises. Each patch's result does not depend on the slicing (eval
    mode: no batch statistics)."""
    outs = []
    start = 0
    while start < len(x):
        size = min(limit.size, len(x) - start)
        try:
            outs.append((output or _probabilities)(net(x[start : start + size])))
            start += size
            continue
        except torch.OutOfMemoryError:
            if size == 1:
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone.
        limit.size, limit.backoffs = size // 2, limit.backoffs + 1
        log.warning("out of memory at batch size %d; retrying at %d", size, limit.size)
        if x.device.type == "cuda":
            torch.cuda.empty_cache()  # give back what the failed forward pass had cached
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class _Unit(NamedTuple):
    """Consecutive pending chunks read in one Zarr call and written back together."""

    start: int  # patch range
    stop: int
    first: int  # chunk range
    last: int


def infer_store(
    store_path, model: nn.Module, info: ModelInfo, cfg: InferenceConfig | None = None, progress: Progress | None = None,
    slide_path=None, readers: int | None = None,
) -> dict:
    """Classify every patch of a tiled store into ``probabilities``, (N,) or (N, C) float32.

    A store already classified by the same model over the same patches is left as is;
    an interrupted run resumes at the chunks it hadn't flagged done; a different model or
    re-tiled patches recompute everything. ``progress(done, total)`` is called as chunks
    land. Returns ``{"skipped", "n", "computed", "seconds", "images_per_s"}``.

    When ``info.card`` holds a training ``domain`` (:mod:`wsipipe.models.domain`), each patch's
    distance from it goes into ``ood_distance`` (N,) float32 from the same forward pass, same
    chunks, under the same done flags; the stage records whether the check ran, or why not.

    A store tiled with ``tile.store_patches: false`` has no patches: they are read from the
    slide (``slide_path``, else the path recorded at tiling) on ``readers`` threads (default:
    one per core), with their QC measures and corrupt flags written as they are read; see
    :mod:`wsipipe.models.fused`."""
    cfg = cfg or InferenceConfig()
    t0 = time.perf_counter()
    group = store.open_store(store_path, mode="r+")
    store.require_complete(group, store.STAGE_TILE, store_path)
    info = with_model_card(info) or info  # the card beside the weights, when the loader attached none
    identity = infer_identity(group, info)
    from_slide = reads_from_slide(group)
    patches = None if from_slide else store.array(group, store.PATCHES)
    n = int(store.array(group, store.COORDS).shape[0] if patches is None else patches.shape[0])
    if store.is_complete(group, STAGE, identity):
        return {"skipped": True, "n": n, "computed": 0, "seconds": 0.0, "images_per_s": None}

    device = resolve_device(cfg.device)  # a bad setting fails before the store is touched
    dtype = resolve_precision(cfg.precision, device)
    spec = input_spec(info.card, _card_file(info))
    departed = _departed(identity, store_path)
    source = slide_source(group, store_path, slide_path) if from_slide else None  # a missing slide, too
    net = prepare_model(model, device)
    run = torch.compile(net, dynamic=False) if cfg.compile else net
    reference, tap, domain_note = _domain_check(info, net)
    if tap is not None:
        run = tap.wrap(run)  # the features of the same forward pass that gives the logits
    chunk = fused.chunk_patches(group) if patches is None else max(1, int(patches.chunks[0]))
    slices = store.chunk_slices(n, chunk)
    probs, flags, distances = _outputs(group, identity, info, n, chunk, len(slices), distances=tap is not None)
    todo = [i for i in store.pending_chunks(flags) if i < len(slices)]
    units = _units(todo, slices, per_unit=-(-cfg.batch_size // chunk))
    computed = sum(u.stop - u.start for u in units)
    done = n - computed
    if progress:
        progress(done, n)

    limit = BatchLimit(cfg.batch_size)
    waiting = collections.deque(units)  # units whose probabilities are not all written yet
    outs: list[torch.Tensor] = []  # probabilities computed but not yet written, in stream order
    feats: list[torch.Tensor] = []  # their features, when the domain is checked
    buffered = produced = 0
    stream: Generator[np.ndarray, None, None]
    if source is not None:
        pending = [i for u in units for i in range(u.first, u.last)]
        stream = fused.read_chunks(
            source, group, slices, pending, readers, decode_device=device if source.decode == "device" else None
        )
    else:
        stream = _stored_units(store.array(group, store.PATCHES), units, store_path)
    batches = _prefetch(
        # Compiled: the last batch is padded to full size, so the model compiles one shape only.
        _host_batches(stream, cfg.batch_size, device, pad_last=cfg.compile, spec=spec), cfg.prefetch_batches
    )
    # closing: on an error the prefetch thread stops now, not when the traceback is freed; then the
    # stream, and with it any reader threads.
    with tap or contextlib.nullcontext(), contextlib.closing(stream), contextlib.closing(batches), \
            torch.inference_mode(), _autocast(device, dtype):
        for host in batches:
            # [:...] drops the outputs of a padded last batch
            outs.append(forward_with_backoff(run, device_batch(host, device, spec), limit)[: computed - produced])
            if tap is not None:
                feats.append(_taken(tap)[: len(outs[-1])])
            produced += len(outs[-1])
            buffered += len(outs[-1])
            # One device->host sync per unit, not per batch.
            while waiting and buffered >= waiting[0].stop - waiting[0].start:
                unit = waiting.popleft()
                size = unit.stop - unit.start
                flat = torch.cat(outs)
                probs[unit.start : unit.stop] = flat[:size].cpu().numpy()
                if distances is not None and reference is not None:
                    feat = torch.cat(feats)
                    distances[unit.start : unit.stop] = ood.domain_distances(feat[:size].cpu().numpy(), reference)
                    feats = [feat[size:]] if len(feat) > size else []
                flags[unit.first : unit.last] = True  # after the data: a flagged chunk is on disk
                outs, buffered = ([flat[size:]] if len(flat) > size else []), len(flat) - size
                done += size
                if progress:
                    progress(done, n)

    if waiting or any(i < len(slices) for i in store.pending_chunks(flags)):
        raise StoreError(store_path, "inference left chunks unwritten; rerun to resume")
    if source is not None:
        fused.finish(group, source, n)
    seconds = time.perf_counter() - t0
    store.set_stage(
        group, STAGE, identity, True, seconds=round(seconds, 3), n_patches=n, computed=computed,
        device=str(device), precision=str(dtype).removeprefix("torch.") if dtype else "fp32",
        batch_size=limit.size, oom_backoffs=limit.backoffs, compiled=cfg.compile,
        patches_from="store" if source is None else "slide",
        model={"sha256": info.sha256, "arch": info.arch, "num_classes": info.num_classes,
               "path": str(info.path) if info.path else None,
               "training_data": info.card.training_data if info.card is not None else None},
        domain={"checked": True, **ood.reference(reference)} if reference is not None else {"checked": False, "reason": domain_note},
        **({OVERRIDE_KEY: departed} if departed else {}),
    )
    return {"skipped": False, "n": n, "computed": computed, "seconds": seconds,
            "images_per_s": computed / seconds if computed and seconds else None}


def _departed(identity: dict[str, Any], store_path) -> dict[str, Any] | None:
    """The settings a forced run departs from the model card with (logged), else None. They are in
    the identity: a forced run at other settings is never taken for a clean one."""
    departed = identity.get(OVERRIDE_KEY)
    if departed:
        log.warning("%s: patches at other settings than the model card's (%s); classifying anyway, flagged for review",
                    store_path, departure_words(departed))
    return departed


def _outputs(
    group: zarr.Group, identity: dict[str, Any], info: ModelInfo, n: int, chunk: int, n_chunks: int,
    distances: bool = False,
) -> tuple[zarr.Array, zarr.Array, zarr.Array | None]:
    """The probabilities array, the per-patch domain distances (when ``distances``) and the
    per-chunk done flags: the previous run's to resume, or fresh."""
    shape = (n,) if info.num_classes == 1 else (n, info.num_classes)
    entry = store.stage_entry(group, STAGE) or {}
    old = store.optional_array(group, store.PROBABILITIES)
    old_dist = store.optional_array(group, OOD_DISTANCE)
    resumable = (
        entry.get("identity") == identity
        and old is not None
        and old.shape == shape
        and old.chunks[0] == chunk
        and old.attrs.get("model_sha256") == info.sha256
        and (not distances or (old_dist is not None and old_dist.shape == (n,) and old_dist.chunks[0] == chunk))
    )
    if resumable and old is not None:  # (repeated for the type checker)
        return old, store.progress_array(group, STAGE, n_chunks), old_dist if distances else None
    # Order matters for a crash between steps: forget old flags first (the old complete
    # marker still describes the old, untouched probabilities), then claim the stage with
    # the new identity, and only then replace the array.
    flags = store.progress_array(group, STAGE, n_chunks, reset=True)
    store.set_stage(group, STAGE, identity, False)
    probs = group.create_array(
        store.PROBABILITIES, shape=shape, chunks=(chunk,) + shape[1:], dtype="float32", fill_value=float("nan"),
        overwrite=True, dimension_names=["patch"] if len(shape) == 1 else ["patch", "class"],
        attributes={"model_sha256": info.sha256, "arch": info.arch, "num_classes": info.num_classes,
                    **_class_attrs(info.card)},
    )
    if not distances:
        _drop(group, OOD_DISTANCE)
        return probs, flags, None
    return probs, flags, _distance_array(group, n, chunk, info)


def _distance_array(group: zarr.Group, n: int, chunk: int, info: ModelInfo) -> zarr.Array:
    """A fresh ``ood_distance`` array beside the probabilities, same chunks (models.domain)."""
    return group.create_array(
        OOD_DISTANCE, shape=(n,), chunks=(chunk,), dtype="float32", fill_value=float("nan"), overwrite=True,
        dimension_names=["patch"], attributes={"model_sha256": info.sha256, "distance": ood.DISTANCE_KIND},
    )


def _drop(group: zarr.Group, name: str) -> None:
    """Remove a previous model's array, so no reader pairs it with the new probabilities."""
    if name in group:
        del group[name]


def _domain_check(info: ModelInfo, net: nn.Module) -> tuple[dict[str, Any] | None, ood.FeatureTap | None, str | None]:
    """(the card's training domain, a feature tap on ``net``, None) when the out-of-domain check
    can run; else (None, None, why not)."""
    card = info.card
    if card is None:
        return None, None, "the model has no card describing its training data"
    if not card.domain:
        return None, None, "the model card records no training domain"
    views = ood.view_widths(net)
    if views is None:
        return None, None, "the model has no classification layer to read its features from"
    recorded = [(v.get("name"), int(v["stop"]) - int(v["start"])) for v in card.domain.get("views") or []]
    if recorded != views:
        return None, None, f"the card's training domain has feature views {recorded}, the model gives {views}"
    return ood.unpacked(card.domain), ood.FeatureTap.attach(net), None


def _taken(tap: ood.FeatureTap) -> torch.Tensor:
    feats = tap.take()
    if feats is None:  # wrap() raises first; this keeps the type checker sure
        raise RuntimeError("the feature tap recorded nothing for a batch")
    return feats


def _class_attrs(card: ModelCard | None) -> dict[str, Any]:
    """The probabilities' column names and positive class, as the card names them (stitching
    picks the tumor column by name); nothing for a model whose card names no classes."""
    if card is None or not card.classes:
        return {}
    return {"classes": card.columns, "positive_class": card.positive}


def _card_file(info: ModelInfo):
    """The file a message about the model's card names: card.json beside the weights, else the weights."""
    if info.path is None:
        return None
    beside = info.path.parent / CARD_FILE
    return beside if beside.is_file() else info.path


def _units(todo: list[int], slices: list[slice], per_unit: int) -> list[_Unit]:
    """Group pending chunk indices into runs of at most ``per_unit`` consecutive chunks."""
    runs: list[list[int]] = []
    for i in todo:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < per_unit:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [_Unit(slices[r[0]].start, slices[r[-1]].stop, r[0], r[-1] + 1) for r in runs]


def _stored_units(patches: zarr.Array, units: list[_Unit], path) -> Generator[np.ndarray, None, None]:
    """The stored patches of each unit, one Zarr read per unit."""
    for unit in units:
        try:
            yield np.asarray(patches[unit.start : unit.stop])
        except Exception as exc:  # a damaged chunk: everything before it is flagged, so a rerun resumes here
            raise StoreError(path, f"cannot read patches[{unit.start}:{unit.stop}]: {exc}") from exc


def _host_batches(
    stream: Iterable[np.ndarray], batch_size: int, device: torch.device, pad_last: bool = False,
    spec: InputSpec = DEFAULT_INPUT,
) -> Iterator[torch.Tensor]:
    """Full batches across the arrays of ``stream`` (a remainder waits for the next array's
    patches); ``pad_last`` fills the final partial batch up with black patches."""
    carry = None
    for data in stream:
        if carry is not None:
            data = np.concatenate([carry, data])
        full = len(data) - len(data) % batch_size
        for b in range(0, full, batch_size):
            yield host_batch(data[b : b + batch_size], device, spec)
        carry = data[full:] if full < len(data) else None
    if carry is not None:
        if pad_last:
            carry = np.concatenate([carry, np.zeros((batch_size - len(carry),) + carry.shape[1:], carry.dtype)])
        yield host_batch(carry, device, spec)


class _Raised(NamedTuple):
    exc: BaseException


def _prefetch(items: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Produce ``items`` in a background thread, up to ``depth`` ahead of the consumer.

    An exception in the producer is re-raised in the consumer; a consumer that stops
    early (exception, break) stops the producer at its next item."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:
            put(_Raised(exc))
            return
        finally:
            # A generator stopped early closes now, in this thread (a pool of reader threads, say),
            # not whenever it is collected.
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put(end)

    thread = threading.Thread(target=work, name="wsipipe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
