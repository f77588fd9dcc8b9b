"""Tissue detection: a pure function on a low-resolution thumbnail.

Stained tissue is saturated (pink/purple); glass is grey-white and unsaturated.
We threshold saturation with Otsu (floored, so a glass-only slide does not split
its noise into "tissue"), drop bright background, close small gaps, fill small
holes and drop small specks. Every size is physical (µm, µm²), converted to
thumbnail pixels from the slide's mpp, so thresholds mean the same at any
thumbnail resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from shapely.geometry import MultiPolygon

from wsipipe.config import TissueConfig
from wsipipe.geometry import mask_to_polygons
from wsipipe.slides.resample import opencv


@dataclass(frozen=True)
class TissueResult:
    mask: np.ndarray  # (h, w) bool on the thumbnail grid
    downsample: float  # level-0 px per mask px
    polygon: MultiPolygon  # level-0 (x, y)
    saturation_threshold: float
    area_um2: float

    @property
    def found(self) -> bool:
        return bool(self.mask.any())


def saturation_value(rgb: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and grey level of an RGB uint8 image, both as uint8 (0..255).

    Computed in row blocks with integer arithmetic on the three channel planes (numpy's
    reductions over a last axis of 3 cost several times the arithmetic; a float copy of a
    big thumbnail would cost more memory than the rest of tiling together)."""
    sat = np.empty(rgb.shape[:2], np.uint8)
    grey = np.empty(rgb.shape[:2], np.uint8)
    for y in range(0, rgb.shape[0], block):
        r, g, b = (rgb[y : y + block, :, c] for c in range(3))
        vmax = np.maximum(np.maximum(r, g), b).astype(np.uint16)
        vmin = np.minimum(np.minimum(r, g), b)
        sat[y : y + block] = ((vmax - vmin) * 255 + vmax // 2) // np.maximum(vmax, 1)
        total = r.astype(np.uint16)
        total += g
        total += b
        total += 1
        grey[y : y + block] = total // 3
    return sat, grey


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values``: the level t that maximises the between-class
    variance of {v <= t} and {v > t} (the first such level on ties)."""
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    low_n = np.cumsum(counts)[:-1]  # class {v <= t}, for t = 0..254
    low_sum = np.cumsum(counts * levels)[:-1]
    high_n = counts.sum() - low_n
    high_sum = (counts * levels).sum() - low_sum
    valid = (low_n > 0) & (high_n > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        between = np.where(valid, low_n * high_n * (low_sum / low_n - high_sum / high_n) ** 2, -1.0)
    return float(np.argmax(between))


def disk(radius: int) -> np.ndarray:
    """(2r+1, 2r+1) uint8 footprint of the pixels within ``radius`` of the centre."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (xx * xx + yy * yy <= radius * radius).astype(np.uint8)


def binary_closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Dilation then erosion of a bool mask by ``footprint`` (OpenCV: SIMD, a few ms per megapixel)."""
    cv2 = opencv()
    return cv2.morphologyEx(mask.view(np.uint8), cv2.MORPH_CLOSE, footprint).astype(bool)


def remove_small_objects(mask: np.ndarray, max_px: int) -> np.ndarray:
    """``mask`` without its 4-connected pieces of at most ``max_px`` pixels."""
    cv2 = opencv()
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] <= max_px
    small[0] = False  # label 0 is the unset pixels
    return mask & ~small[labels]


def detect_tissue(thumb_rgb: np.ndarray, downsample: float, slide_mpp: float, cfg: TissueConfig) -> TissueResult:
    """Tissue mask and polygon from a thumbnail whose pixels are ``downsample`` level-0 px wide."""
    px_um = downsample * slide_mpp  # thumbnail pixel edge in µm
    px_area = px_um * px_um
    sat, grey = saturation_value(thumb_rgb)
    otsu = otsu_threshold(sat) / 255.0 if sat.max() > sat.min() else 1.0
    thr = max(otsu, cfg.min_saturation)
    # Very dark pixels (scanner borders, black ink) have meaningless saturation.
    mask = (sat > thr * 255) & (grey < cfg.max_brightness * 255) & (grey > 0.05 * 255)
    if not cfg.detect:
        mask = np.ones_like(mask)
        return TissueResult(mask, downsample, mask_to_polygons(mask, scale=downsample), thr, mask.size * px_area)
    radius = int(round(cfg.closing_um / px_um))
    if radius >= 1:
        # Pad with background first: closing treats the image border as foreground and
        # would otherwise glue tissue to the slide edge.
        padded = np.pad(mask, radius + 1)
        mask = binary_closing(padded, disk(radius))[radius + 1 : -radius - 1, radius + 1 : -radius - 1]
    hole_px = int(cfg.max_hole_um2 / px_area)
    if hole_px >= 1:
        mask = ~remove_small_objects(~mask, hole_px)  # holes: the background's small pieces
    min_px = int(cfg.min_area_um2 / px_area)
    if min_px >= 1:
        mask = remove_small_objects(mask, min_px)
    polygon = mask_to_polygons(mask, scale=downsample, simplify=downsample * 0.5)
    return TissueResult(
        mask=mask,
        downsample=downsample,
        polygon=polygon,
        saturation_threshold=thr,
        area_um2=float(mask.sum()) * px_area,
    )


def patch_tissue_fraction(
    mask: np.ndarray, downsample: float, xy: np.ndarray, size_l0: float
) -> np.ndarray:
    """Fraction of each square patch (level-0 top-left ``xy`` (N, 2), edge ``size_l0``) covered
    by tissue, from the mask with a summed-area table. Parts outside the slide count as
    no tissue; boundaries are rounded to the mask grid."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    c0 = np.clip(np.rint(xy[:, 0] / downsample), 0, w).astype(np.int64)
    r0 = np.clip(np.rint(xy[:, 1] / downsample), 0, h).astype(np.int64)
    c1 = np.clip(np.rint((xy[:, 0] + size_l0) / downsample), 0, w).astype(np.int64)
    r1 = np.clip(np.rint((xy[:, 1] + size_l0) / downsample), 0, h).astype(np.int64)
    inside = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    # Footprint of the same rounded box, unclipped: the part beyond the slide edge counts.
    bw = np.rint((xy[:, 0] + size_l0) / downsample) - np.rint(xy[:, 0] / downsample)
    bh = np.rint((xy[:, 1] + size_l0) / downsample) - np.rint(xy[:, 1] / downsample)
    footprint = np.maximum(bw * bh, 1.0)
    return np.clip(inside / footprint, 0.0, 1.0).astype(np.float32)
