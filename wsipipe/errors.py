"""Typed errors a user can meet. Each names the file (or field) and the problem.

The CLI turns any :class:`WsipipeError` into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator


class WsipipeError(Exception):
    """Base class: ``path`` is the file the problem is about (may be None)."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):
        # Rebuilt from (path, problem), not from the joined message: errors cross process
        # boundaries (Dask workers, Prefect task states) and must arrive as the same type.
        return type(self), (self.path, self.problem)


class SlideOpenError(WsipipeError):
    """The file is missing, not a slide, or a format OpenSlide cannot open."""


class SlideReadError(WsipipeError):
    """The slide opened, but reading pixels failed (corrupt tile, truncated file)."""


class MissingMppError(WsipipeError):
    """The slide has no usable resolution (mpp) and none was given.

    ``reason`` says what is missing, ``hint`` how to give the resolution; the hint depends on
    the command at hand (``--mpp-override`` for ``wsipipe run``/``tile``, an ``mpp`` manifest
    column for an archive), so a caller that knows better swaps it with :meth:`with_hint`.
    :data:`FIND` (how to find the value) follows either: the decision can flip with a wrong guess."""

    HINT = (
        "give it with --mpp-override <µm/px> (this slide's resolution, replaces any the file states) or "
        "--mpp-default <µm/px> (used only for slides whose file states none, or an implausible one)"
    )
    FIND = (
        "to find it: the objective power in the scanner's records (20x ≈ 0.5 µm/px, 40x ≈ 0.25), the scanner "
        "model's specification, or the mpp another slide from the same scanner states "
        "(python -c \"import openslide, sys; print(openslide.OpenSlide(sys.argv[1]).properties.get('openslide.mpp-x'))\" "
        "OTHER.svs); a wrong guess scales every patch and can flip the decision"
    )

    def __init__(self, path: str | Path | None, reason: str, hint: str | None = None):
        self.reason = reason
        self.hint = hint or self.HINT
        super().__init__(path, f"{reason}; {self.hint}; {self.FIND}")

    def with_hint(self, hint: str) -> MissingMppError:
        """The same error with another way to give the resolution."""
        return type(self)(self.path, self.reason, hint)

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.hint)


class ImplausibleMppError(MissingMppError):
    """The file states a resolution no brightfield scanner has (outside ``qc.mpp_range``): as
    good as none, so the run stops the same way and asks for it."""


class NoTissueError(WsipipeError):
    """Tissue detection found nothing: reported, never a silent empty output."""


class StoreError(WsipipeError):
    """A Zarr store is missing, incomplete or inconsistent for the asked stage."""


class ModelLoadError(WsipipeError):
    """A weights file is missing, unsafe, or does not fit the architecture."""


class ConfigError(WsipipeError):
    """A configuration file or parameter is invalid (names the field and value)."""


class ModelCardConflict(ConfigError):
    """A setting the user gave (tile.mpp, tile.patch_size) disagrees with what the model's card says
    the model was trained at; names both values and the card file. ``--force`` runs anyway."""


class ParameterError(ConfigError, ValueError):
    """A threshold or fraction given to a library function is out of range (names the parameters and values).

    Also a ValueError, which is what callers of those functions caught before."""


class AnnotationError(WsipipeError):
    """An annotation file (GeoJSON) or a labelled patch folder is unusable (names the feature / file)."""


class RegistryError(WsipipeError):
    """The model registry refused an operation (unknown version, a worse model, a different test split)."""


class OutputWriteError(WsipipeError):
    """Writing an output failed (volume full, file too large, no permission); earlier outputs stay intact."""


# Errors that mean "the output volume refused the write", not "the input is bad".
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


@contextmanager
def writing_outputs(path: str | Path) -> Iterator[None]:
    """Turn a full / read-only output volume into an :class:`OutputWriteError` naming the file
    (or ``path`` when the OS did not say which)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise OutputWriteError(exc.filename or path, f"cannot write output: {exc.strerror or exc}") from exc


class ExportError(WsipipeError):
    """An output for another tool (GeoJSON, OME-Zarr, OME-TIFF) does not meet its format."""


class TrainingDataError(WsipipeError, ValueError):
    """The labelled patches cannot train a model: one class only, a train/val/test split left
    empty, patches and labels that do not pair up. Names the stores where the caller knows them.

    Also a ValueError, which is what callers of the training functions caught before."""


class StainError(WsipipeError, ValueError):
    """A stain normaliser cannot be fitted (too few stained pixels: the patches are glass) or
    names a method that does not exist. Also a ValueError, for callers that catch one."""
