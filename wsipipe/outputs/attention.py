"""The attention map of a slide-level (MIL) model: each patch's attention weight stitched onto the
heatmap grid by the same chunkwise accumulator as the probabilities
(:class:`wsipipe.outputs.stitch.HeatmapAccumulator`), drawn as ``attention.png`` over the slide
with the heatmap's colours and background (:mod:`wsipipe.outputs.figures`).

Attention sums to 1 over a slide, so its raw values shrink with the slide's size; the figure
shows it relative to the slide's most attended cell (1 = that cell), which reads the same on
any slide. ``attention.npy`` keeps the raw mean weight per cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsipipe.files import temp_dir_beside, write_atomic
from wsipipe.outputs.figures import (
    Background, HeatmapGrid, draw_background, figure_png, heatmap_cmap, read_background, scale_bar,
)
from wsipipe.outputs.stitch import CHUNK_PATCHES, HeatmapAccumulator, _npy_bytes, read_inputs
from wsipipe.tiles import store

ATTENTION_FILES = {"attention_png": "attention.png", "attention": "attention.npy"}
OME_ZARR_NAME = "attention.ome.zarr"


def stitch_attention(group: zarr.Group, store_path: Path, attention: np.ndarray, chunk_patches: int = CHUNK_PATCHES) -> np.ndarray:
    """Mean attention per heatmap cell (NaN: no patch with attention there); ``attention`` is (N,)
    over the store's patches, NaN for those the model did not see."""
    inputs = read_inputs(group, store_path)
    acc = HeatmapAccumulator(inputs.grid_shape, inputs.cells_per_patch)
    for sl in store.chunk_slices(inputs.n, chunk_patches):
        a = np.asarray(attention[sl], dtype=np.float32)
        keep = np.isfinite(a)
        acc.add(np.asarray(inputs.grid_ij[sl])[keep], a[keep])
    return acc.result()


def attention_figure(background: Background, grid: HeatmapGrid, slide_mpp: float | None, title: str):
    """attention.png's figure: relative attention over the slide, a scale bar and a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    width_l0, height_l0 = grid.bounds or background.extent_l0[1:3]
    width_in = 10.0
    height_in = min(max(width_in * 0.88 * height_l0 / max(width_l0, 1.0) + 0.6, 3.0), 14.0)
    fig = Figure(figsize=(width_in, height_in), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(0, width_l0)
    ax.set_ylim(height_l0, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if slide_mpp:
        scale_bar(ax, width_l0, height_l0, slide_mpp)
    cbar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=heatmap_cmap()), ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("attention, relative to the slide's maximum (no colour: not analysed)")
    draw_background(fig, ax, background, grid)
    return fig


def write_attention_omezarr(path: Path, values: np.ndarray, cell_l0: float, origin_l0, mpp: float, provenance: dict) -> Path:
    """The attention grid as an OME-Zarr image on the heatmap's grid and µm scale (same
    transforms as heatmap.ome.zarr, so napari overlays the two); written beside, then renamed."""
    import shutil

    from wsipipe.outputs.omezarr import NGFF_VERSION, _replace_dir, _write_levels, downsample_mean, multiscales_attrs, pyramid

    tmp = temp_dir_beside(path)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        levels = pyramid(np.asarray(values, dtype=np.float32), downsample_mean)
        _write_levels(root, levels, np.nan)
        root.attrs["ome"] = {"version": NGFF_VERSION, **multiscales_attrs("attention", len(levels), cell_l0, origin_l0, mpp)}
        root.attrs["wsipipe"] = dict(provenance)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_attention(
    store_path: str | Path, out_dir: str | Path, attention: np.ndarray, probability: float, label: str,
    ome_zarr: bool = False, provenance: dict | None = None,
) -> dict[str, str]:
    """attention.npy and attention.png (and ``ome_zarr``: attention.ome.zarr) in ``out_dir``;
    returns their names by kind."""
    store_path, out_dir = Path(store_path), Path(out_dir)
    group = store.open_store(store_path, mode="r")
    values = stitch_attention(group, store_path, attention)
    inputs = read_inputs(group, store_path)
    top = np.nanmax(values) if np.isfinite(values).any() else 1.0
    relative = values / top if top > 0 else values
    meta: dict[str, Any] = inputs.meta
    background = read_background(
        np.asarray(store.array(group, store.THUMBNAIL)[...]), inputs.thumb_downsample, inputs.slide,
        meta.get(store.META_TILE) or {},
    )
    grid = HeatmapGrid(relative, inputs.stride_l0, inputs.origin, 1.0, 0.0, inputs.bounds)
    name = inputs.slide.get("name") or Path(str(inputs.slide.get("path", store_path))).name
    fig = attention_figure(background, grid, inputs.slide_mpp, f"{name}: MIL {label} (p = {probability:.3f}): attention")
    write_atomic(out_dir / ATTENTION_FILES["attention"], _npy_bytes(values))
    write_atomic(out_dir / ATTENTION_FILES["attention_png"], figure_png(fig))
    files = dict(ATTENTION_FILES)
    if ome_zarr:
        write_attention_omezarr(out_dir / OME_ZARR_NAME, values, inputs.stride_l0, inputs.origin, inputs.slide_mpp,
                                provenance or {})
        files["attention_ome_zarr"] = OME_ZARR_NAME
    return files
