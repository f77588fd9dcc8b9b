"""Opening slides and reading pixels at a target resolution (OpenSlide at the edge).

``open_slide`` wraps ``openslide.OpenSlide`` in a small read-only :class:`Slide`
that knows its physical resolution and a stable identity. All coordinates are
level-0 pixels (x, y); regions come back as RGB uint8 composited over the
slide's background colour (white unless the file says otherwise), so areas
outside the scanned image read as background rather than black.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Mapping

import numpy as np
import openslide
from PIL import Image

from wsipipe.errors import ImplausibleMppError, MissingMppError, SlideOpenError, SlideReadError
from wsipipe.slides.resample import area_reduce

if TYPE_CHECKING:
    from wsipipe.config import PipelineConfig

log = logging.getLogger(__name__)

# TIFF ResolutionUnit -> micrometres per unit.
_UM_PER_UNIT = {"centimeter": 10_000.0, "inch": 25_400.0, "millimeter": 1_000.0, "micrometer": 1.0}
# Plausible level-0 resolutions of brightfield scanners (µm/px); outside this we warn.
PLAUSIBLE_MPP = (0.05, 20.0)
_IDENTITY_BYTES = 1 << 20


@dataclass(frozen=True)
class Slide:
    """An open whole-slide image. Create with :func:`open_slide`."""

    path: Path
    handle: openslide.OpenSlide = field(repr=False, compare=False)
    mpp: float
    mpp_source: str  # "override" | "openslide" | "tiff-resolution" | "objective-power" | "default"
    mpp_file: float | None = None  # what the file's mpp or TIFF resolution tags state, whatever was used
    _fast: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.handle.dimensions

    @property
    def level_count(self) -> int:
        return self.handle.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.handle.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        # OpenSlide's own floats (e.g. 4.016129...), never rounded.
        return tuple(float(d) for d in self.handle.level_downsamples)

    @property
    def properties(self) -> Mapping[str, str]:
        return self.handle.properties

    @property
    def vendor(self) -> str | None:
        return self.properties.get(openslide.PROPERTY_NAME_VENDOR)

    @property
    def objective_power(self) -> float | None:
        return _float_or_none(self.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))

    @property
    def mpp_plausible(self) -> bool:
        return PLAUSIBLE_MPP[0] <= self.mpp <= PLAUSIBLE_MPP[1]

    @property
    def background(self) -> tuple[int, int, int]:
        hex_rgb = self.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
        if hex_rgb and len(hex_rgb) == 6:
            return tuple(int(hex_rgb[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        return (255, 255, 255)

    @cached_property
    def identity(self) -> str:
        """Stable id: hash of file size, first and last MiB, and the properties.

        Cheap on gigabyte files, and changes when the file is replaced or re-scanned."""
        return slide_identity(self.path, self.properties)

    def info(self) -> dict:
        """JSON-ready description for provenance and reports."""
        return {
            "path": str(self.path),
            "name": self.path.name,
            "identity": self.identity,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "mpp_file": self.mpp_file,
            "mpp_plausible": self.mpp_plausible,
            "objective_power": self.objective_power,
        }

    def best_level(self, downsample: float, tolerance: float = 0.0) -> int:
        """Coarsest level whose downsample does not exceed ``downsample*(1+tolerance)``."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1.0 + tolerance):
                best = level
        return best

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) from ``level``, top-left at level-0 (x, y).

        The pixels are exactly ``openslide.OpenSlide.read_region``'s, composited over the
        background colour. We call OpenSlide's C function into a numpy buffer ourselves:
        the public wrapper's ARGB->RGBA conversion and PIL round trip cost as much again
        as the read. The result may be a strided view; copy it if you keep it."""
        try:
            bgra = _read_bgra(self.handle, int(x), int(y), int(level), int(width), int(height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                self.path, f"reading {width}x{height} px at level {level}, level-0 (x={x}, y={y}) failed: {exc}"
            ) from None
        return composite_bgra(bgra, self.background)

    def read_level(
        self, level: int, x: int, y: int, width: int, height: int, fast: bool = True, out: np.ndarray | None = None,
        factor: int = 1,
    ) -> np.ndarray:
        """RGB (height, width, 3) at *level pixel* coordinates (x, y) of ``level``.

        With ``fast`` (default) TIFF-family slides are decoded tile by tile without OpenSlide
        (see :mod:`wsipipe.slides.tiffread`): same pixels, exactly on the level's grid. Otherwise,
        and for other formats, OpenSlide reads it (at levels > 0 OpenSlide interpolates
        when x * downsample is not an integer).

        ``factor`` > 1: the level area-reduced by that integer (each output pixel the mean of a
        factor x factor block of level pixels), and (x, y, width, height) are in reduced pixels."""
        reader = self.fast_reader(level) if fast else None
        if reader is not None and reader.can_reduce(factor):
            try:
                return reader.read(int(x), int(y), int(width), int(height), out=out, factor=factor)
            except Exception as exc:
                raise SlideReadError(
                    self.path, f"decoding tiles for {width}x{height} px at level {level} ({x}, {y}) failed: {exc}"
                ) from None
        if factor > 1:  # read the full-resolution block, then reduce it
            full = self.read_level(level, x * factor, y * factor, width * factor, height * factor, fast=fast)
            return area_reduce(full, factor, out=out)
        ds = self.level_downsamples[level]
        region = self.read_region(round(x * ds), round(y * ds), level, width, height)
        if out is None:
            return region
        out[...] = region
        return out

    def fast_reader(self, level: int):
        """The direct tile reader for ``level``, or None when OpenSlide must read it."""
        if level not in self._fast:
            from wsipipe.slides.tiffread import open_level

            self._fast[level] = open_level(
                str(self.path), self.vendor, self.level_dimensions[level], self.background
            )
        return self._fast[level]

    def read_scaled(
        self, x: float, y: float, width_l0: float, height_l0: float, out_width: int, out_height: int
    ) -> np.ndarray:
        """The level-0 rectangle (x, y, width_l0, height_l0) resampled to ``out_width x out_height``.

        Reads from the coarsest level that still has at least the output's resolution and
        resizes the remainder with an antialiasing (Lanczos) filter."""
        scale = min(width_l0 / out_width, height_l0 / out_height)
        level = self.best_level(scale, tolerance=1e-6)
        ds = self.level_downsamples[level]
        # Level-`level` pixel box covering the rectangle, then a fractional crop inside it.
        lx0, ly0 = math.floor(x / ds), math.floor(y / ds)
        lx1, ly1 = math.ceil((x + width_l0) / ds), math.ceil((y + height_l0) / ds)
        region = self.read_region(round(lx0 * ds), round(ly0 * ds), level, lx1 - lx0, ly1 - ly0)
        box = (x / ds - lx0, y / ds - ly0, (x + width_l0) / ds - lx0, (y + height_l0) / ds - ly0)
        if region.shape[:2] == (out_height, out_width) and box == (0.0, 0.0, float(out_width), float(out_height)):
            return np.ascontiguousarray(region)
        img = Image.fromarray(np.ascontiguousarray(region)).resize((out_width, out_height), Image.Resampling.LANCZOS, box=box)
        return np.asarray(img)

    def read_at_mpp(self, x: float, y: float, width: int, height: int, mpp: float) -> np.ndarray:
        """``width x height`` pixels at resolution ``mpp`` (µm/px), top-left at level-0 (x, y)."""
        scale = mpp / self.mpp
        return self.read_scaled(x, y, width * scale, height * scale, width, height)

    def thumbnail(self, mpp: float, max_px: int | None = None, block: int = 2048) -> tuple[np.ndarray, float]:
        """Whole slide at about ``mpp`` µm/px (coarser if needed so that neither edge exceeds about
        ``max_px``), read block by block (bounded memory).

        It is a pyramid level area-reduced by a whole factor (the level as fine as asked that is
        the smallest, so a 100k-px slide reads a few hundred tiles of a low level, not its full
        resolution). Returns (rgb, downsample) where downsample is level-0 px per thumbnail px
        (exact, so thumbnail pixel (i, j) covers level-0 [j*ds, (j+1)*ds) x [i*ds, (i+1)*ds))."""
        w0, h0 = self.dimensions
        want = max(mpp / self.mpp, 1.0)
        if max_px and max(w0, h0) / want > max_px:
            # Capped: the finest level that fits, else the coarsest reduced until it fits.
            level = next((i for i, d in enumerate(self.level_dimensions) if max(d) <= max_px), self.level_count - 1)
            factor = max(1, math.ceil(max(self.level_dimensions[level]) / max_px))
        else:
            level = self.best_level(want, tolerance=1e-6)
            factor = max(1, round(want / self.level_downsamples[level]))
        ds = self.level_downsamples[level] * factor
        lw, lh = self.level_dimensions[level]
        tw, th = max(1, math.ceil(lw / factor)), max(1, math.ceil(lh / factor))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        step = max(64, block // factor)  # thumbnail px per block edge: ~block^2 level px per read
        for ty in range(0, th, step):
            for tx in range(0, tw, step):
                bw, bh = min(step, tw - tx), min(step, th - ty)
                self.read_level(level, tx, ty, bw, bh, out=out[ty : ty + bh, tx : tx + bw], factor=factor)
        return out, ds

    def close(self) -> None:
        for reader in self._fast.values():
            if reader is not None:
                reader.close()
        self._fast.clear()
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def composite_rgba(rgba: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """RGBA (straight alpha, as openslide-python returns it) over a solid background -> RGB uint8."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32)
    return np.round(rgb.astype(np.float32) * a + bg * (1.0 - a)).astype(np.uint8)


def composite_bgra(bgra: np.ndarray, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """OpenSlide's native premultiplied BGRA bytes over a solid background -> RGB (a view when opaque).

    Same result as :func:`composite_rgba` on openslide-python's un-premultiplied RGBA."""
    rgb = bgra[..., 2::-1]
    alpha = bgra[..., 3]
    if alpha.min() == 255:
        return rgb
    a = alpha[..., None].astype(np.float32) / 255.0
    straight = np.where(a > 0, np.minimum(np.round(rgb.astype(np.float32) / np.maximum(a, 1e-6)), 255), 0)
    bg = np.asarray(background, dtype=np.float32)
    # Round-trip through straight alpha exactly as openslide-python does, so both paths agree.
    return np.round(straight * a + bg * (1.0 - a)).astype(np.uint8)


def _read_bgra(handle: openslide.OpenSlide, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    from openslide import lowlevel

    buf = np.empty((h, w, 4), dtype=np.uint8)
    if w and h:
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        lowlevel._read_region(handle._osr, ptr, x, y, level, w, h)  # raises OpenSlideError on failure
    return buf


def _float_or_none(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) and out > 0 else None


def stated_mpp(path: Path, properties: Mapping[str, str]) -> tuple[float, str] | None:
    """The level-0 µm/px the file states (openslide.mpp-x/y, else TIFF resolution tags) and
    which of them said it; None when it states none."""
    mx = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_X))
    my = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    if mx and my:
        if abs(mx - my) / max(mx, my) > 0.01:
            log.warning("%s: non-square pixels (mpp-x %.4f, mpp-y %.4f); using their mean", path, mx, my)
        return (mx + my) / 2.0, "openslide"
    xres = _float_or_none(properties.get("tiff.XResolution"))
    unit = (properties.get("tiff.ResolutionUnit") or "").lower()
    if xres and unit in _UM_PER_UNIT:
        return _UM_PER_UNIT[unit] / xres, "tiff-resolution"
    return None


def resolve_mpp(
    path: Path, properties: Mapping[str, str], override: float | None = None, default: float | None = None,
    valid: tuple[float, float] | None = None,
) -> tuple[float, str]:
    """Level-0 µm/px and where it came from; raises MissingMppError when nothing says.

    Order: explicit ``override`` > openslide.mpp-x/y > TIFF resolution tags > objective power
    (10 µm / magnification, the usual scanner convention, with a warning) > ``default``. The
    objective power is the file's word about this very scan, the default a guess for a whole
    batch, so the power wins. With ``valid`` = (low, high), a value the file gives outside it
    is no resolution at all (72 dpi, an image editor's default, is 352.8 µm/px): the next
    source is tried, and when none is left the error is an ImplausibleMppError naming it."""
    if override is not None:
        return float(override), "override"

    def usable(mpp: float) -> bool:
        return valid is None or valid[0] <= mpp <= valid[1]

    rejected: list[str] = []
    stated = stated_mpp(path, properties)
    if stated:
        if usable(stated[0]):
            return stated
        what = "TIFF resolution tags" if "tiff.XResolution" in properties else "openslide.mpp-x/y"
        rejected.append(f"its {what} say {stated[0]:.4g} µm/px")
    power = _float_or_none(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power:
        mpp = 10.0 / power
        if usable(mpp):
            log.warning("%s: no usable mpp in the file; estimating %.3f µm/px from objective power %gx", path, mpp, power)
            return mpp, "objective-power"
        rejected.append(f"its objective power {power:g}x gives {mpp:.4g} µm/px")
    if default is not None:
        return float(default), "default"
    if rejected and valid is not None:
        raise ImplausibleMppError(
            path, f"implausible resolution in the file: {' and '.join(rejected)}, outside the "
            f"{valid[0]:g}–{valid[1]:g} µm/px of brightfield scanners (qc.mpp_range)",
        )
    raise MissingMppError(path, "no resolution in the file (no openslide.mpp-x/y, TIFF resolution tags or objective power)")


def slide_identity(path: Path, properties: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(_IDENTITY_BYTES))
        if size > _IDENTITY_BYTES:
            fh.seek(max(size - _IDENTITY_BYTES, _IDENTITY_BYTES))
            h.update(fh.read(_IDENTITY_BYTES))
    for key in sorted(properties):
        h.update(f"{key}={properties[key]}\n".encode())
    return h.hexdigest()[:16]


# What OpenSlide reads, and the conversion that makes an image one of them (libvips; --xres and
# --yres are pixels per mm, i.e. 1000 / µm per pixel: 2000 for 0.5 µm/px).
SUPPORTED_FORMATS = (
    "wsipipe reads what OpenSlide reads: Aperio SVS, Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, "
    "Ventana, generic tiled TIFF and DICOM WSI"
)
VIPS_CONVERT = (
    "vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90 --tile-width 256 --tile-height 256 "
    "--xres X --yres X (X = 1000 / µm per pixel, e.g. 2000 for 0.5 µm/px, so the file states its resolution)"
)
_DICOM_WSI_SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def not_a_slide(path: Path, openslide_says: str | None) -> str:
    """Why OpenSlide refused ``path``, for a person: what the file is when we can tell (an untiled
    TIFF, a DICOM file), what is supported and how to convert it; else OpenSlide's own words."""
    try:
        with path.open("rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        return f"cannot read file: {exc}"
    if openslide_says:  # the file is named once, at the start of the line
        openslide_says = openslide_says.replace(f"Reading {path}: ", "")
    said = f" (OpenSlide: {openslide_says})" if openslide_says else ""
    if head[128:132] == b"DICM":
        if _DICOM_WSI_SOP_CLASS not in head:
            return (f"not a slide format OpenSlide can read: a DICOM file that is not a whole-slide image (its SOP "
                    f"class is not VL Whole Slide Microscopy Image Storage){said}; {SUPPORTED_FORMATS}")
        # Explicit-VR ImageType (0008,0008) "CS": OpenSlide tells levels from label/overview images by it.
        missing = "" if b"\x08\x00\x08\x00CS" in head else ", and it has no ImageType (0008,0008), which OpenSlide needs"
        return (f"a DICOM whole-slide image OpenSlide cannot read{said}{missing}; {SUPPORTED_FORMATS}; export it to TIFF "
                f"with a tool that reads it (e.g. Bio-Formats bfconvert), then make a tiled pyramid: {VIPS_CONVERT}")
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        what = _untiled_tiff(path)
        if what:
            return (f"not a slide format OpenSlide can read: {what}, not a tiled pyramidal whole-slide image{said}; "
                    f"{SUPPORTED_FORMATS}; convert it with {VIPS_CONVERT}")
    if openslide_says:
        return f"OpenSlide cannot open it: {openslide_says}"
    return f"not a slide format OpenSlide can read (unsupported or not a slide); {SUPPORTED_FORMATS}"


def _untiled_tiff(path: Path) -> str | None:
    """"an untiled TIFF (...)" when the file is a TIFF whose first image is stored in strips, else None."""
    import tifffile

    quiet = logging.getLogger("tifffile")
    was = quiet.disabled
    quiet.disabled = True  # its warnings about a damaged file would be a second line under the error
    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            first = tif.pages.first
            if first.is_tiled:
                return None
            height, width = first.shape[:2]
            compression = getattr(first.compression, "name", str(first.compression)).lower()
            compression = "uncompressed" if compression == "none" else f"{compression} compression"
    except Exception:  # not a TIFF tifffile parses either: OpenSlide's words stand
        return None
    finally:
        quiet.disabled = was
    more = f", {len(pages)} images in all" if len(pages) > 1 else ""
    return f"an untiled TIFF (a single {width}x{height} image in strips, {compression}{more})"


def open_slide(
    path: str | Path, mpp_override: float | None = None, mpp_default: float | None = None,
    mpp_range: tuple[float, float] | None = None,
) -> Slide:
    """Open any format OpenSlide reads. Errors name the file and the problem.

    The resolution is resolved by :func:`resolve_mpp` (``mpp_range`` = its ``valid``: None
    accepts any value the file gives, with a warning when implausible)."""
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(path, "file not found")
    if path.is_dir():
        raise SlideOpenError(path, "is a directory, not a slide file")
    if path.stat().st_size == 0:
        raise SlideOpenError(path, "file is empty")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideOpenError(path, not_a_slide(path, None)) from None
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(path, not_a_slide(path, str(exc))) from None
    except OSError as exc:
        raise SlideOpenError(path, f"cannot read file: {exc}") from None
    try:
        mpp, source = resolve_mpp(path, handle.properties, mpp_override, mpp_default, mpp_range)
        stated = stated_mpp(path, handle.properties)
    except MissingMppError:
        handle.close()
        raise
    slide = Slide(path=path, handle=handle, mpp=mpp, mpp_source=source, mpp_file=stated[0] if stated else None)
    if not slide.mpp_plausible:
        log.warning("%s: implausible resolution %.4g µm/px (expected %g-%g)", path, mpp, *PLAUSIBLE_MPP)
    return slide


def open_slide_for(path: str | Path, cfg: PipelineConfig) -> Slide:
    """:func:`open_slide` with a run's resolution settings: ``mpp_override``, ``mpp_default``,
    and ``qc.mpp_range`` (a file's implausible value stops the slide: see :func:`resolve_mpp`)."""
    return open_slide(path, cfg.mpp_override, cfg.mpp_default, cfg.qc.mpp_range)


_cache_lock = threading.Lock()
_cache: dict[tuple[str, float | None, float], Slide] = {}  # insertion order = least recently used first
CACHED_SLIDES = 4  # shared handles kept per process (each holds up to 4 tile rows, 128–512 MiB, of decoded tiles per level)


def cached_slide(path: str | Path, mpp_override: float | None = None) -> Slide:
    """One shared handle per (file, override, mtime) in this process: OpenSlide handles are
    thread-safe and keep a tile cache, so Dask tasks on one worker reuse them. At most
    :data:`CACHED_SLIDES` are kept: a long-lived worker going through an archive would
    otherwise keep every slide's handle and decoded tiles."""
    path = Path(path)
    key = (str(path.resolve()), mpp_override, path.stat().st_mtime if path.exists() else 0.0)
    with _cache_lock:
        slide = _cache.pop(key, None)
        if slide is None:
            slide = open_slide(path, mpp_override)
        _cache[key] = slide  # (re)inserted as the most recently used
        while len(_cache) > CACHED_SLIDES:
            _release(_cache.pop(next(iter(_cache))))
        return slide


def _release(slide: Slide) -> None:
    """Drop a shared handle's decoded tiles now; the handle itself closes when the last task
    reading through it lets go (closing it here could break a read in another thread)."""
    for reader in slide._fast.values():
        if reader is not None:
            reader.drop_cache()


def forget_cached_slide(path: str | Path, mpp_override: float | None = None) -> int:
    """Drop this process's shared handle(s) for ``path`` (after a read left one unusable, or
    once a slide is tiled). Returns the tiles their direct readers had decoded."""
    resolved = str(Path(path).resolve())
    with _cache_lock:
        dropped = [_cache.pop(k) for k in [k for k in _cache if k[0] == resolved and k[1] == mpp_override]]
    for slide in dropped:
        _release(slide)  # not closed: another thread may still be reading through it
    return sum(r.decoded for slide in dropped for r in slide._fast.values() if r is not None)
