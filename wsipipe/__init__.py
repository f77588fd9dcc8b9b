"""wsipipe: whole-slide images -> tissue -> Zarr patches -> classifier -> heatmaps and tumor masks.

The public API, one function per stage (each also a ``wsipipe`` command)::

    from wsipipe import load_config, open_slide, tile_slide, load_model, infer_store, stitch_store, run_slide

Sub-packages follow the data flow: ``slides`` (reading, tissue) -> ``tiles`` (grid, tiler,
QC, the Zarr store) -> ``models`` (loading, inference) -> ``outputs`` (stitching, reports,
GeoJSON, OME-Zarr); ``learn`` builds models, ``run`` drives slides and archives end to end.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("wsipipe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# Resolved on first use, so `import wsipipe.slides` does not pull in torch, Dask or Prefect.
_API = {
    "load_config": "wsipipe.config",
    "open_slide": "wsipipe.slides.slide",
    "tile_slide": "wsipipe.tiles.tiling",
    "load_model": "wsipipe.models.model",
    "infer_store": "wsipipe.models.inference",
    "stitch_store": "wsipipe.outputs.stitch",
    "run_slide": "wsipipe.run.pipeline",
}
__all__ = ["__version__", "infer_store", "load_config", "load_model", "open_slide", "run_slide", "stitch_store", "tile_slide"]

if TYPE_CHECKING:
    from wsipipe.config import load_config
    from wsipipe.models.inference import infer_store
    from wsipipe.models.model import load_model
    from wsipipe.outputs.stitch import stitch_store
    from wsipipe.run.pipeline import run_slide
    from wsipipe.slides.slide import open_slide
    from wsipipe.tiles.tiling import tile_slide


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'wsipipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
