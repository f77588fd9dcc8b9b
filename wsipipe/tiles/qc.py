"""Slide quality control: per-patch measures computed while tiling, per-slide flags.

Per patch (pure, on the chunk of patches tiling already holds in memory). QC must cost a
small fraction of decoding the patch (<= 10 %, bench/bench_qc.py), so it looks at a sample:
colour on a 14 x 14 grid of pixels, focus on the central half (a quarter of the area):

- ``focus``: variance of the Laplacian of the 2x2-binned green channel over the tissue
  pixels of the patch's central half (low = blurred). NaN where that part has too little
  tissue to judge; glass is flat anyway.
- ``pen_fraction``: fraction of pixels in marker-ink colours H&E does not produce:
  saturated blue/green/cyan hues, and near-black.
- ``background_fraction``: fraction of near-white (glass) pixels.
- ``saturation``: mean HSV saturation of the non-background pixels (colour outliers:
  over-stained, dye pooling, ink smears are far above H&E's range).

They are stored as the columns of ``qc/measures`` (:data:`wsipipe.tiles.store.QC_MEASURES`,
(N, 4) float32, column names in its attrs) in the slide's Zarr group beside ``patches``.
:func:`slide_qc` turns them, the tissue and slide attrs and the slide score into flags with thresholds from :class:`wsipipe.config.QCConfig`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from wsipipe.config import QCConfig
from wsipipe.slides.resample import opencv
from wsipipe.tiles import store

MEASURES = ("focus", "pen_fraction", "background_fraction", "saturation")
_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)  # a pixel and its 4 neighbours
# Brightness (0..255 grey) above which a pixel is glass; matches TissueConfig.max_brightness ≈ 0.94.
WHITE_LEVEL = 235.0
COLOUR_GRID = 14  # colour measures sample a 14 x 14 grid of pixels per patch (every 16th at 224 px)

# Flag severities: "fail" = the result is not usable as is; "review" = a person must look.
FAIL, REVIEW, INFO = "fail", "review", "info"


def focus_measure(patches: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) float32: variance of the 4-neighbour Laplacian of the 2x2-binned
    green channel over the pixels whose whole neighbourhood is tissue; NaN with fewer than 16.
    Pass the part of the patches to measure (:func:`patch_qc` passes their central half).

    Green carries most of H&E's contrast (both stains absorb it). The chunk is processed as
    one tall image with OpenCV (SIMD, no float copy of the full-size patches): the bins never
    straddle two patches (even edges), and each patch's border row/column of the Laplacian,
    the only place a neighbouring patch leaks in, is left out."""
    cv2 = opencv()
    n, h, w, _ = patches.shape
    h2, w2 = h // 2, w // 2
    # One strided gather of the green bytes, then the chunk as one tall (n*h, w) image.
    green = np.ascontiguousarray(patches[:, : h2 * 2, : w2 * 2, 1]).reshape(n * h2 * 2, w2 * 2)
    # Mean of each 2x2 block, exact in float32 (INTER_AREA at an integer factor is a block mean).
    binned = cv2.resize(green.astype(np.float32), (w2, n * h2), interpolation=cv2.INTER_AREA)
    lap = cv2.Laplacian(binned, cv2.CV_32F, ksize=1).reshape(n, h2, w2)[:, 1:-1, 1:-1]
    sharp = (binned < WHITE_LEVEL).view(np.uint8)
    inner = cv2.erode(sharp, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0).reshape(n, h2, w2)[:, 1:-1, 1:-1]
    out = np.full(n, np.nan, np.float32)
    for k in range(n):
        if cv2.countNonZero(inner[k]) >= 16:
            _, sd = cv2.meanStdDev(lap[k], mask=inner[k])
            out[k] = sd[0, 0] ** 2
    return out


def _hue_saturation(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HSV hue (degrees 0..360), saturation (0..1), value (0..255) and min channel of float RGB planes.

    Planes, not an (..., 3) array: numpy's reductions over a last axis of 3 cost more than
    all the arithmetic here."""
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    delta = mx - mn
    sat = delta / np.maximum(mx, 1e-6)  # 0 where mx is 0, since delta is 0 there too
    safe = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue *= 60.0
    return hue, sat, mx, mn


def patch_qc(patches: np.ndarray) -> dict[str, np.ndarray]:
    """QC measures of a batch of patches (N, P, P, 3) uint8: ``{name: (N,) float32}`` for :data:`MEASURES`."""
    patches = np.asarray(patches)
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise ValueError(f"patches must be (N, H, W, 3), got shape {patches.shape}")
    n = len(patches)
    if n == 0 or patches.shape[1] < 4:
        return {name: np.zeros(n, dtype=np.float32) for name in MEASURES}
    # Colour on a sparse grid (196 samples: plenty for fractions of 5 % and up); focus on the
    # 2x2-binned green channel of the central half, since fine detail is exactly what defocus removes.
    step = max(1, patches.shape[1] // COLOUR_GRID)
    sampled = patches[:, step // 2 :: step, step // 2 :: step]
    r, g, b = np.moveaxis(sampled, -1, 0).astype(np.float32)
    hue, sat, value, low = _hue_saturation(r, g, b)
    background = low >= WHITE_LEVEL
    tissue = ~background
    n_tissue = tissue.sum(axis=(1, 2))

    # Marker inks. H&E is pink-purple-red, but haematoxylin reaches into blue hues (200-260°)
    # in dark nuclei, so blue counts as ink only when bright and strongly saturated; green/cyan
    # never occurs in H&E; black ink is dark and grey, where dark nuclei stay purple-blue
    # (saturation > 0.4; thresholds measured on CMU-1, where these rules mark < 0.2 % of a patch).
    green = (hue >= 70.0) & (hue < 190.0) & (sat >= 0.3) & (value >= 40.0)
    blue = (hue >= 190.0) & (hue <= 245.0) & (sat >= 0.55) & (value >= 110.0)
    black = (value < 60.0) & (sat < 0.35)
    inked = green | blue | black

    h, w = patches.shape[1:3]
    # The central half of each edge (a quarter of the area): a third (a ninth) is cheaper still,
    # but its focus varies enough between patches to flag sharp ones on the QC test slides.
    focus = focus_measure(patches[:, h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2])

    px = float(sampled.shape[1] * sampled.shape[2])
    return {
        "focus": focus,
        "pen_fraction": (inked.sum(axis=(1, 2)) / px).astype(np.float32),
        "background_fraction": (background.sum(axis=(1, 2)) / px).astype(np.float32),
        "saturation": np.where(n_tissue > 0, np.where(tissue, sat, 0.0).sum(axis=(1, 2)) / np.maximum(n_tissue, 1), 0.0)
        .astype(np.float32),
    }


# --------------------------------------------------------------------------- store I/O


def create_arrays(group: zarr.Group, n: int, chunk: int) -> zarr.Array:
    """The empty ``qc/measures`` array, chunked like ``patches`` so each tiling task writes its own
    chunk. One array, not one per measure: every small Zarr write costs milliseconds of fixed
    overhead, a sizeable part of tiling a chunk."""
    arr = group.create_array(
        store.QC_MEASURES, shape=(n, len(MEASURES)), chunks=(max(1, chunk), len(MEASURES)), dtype="float32",
        fill_value=np.nan, dimension_names=["patch", "measure"],
    )
    arr.attrs["measures"] = list(MEASURES)
    return arr


def write_chunk(measures: zarr.Array | None, sl: slice, patches: np.ndarray) -> None:
    """Tiling's per-chunk hook: measure the chunk's patches into rows ``sl`` of ``qc/measures``
    (``None``: a store from before QC, nothing to do)."""
    if measures is None:
        return
    values = patch_qc(patches)
    measures[sl] = np.stack([values[name] for name in MEASURES], axis=1)


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else []


def read_measures(group: zarr.Group) -> dict[str, np.ndarray] | None:
    """The stored per-patch measures, or None when the store predates QC."""
    arr = store.optional_array(group, store.QC_MEASURES)
    if arr is not None:
        table = np.asarray(arr[:])
        columns = [str(c) for c in _as_list(arr.attrs.get("measures"))]
        return {name: table[:, columns.index(name)] for name in MEASURES}
    if all(f"{store.QC_GROUP}/{name}" in group for name in MEASURES):  # earlier layout: one array per measure
        return {name: np.asarray(store.array(group, f"{store.QC_GROUP}/{name}")[:]) for name in MEASURES}
    return None


# --------------------------------------------------------------------------- flags (pure)


def focus_limit(measures: dict[str, np.ndarray], cfg: QCConfig) -> float:
    """Focus below which a patch counts as blurred on this slide.

    Sharpness depends on the tissue (fat vs dense tumor) and the scanner, so the limit is
    relative to the slide's sharp patches (its 75th percentile, robust while most of the
    slide is in focus), with an absolute floor that still catches a slide blurred all over."""
    focus = measures["focus"]
    tissue = np.isfinite(focus) & (measures["background_fraction"] <= 0.5)
    reference = float(np.percentile(focus[tissue], 75)) if tissue.any() else 0.0
    return max(cfg.min_focus, cfg.relative_focus * reference)


def patch_flags(measures: dict[str, np.ndarray], cfg: QCConfig) -> dict[str, np.ndarray]:
    """Boolean (N,) per reason: ``blur``, ``pen``, ``colour``."""
    focus = np.nan_to_num(measures["focus"], nan=np.inf)
    mostly_tissue = measures["background_fraction"] <= 0.5  # blur is judged on tissue only
    return {
        "blur": mostly_tissue & (focus < focus_limit(measures, cfg)),
        "pen": measures["pen_fraction"] >= cfg.pen_patch_fraction,
        "colour": mostly_tissue & (measures["saturation"] > cfg.max_saturation),
    }


def _flag(code: str, severity: str, message: str, **values: Any) -> dict[str, Any]:
    return {"code": code, "severity": severity, "message": message, **values}


def slide_flags(
    slide: dict,
    tissue: dict,
    measures: dict[str, np.ndarray] | None,
    score: float | None,
    threshold: float,
    cfg: QCConfig,
    tile: dict | None = None,
) -> list[dict[str, Any]]:
    """Per-slide QC flags from the slide, tissue and tile attrs, the per-patch measures and the score.

    ``slide`` = the store's ``slide`` attrs (mpp, mpp_source, mpp_file, width, height); ``tissue`` =
    its ``tissue`` attrs (found, area_mm2); ``tile`` = its ``tile`` attrs (mpp, upsample,
    mpp_tolerance; None for a caller without a store). Returns a list of ``{code, severity,
    message, ...}``; empty when nothing needs a look."""
    flags: list[dict[str, Any]] = []
    tile = tile or {}
    n = 0 if measures is None else len(measures["focus"])
    area = float(tissue.get("area_mm2") or 0.0)
    if not tissue.get("found", n > 0) or (measures is not None and n == 0):
        flags.append(_flag("no_tissue", FAIL, "no tissue found on the slide"))
    elif area < cfg.min_tissue_area_mm2:
        flags.append(_flag(
            "tissue_small", REVIEW, f"tissue area {area:.3g} mm² is below the minimum {cfg.min_tissue_area_mm2:g} mm²",
            value=round(area, 6),
        ))

    flags += resolution_flags(slide, tile, cfg)
    upsample = _upsample(tile)
    if measures is not None and n:
        pf = patch_flags(measures, cfg)
        tissue_patches = max(1, int(np.count_nonzero(measures["background_fraction"] <= 0.5)))
        shares = (
            ("out_of_focus", "blur", cfg.max_blur_fraction, "are out of focus"),
            ("colour_outliers", "colour", cfg.max_colour_outlier_fraction,
             f"have unusual colour saturation (> {cfg.max_saturation:g})"),
        )
        for code, reason, limit, what in shares:
            if code == "out_of_focus" and upsample >= BLUR_UPSAMPLE:
                continue  # the upsampled flag says why every patch is soft; the scanner is not to blame
            count = int(pf[reason].sum())
            share = count / tissue_patches
            if share > limit:
                flags.append(_flag(
                    code, REVIEW, f"{share:.0%} of tissue patches {what} (limit {limit:.0%})",
                    value=round(share, 4), patches=count,
                ))
        n_pen = int(pf["pen"].sum())
        if n_pen >= cfg.min_pen_patches:
            flags.append(_flag("pen_marks", REVIEW, f"marker ink on {n_pen} patches", patches=n_pen))

    if score is not None and abs(float(score) - threshold) < cfg.review_margin:
        flags.append(_flag(
            "near_threshold", REVIEW,
            f"slide score {float(score):.3f} is within {cfg.review_margin:g} of the decision threshold {threshold:g}",
            value=round(float(score), 6),
        ))
    return flags


# From this factor the Laplacian of the 2x2-binned patch measures the interpolation, not the scan:
# out_of_focus is left to the upsampled flag (on the TCGA slide, 4x blurs 100 % of patches by it).
BLUR_UPSAMPLE = 2.0
# Resolution sources the file itself states (its mpp or TIFF resolution tags).
FILE_SOURCES = ("openslide", "tiff-resolution")


def _upsample(tile: dict) -> float:
    """The tile attrs' upsampling factor (older stores: from the grid's scale)."""
    if tile.get("upsample") is not None:
        return float(tile["upsample"])
    scale = float(tile.get("scale") or 1.0)
    return 1.0 / scale if 0 < scale < 1.0 else 1.0


def resolution_flags(slide: dict, tile: dict, cfg: QCConfig) -> list[dict[str, Any]]:
    """Flags about the slide's level-0 resolution and what tiling did with it (pure)."""
    flags: list[dict[str, Any]] = []
    source = slide.get("mpp_source")
    lo, hi = cfg.mpp_range
    if not slide.get("mpp"):
        return [_flag("mpp_missing", FAIL, "the slide has no resolution (mpp)")]
    mpp = float(slide["mpp"])
    stated = float(slide["mpp_file"]) if slide.get("mpp_file") else None
    tolerance = float(tile.get("mpp_tolerance", 0.05))
    confirmed = stated is not None and abs(mpp - stated) / stated <= tolerance  # the file says the same
    width, height = int(slide.get("width") or 0), int(slide.get("height") or 0)
    extent_mm = max(width, height) * mpp / 1000.0 if width and height else None
    if not (lo <= mpp <= hi) or slide.get("mpp_plausible") is False:
        flags.append(_flag(
            "mpp_suspicious", REVIEW,
            f"resolution {mpp:.4g} µm/px is outside the range of brightfield scanners ({lo:g}–{hi:g})",
            value=mpp,
        ))
    elif source not in FILE_SOURCES and not confirmed and extent_mm is not None and extent_mm < cfg.min_slide_extent_mm:
        # A file-stated resolution is the scanner's own record, so a small image is a crop and is
        # left alone; a resolution given or estimated is doubted when glass cannot be that small.
        flags.append(_flag(
            "mpp_suspicious", REVIEW,
            f"at {mpp:.4g} µm/px ({source}) the {width}x{height} px image is only "
            f"{width * mpp / 1000:.2g} x {height * mpp / 1000:.2g} mm, less than the {cfg.min_slide_extent_mm:g} mm "
            "of a glass scan: the resolution is probably too fine",
            value=mpp, extent_mm=round(extent_mm, 3),
        ))
    if source == "objective-power":
        flags.append(_flag(
            "mpp_estimated", REVIEW, "resolution estimated from the objective power only (no mpp in the file)",
        ))
    elif source == "override" and stated is not None and not confirmed:
        flags.append(_flag(
            "mpp_override_contradicts", REVIEW,
            f"mpp_override {mpp:.4g} µm/px contradicts the {stated:.4g} µm/px the file states "
            f"({abs(mpp / stated - 1):.0%} apart, tolerance {tolerance:.0%}): patches are "
            f"{max(mpp / stated, stated / mpp):.2g}x off in scale if the file is right",
            value=mpp, file_value=stated,
        ))
    elif source == "override":
        agrees = f", agrees with the file's {stated:.4g}" if stated is not None else ""
        flags.append(_flag("mpp_override", INFO, f"resolution set by the user (mpp_override {mpp:.4g} µm/px){agrees}, "
                           "not read from the file", value=mpp))
    elif source == "default":
        why = f"the file's {stated:.4g} µm/px is implausible" if stated is not None else "the file states none"
        flags.append(_flag("mpp_default", INFO, f"resolution {mpp:.4g} µm/px from mpp_default: {why}", value=mpp))
    upsample = _upsample(tile)
    if upsample > 1.0:
        target = tile.get("mpp")
        severity = REVIEW if upsample > cfg.max_upsample else INFO
        flags.append(_flag(
            "upsampled", severity,
            f"patches are enlarged {upsample:.3g}x from the slide's {mpp:.4g} µm/px to the target "
            f"{float(target) if target else mpp * upsample:.4g} µm/px, so they are blurred by upsampling; the classifier "
            "sees less detail than it was trained on"
            + (" (focus is not judged at this factor: the blur is the upsampling's)" if upsample >= BLUR_UPSAMPLE else ""),
            value=round(upsample, 4),
        ))
    return flags


def flagged_patches(measures: dict[str, np.ndarray], cfg: QCConfig, limit: int) -> list[tuple[int, str]]:
    """Up to ``limit`` (patch index, reasons) of flagged patches, worst first within each reason."""
    pf = patch_flags(measures, cfg)
    order = {
        "pen": np.argsort(-measures["pen_fraction"]),
        "blur": np.argsort(np.nan_to_num(measures["focus"], nan=np.inf)),
        "colour": np.argsort(-measures["saturation"]),
    }
    picked: dict[int, list[str]] = {}
    per_reason = max(1, limit // len(order))
    for reason, idx in order.items():
        hits = [int(i) for i in idx if pf[reason][i]][:per_reason]
        for i in hits:
            picked.setdefault(i, []).append(reason)
    return [(i, ", ".join(r)) for i, r in list(picked.items())[:limit]]


def slide_qc(group: zarr.Group, meta: dict, score: float | None, threshold: float, cfg: QCConfig) -> dict[str, Any]:
    """The ``summary.json["qc"]`` section: flags, patch counts per reason, thresholds used."""
    measures = read_measures(group)
    flags = slide_flags(
        meta.get(store.META_SLIDE) or {}, meta.get(store.META_TISSUE) or {}, measures, score, threshold, cfg,
        tile=meta.get(store.META_TILE) or {},
    )
    counts: dict[str, int] = {}
    if measures is not None and len(measures["focus"]):
        counts = {k: int(v.sum()) for k, v in patch_flags(measures, cfg).items()}
    return {
        "measured": measures is not None,
        "flags": flags,
        "needs_review": any(f["severity"] in (FAIL, REVIEW) for f in flags),
        "flagged_patches": counts,
        "config": cfg.model_dump(mode="json"),
    }
