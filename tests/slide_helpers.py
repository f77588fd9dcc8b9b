"""Small test slides built from pixels: generated H&E, post-processed (blur, ink, glass), then
written as real pyramidal tiled TIFFs that OpenSlide opens (generic-tiff driver)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image, ImageDraw

from wsipipe.slides.synth import write_synthetic_slide


def synthetic_rgb(tmp: Path, width: int, height: int, seed: int, **kwargs):
    """Level-0 RGB pixels of a generated slide, and the slide (its ground truth)."""
    s = write_synthetic_slide(tmp / f"src-{seed}.tiff", width, height, mpp=0.5, seed=seed, fmt="tiff", **kwargs)
    with openslide.OpenSlide(str(s.path)) as handle:
        rgb = np.asarray(handle.read_region((0, 0), 0, (width, height)).convert("RGB"))
    return rgb.copy(), s


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float = 0.5, description: str = "test slide") -> Path:
    """A tiled pyramidal TIFF (levels / 4) with its resolution in the TIFF tags."""
    with tifffile.TiffWriter(path) as tw:
        factor, level = 1, rgb
        while True:
            tw.write(
                level, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None,
                resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)), resolutionunit="CENTIMETER",
                subfiletype=1 if factor > 1 else 0, description=description if factor == 1 else None,
            )
            if max(level.shape[:2]) <= 1024:
                return path
            factor *= 4
            level = np.asarray(Image.fromarray(rgb).reduce(factor))


def blur_region(rgb: np.ndarray, x0: int, x1: int, sigma: float = 3.0) -> np.ndarray:
    """Defocus the columns x0..x1 (what a scanner's focus miss on part of the slide looks like)."""
    from scipy import ndimage

    out = rgb.copy()
    out[:, x0:x1] = ndimage.gaussian_filter(rgb[:, x0:x1], sigma=(sigma, sigma, 0))
    return out


def pen_stroke(rgb: np.ndarray, points: list[tuple[int, int]], colour=(30, 70, 185), width: int = 90) -> np.ndarray:
    """A marker line drawn over the slide, ink mixed 85 % with what is under it."""
    ink = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
    ImageDraw.Draw(ink).line(points, fill=255, width=width, joint="curve")
    alpha = np.asarray(ink, dtype=np.float32)[..., None] / 255.0 * 0.85
    return (rgb * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha).astype(np.uint8)
