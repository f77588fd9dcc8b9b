"""Heatmap and tumor mask as an OME-Zarr image (OME-NGFF 0.5, Zarr v3) that napari and
ome-zarr-py open at the slide's physical scale.

Layout of ``heatmap.ome.zarr``::

    zarr.json            multiscales: the heatmap, float32 probabilities (NaN = no patch)
    0/, 1/, ...          pyramid levels, each half the previous one
    labels/tumor_mask/   the tumor mask as an NGFF label image (uint8, 1 = tumor), same grid

Coordinates are micrometres on axes (y, x). Array index ``i`` of a level maps to
``i * scale + translation``, which napari (and the NGFF convention) take as the *centre*
of that element. The slide itself, shown at ``mpp`` µm/px with no translation, has the
centre of its pixel 0 at 0 µm; so a heatmap cell whose level-0 footprint starts at ``x0``
and spans ``s`` level-0 pixels gets the translation ``(x0 + s/2 - 1/2) * mpp``, and the
two line up to the pixel when overlaid.

Everything except :func:`write_heatmap_omezarr` is pure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from wsipipe.files import temp_dir_beside

NGFF_VERSION = "0.5"
AXES = [
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
LABEL_NAME = "tumor_mask"
TUMOR_RGBA = [200, 0, 0, 160]
MIN_LEVEL_SIDE = 16  # stop the pyramid when the next level would be smaller than this


def level_transforms(
    factor: int, cell_l0: float, origin_l0: tuple[float, float], mpp: float
) -> list[dict]:
    """NGFF scale + translation (µm, order y, x) of a level ``factor`` times coarser than the grid.

    ``origin_l0`` is the level-0 (x, y) of the grid's top-left corner."""
    step_l0 = cell_l0 * factor
    ox, oy = float(origin_l0[0]), float(origin_l0[1])
    return [
        {"type": "scale", "scale": [step_l0 * mpp, step_l0 * mpp]},
        {"type": "translation", "translation": [(oy + step_l0 / 2 - 0.5) * mpp, (ox + step_l0 / 2 - 0.5) * mpp]},
    ]


def _blocks(arr: np.ndarray, fill) -> np.ndarray:
    """(h/2, w/2, 4) view of 2x2 blocks, padding odd edges with ``fill``."""
    h, w = arr.shape
    padded = np.full((h + h % 2, w + w % 2), fill, dtype=arr.dtype)
    padded[:h, :w] = arr
    ph, pw = padded.shape
    return padded.reshape(ph // 2, 2, pw // 2, 2).transpose(0, 2, 1, 3).reshape(ph // 2, pw // 2, 4)


def downsample_mean(heatmap: np.ndarray) -> np.ndarray:
    """Half-size heatmap: mean of each 2x2 block over the covered cells (NaN if none)."""
    blocks = _blocks(np.asarray(heatmap, dtype=np.float32), np.nan)
    count = np.sum(~np.isnan(blocks), axis=2)
    total = np.nansum(blocks, axis=2)
    out = np.full(count.shape, np.nan, dtype=np.float32)
    np.divide(total, count, out=out, where=count > 0)
    return out


def downsample_any(mask: np.ndarray) -> np.ndarray:
    """Half-size label image: a block is tumor if any of its cells is (small foci stay visible)."""
    return _blocks(np.asarray(mask, dtype=np.uint8), 0).max(axis=2)


def pyramid(level0: np.ndarray, reduce, min_side: int = MIN_LEVEL_SIDE) -> list[np.ndarray]:
    """Level 0 and successive halvings while the next level keeps ``min_side`` on its long side."""
    levels = [level0]
    while max(levels[-1].shape) // 2 >= min_side:
        levels.append(reduce(levels[-1]))
    return levels


def multiscales_attrs(name: str, n_levels: int, cell_l0: float, origin_l0, mpp: float) -> dict:
    return {
        "multiscales": [
            {
                "name": name,
                "axes": AXES,
                "datasets": [
                    {"path": str(k), "coordinateTransformations": level_transforms(2**k, cell_l0, origin_l0, mpp)}
                    for k in range(n_levels)
                ],
                "type": "mean (2x2 blocks)" if name != LABEL_NAME else "max (2x2 blocks)",
            }
        ],
    }


def _write_levels(group: zarr.Group, levels: list[np.ndarray], fill) -> None:
    for k, arr in enumerate(levels):
        chunks = tuple(min(512, max(1, s)) for s in arr.shape)
        group.create_array(
            str(k), data=arr, chunks=chunks, fill_value=fill, dimension_names=["y", "x"],
        )


def write_heatmap_omezarr(
    path: str | Path,
    heatmap: np.ndarray,
    mask: np.ndarray,
    cell_l0: float,
    origin_l0: tuple[float, float],
    mpp: float,
    provenance: dict | None = None,
) -> Path:
    """Write ``heatmap`` (grid of probabilities) with ``mask`` as its label image.

    Written to a temporary folder beside ``path`` and renamed into place, so a reader
    never sees half a pyramid and an interrupted write leaves the previous one."""
    path = Path(path)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if heatmap.shape != mask.shape or heatmap.ndim != 2:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} must be the same 2-D grid")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(path)  # the umask's mode, not mkdtemp's 0700
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        heat_levels = pyramid(heatmap, downsample_mean)
        _write_levels(root, heat_levels, np.nan)
        root.attrs["ome"] = {"version": NGFF_VERSION, **multiscales_attrs("heatmap", len(heat_levels), cell_l0, origin_l0, mpp)}
        root.attrs["wsipipe"] = dict(provenance or {})

        labels = root.create_group("labels")
        labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": [LABEL_NAME]}
        label = labels.create_group(LABEL_NAME)
        mask_levels = pyramid(mask.astype(np.uint8), downsample_any)
        _write_levels(label, mask_levels, 0)
        label.attrs["ome"] = {
            "version": NGFF_VERSION,
            **multiscales_attrs(LABEL_NAME, len(mask_levels), cell_l0, origin_l0, mpp),
            "image-label": {
                "colors": [{"label-value": 1, "rgba": TUMOR_RGBA}],
                "properties": [{"label-value": 1, "class": "Tumor"}],
                "source": {"image": "../../"},
            },
        }
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; the old folder is removed only after the rename."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
