"""The tumor mask as a pyramidal OME-TIFF overlay (tifffile), sized to cover the slide.

Level 0 has ``ceil(width / downsample) x ceil(height / downsample)`` pixels of
``mpp * downsample`` µm, so pixel (i, j) is the level-0 square starting at
``(j * downsample, i * downsample)``, the same origin as the slide: viewers that place
images by physical size (QuPath, napari, OMERO) overlay it without any offset. Reduced
levels are SubIFDs, each half the previous one (a pixel is tumor if any of its 2x2
block is), tiled and deflate-compressed. Values: 255 = tumor, 0 = not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile

from wsipipe.files import temp_file_beside

from wsipipe.outputs.omezarr import downsample_any, pyramid

TILE = 256


def write_mask_ometiff(path: str | Path, mask: np.ndarray, pixel_size_um: float, name: str = "tumor_mask") -> Path:
    """Write a 2-D boolean ``mask`` (level-0 pixels of ``pixel_size_um``) as a pyramidal OME-TIFF."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    levels = pyramid(np.where(mask, 255, 0).astype(np.uint8), downsample_any, min_side=TILE)
    metadata = {
        "axes": "YX",
        "Name": name,
        "PhysicalSizeX": float(pixel_size_um),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(pixel_size_um),
        "PhysicalSizeYUnit": "µm",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)  # the umask's mode, not mkstemp's 0600
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=levels[0].size > 2**31, ome=True) as tif:
            for k, level in enumerate(levels):
                per_cm = 1e4 / (pixel_size_um * 2**k)
                tif.write(
                    level,
                    subifds=len(levels) - 1 if k == 0 else None,
                    subfiletype=0 if k == 0 else 1,
                    metadata=metadata if k == 0 else None,
                    resolution=(per_cm, per_cm),
                    tile=(TILE, TILE),
                    compression="zlib",
                    photometric="minisblack",
                    resolutionunit="CENTIMETER",
                )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
