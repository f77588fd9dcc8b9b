"""A slide-level MIL model applied to one classified slide: embed (unless the store already holds
features of the model's encoder), slide probability and attention, ``attention.png``, and the
``mil`` section of ``summary.json``. The slide job's ``mil`` stage (:mod:`wsipipe.run.job`) and
the Prefect flows call :func:`apply_mil`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from wsipipe.config import InferenceConfig
from wsipipe.errors import ConfigError, ModelLoadError
from wsipipe.files import write_atomic
from wsipipe.models import embed
from wsipipe.models.mil import card_encoder, load_mil, predict
from wsipipe.outputs.summary import SUMMARY_NAME
from wsipipe.tiles import store

Progress = Any  # (done, total) -> None


def load_mil_encoder(model_dir: Path, entry: dict[str, Any]):
    """The encoder a MIL card names (its copy in the model folder, else the recorded path),
    checked to be the very encoder the model was trained on."""
    from wsipipe.learn.encoders import load_encoder_spec

    spec, weights = str(entry.get("spec") or ""), entry.get("weights")
    path = None if not weights else (Path(weights) if Path(weights).is_absolute() else model_dir / weights)
    if spec.startswith(("torchvision:", "timm:")):
        encoder, identity = load_encoder_spec(spec, path)
    else:
        if path is None:
            raise ModelLoadError(model_dir, "the MIL card records no encoder weights")
        encoder, identity = load_encoder_spec(path)
    wanted = {k: entry.get(k) for k in embed.IDENTITY_KEYS}
    if {k: identity.get(k) for k in embed.IDENTITY_KEYS} != wanted:
        raise ModelLoadError(path, f"not the encoder the MIL model was trained on (sha256 {str(wanted['sha256'])[:12]})")
    return encoder, identity


def _check_resolution(group, card, store_path: Path) -> None:
    tile = store.meta(group).get(store.META_TILE) or {}
    mpp, size = tile.get("mpp"), tile.get("patch_size")
    if card.mpp and mpp and abs(float(mpp) - float(card.mpp)) > 0.01 * float(card.mpp):
        raise ConfigError(store_path, f"tiled at {mpp} µm/px, the MIL model was trained on {card.mpp} µm/px patches; "
                          f"set tile.mpp={card.mpp}")
    if card.patch_size and size and int(size) != int(card.patch_size):
        raise ConfigError(store_path, f"patches of {size} px, the MIL model was trained on {card.patch_size} px; "
                          f"set tile.patch_size={card.patch_size}")


def apply_mil(
    store_path: str | Path, slide_dir: str | Path, model_dir: str | Path, cfg: InferenceConfig | None = None,
    progress: Progress | None = None, slide_path=None, readers: int | None = None, ome_zarr: bool = False,
) -> dict[str, Any]:
    """Slide probability and attention map of the MIL model in ``model_dir`` for a classified,
    stitched slide; writes attention.png / attention.npy (``ome_zarr``: attention.ome.zarr too)
    and adds ``mil`` to summary.json.
    Returns the ``mil`` section, with ``embedded`` (patches embedded now; 0 = features reused)."""
    from wsipipe.outputs.attention import write_attention

    store_path, slide_dir, model_dir = Path(store_path), Path(slide_dir), Path(model_dir)
    model, card = load_mil(model_dir)
    entry = card_encoder(card)
    group = store.open_store(store_path, mode="r")
    _check_resolution(group, card, store_path)
    done = _done(slide_dir, store_path, card.weights_sha256, entry)
    if done is not None:
        return {**done, "embedded": 0, "skipped": True}
    embedded = 0
    if not embed.has_features(store_path, entry):
        encoder, identity = load_mil_encoder(model_dir, entry)
        stats = embed.embed_store(store_path, encoder, identity, cfg, progress=progress, slide_path=slide_path, readers=readers)
        embedded = int(stats["computed"])
    features = embed.read_features(store_path, entry)
    keep = np.isfinite(features).all(axis=1)
    corrupt = store.optional_array(group, store.CORRUPT)
    if corrupt is not None and corrupt.shape[0] == len(features):
        keep &= ~np.asarray(corrupt[:], dtype=bool)
    result = predict(model, features[keep])
    attention = np.full(len(features), np.nan, dtype=np.float32)
    attention[keep] = result.attention
    threshold = float(card.threshold if card.threshold is not None else 0.5)
    classes = card.classes or ["negative", "positive"]
    label = classes[1] if result.probability >= threshold else classes[0]
    files = write_attention(store_path, slide_dir, attention, result.probability, label, ome_zarr,
                            {"model_sha256": card.weights_sha256, "probability": result.probability})
    section = {
        "probability": round(result.probability, 6), "label": label, "threshold": threshold,
        "model_sha256": card.weights_sha256, "model": str(model_dir),
        "encoder": {k: entry.get(k) for k in embed.IDENTITY_KEYS},
        "n_patches": int(keep.sum()), "files": files,
        "cv_auc": ((card.model_extra or {}).get("cv") or {}).get("held_out_auc"),
    }
    _add_to_summary(slide_dir / SUMMARY_NAME, section)
    return {**section, "embedded": embedded, "skipped": False}


def _done(slide_dir: Path, store_path: Path, model_sha256: str | None, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The summary's ``mil`` section when it is this model's over the store's current features and
    its files are there (a rerun then writes nothing); else None."""
    try:
        section = json.loads((slide_dir / SUMMARY_NAME).read_text()).get("mil")
    except (OSError, ValueError):
        return None
    if not isinstance(section, dict) or section.get("model_sha256") != model_sha256:
        return None
    if section.get("encoder") != {k: entry.get(k) for k in embed.IDENTITY_KEYS} or not embed.has_features(store_path, entry):
        return None
    files = section.get("files") or {}
    return section if files and all((slide_dir / name).exists() for name in files.values()) else None


def _add_to_summary(path: Path, section: dict[str, Any]) -> None:
    data = json.loads(path.read_text())
    data["mil"] = section
    write_atomic(path, json.dumps(data, indent=2))
