"""Typed errors a user can meet. Each names the file (or field) and the problem.

The CLI turns any :class:`WsipipeError` into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

from pathlib import Path


class WsipipeError(Exception):
    """Base class: ``path`` is the file the problem is about (may be None)."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class SlideOpenError(WsipipeError):
    """The file is missing, not a slide, or a format OpenSlide cannot open."""


class SlideReadError(WsipipeError):
    """The slide opened, but reading pixels failed (corrupt tile, truncated file)."""


class MissingMppError(WsipipeError):
    """The slide has no usable resolution (mpp) and none was given."""


class NoTissueError(WsipipeError):
    """Tissue detection found nothing: reported, never a silent empty output."""


class StoreError(WsipipeError):
    """A Zarr store is missing, incomplete or inconsistent for the asked stage."""


class ModelLoadError(WsipipeError):
    """A weights file is missing, unsafe, or does not fit the architecture."""


class ConfigError(WsipipeError):
    """A configuration file or parameter is invalid (names the field and value)."""


class ExportError(WsipipeError):
    """An output for another tool (GeoJSON, OME-Zarr, OME-TIFF) does not meet its format."""
