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
from skimage import morphology
from skimage.filters import threshold_otsu

from wsipipe.config import TissueConfig
from wsipipe.geometry import mask_to_polygons


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

    Computed in row blocks with integer arithmetic: a float copy of a 100k-px slide's
    thumbnail would cost more memory than the rest of tiling together."""
    sat = np.empty(rgb.shape[:2], np.uint8)
    grey = np.empty(rgb.shape[:2], np.uint8)
    for y in range(0, rgb.shape[0], block):
        b = rgb[y : y + block]
        vmax = b.max(axis=-1).astype(np.uint16)
        vmin = b.min(axis=-1)
        sat[y : y + block] = ((vmax - vmin) * 255 + vmax // 2) // np.maximum(vmax, 1)
        grey[y : y + block] = (b.sum(axis=-1, dtype=np.uint16) + 1) // 3
    return sat, grey


def detect_tissue(thumb_rgb: np.ndarray, downsample: float, slide_mpp: float, cfg: TissueConfig) -> TissueResult:
    """Tissue mask and polygon from a thumbnail whose pixels are ``downsample`` level-0 px wide."""
    px_um = downsample * slide_mpp  # thumbnail pixel edge in µm
    px_area = px_um * px_um
    sat, grey = saturation_value(thumb_rgb)
    otsu = float(threshold_otsu(sat)) / 255.0 if sat.max() > sat.min() else 1.0
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
        mask = morphology.closing(padded, morphology.disk(radius))[radius + 1 : -radius - 1, radius + 1 : -radius - 1]
    hole_px = int(cfg.max_hole_um2 / px_area)
    if hole_px >= 1:
        mask = morphology.remove_small_holes(mask, max_size=hole_px)
    min_px = int(cfg.min_area_um2 / px_area)
    if min_px >= 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px)
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
