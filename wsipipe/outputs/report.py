"""QA reports: one self-contained HTML file per slide and one per archive run.

Everything a reader needs is inside the file (images as ``data:`` URIs, a few lines of
inline JavaScript for sorting and filtering), so a report can be mailed, archived or
opened from a USB stick without a server or a network. Pages are Jinja2 templates in
``wsipipe/outputs/templates`` with autoescaping on: slide metadata comes from files we do not
control and is always rendered as text.

The figures are drawn with matplotlib's object API (no pyplot global state).
"""

from __future__ import annotations

import base64
import io
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import numpy as np
import zarr

from wsipipe import __version__

from wsipipe.tiles import qc, store
from wsipipe.config import PipelineConfig, QCConfig, StitchConfig, TileConfig
from wsipipe.errors import MissingMppError, SlideOpenError, SlideReadError, WsipipeError
from wsipipe.geojson import read_geojson
from wsipipe.files import write_atomic
from wsipipe.outputs.figures import (
    Background, HeatmapGrid, draw_analysis, draw_background, draw_rings, figure_jpeg, legend_below, outline_handle, read_background,
    saved_heatmap, tumor_label,
)
from wsipipe.outputs.summary import SUMMARY_NAME, load_summary

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
ARCHIVE_REPORT_NAME = "archive-report.html"
INDEX_REPORT_NAME = "archive-index.html"
# Slide properties shown in the report (the rest are many and of little use to a reader).
MAX_PROPERTIES = 80
MAX_PROPERTY_CHARS = 300


# --------------------------------------------------------------------------- encoding helpers


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg_uri(rgb: np.ndarray, quality: int = 88) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return data_uri(buf.getvalue(), "image/jpeg")


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return data_uri(buf.getvalue(), "image/png")


def _environment():
    from jinja2 import Environment, PackageLoader

    env = Environment(
        loader=PackageLoader("wsipipe.outputs", "templates"),
        autoescape=True,  # every template, whatever its name: metadata is untrusted text
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["stamp"] = _stamp
    env.filters["duration"] = _duration
    return env


def _num(value: Any, digits: int = 3) -> str:
    """A number for people: fixed significant digits, '—' for missing."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}".replace(",", " ")
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}g}" if abs(value) < 10 ** digits else f"{float(value):,.0f}".replace(",", " ")
    return str(value)


def parse_stamp(text: str | None) -> datetime | None:
    """An ISO 8601 timestamp of a result row (``started``, ``finished``) as an aware datetime;
    None when missing or unreadable (rows of runs that did not record them)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _stamp(moment: Any) -> str:
    """A datetime for people, in UTC to the second; '—' for missing."""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "—"


def _duration(seconds: float | None) -> str:
    """Seconds for people: 58.7 s, 12 min 5 s, 3 h 20 min."""
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.3g} s" if seconds < 100 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


# --------------------------------------------------------------------------- slide report: data


def _tumor_regions(geojson: Path, mpp: float) -> tuple[list[dict], Any]:
    from shapely.geometry import MultiPolygon

    tumor = read_geojson(geojson).get("Tumor", MultiPolygon()) if geojson.is_file() else MultiPolygon()
    polys = sorted(tumor.geoms, key=lambda p: -p.area)
    regions = []
    for k, poly in enumerate(polys, start=1):
        x0, y0, x1, y1 = poly.bounds
        c = poly.representative_point()
        regions.append({
            "index": k, "area_mm2": poly.area * mpp**2 / 1e6, "centre_l0": (int(c.x), int(c.y)),
            "bounds_l0": (int(x0), int(y0), int(x1), int(y1)),
        })
    return regions, MultiPolygon(polys)


def _slide_properties(path: str | None) -> tuple[list[tuple[str, str]], str | None, dict[str, str] | None]:
    """The slide file's properties to show (key, value) or a note why they are not shown, and
    all of them (None when the file cannot be read)."""
    if not path or not Path(path).is_file():
        return [], "slide file not available where it was read", None
    try:
        import openslide

        with openslide.OpenSlide(path) as handle:
            items = sorted(handle.properties.items())
    except Exception as exc:  # a file replaced or damaged since the run: the report still renders
        return [], f"cannot read the slide's properties: {exc}", None
    shown = [(k, v if len(v) <= MAX_PROPERTY_CHARS else v[:MAX_PROPERTY_CHARS] + "…") for k, v in items[:MAX_PROPERTIES]]
    note = f"{len(items) - MAX_PROPERTIES} more not shown" if len(items) > MAX_PROPERTIES else None
    return shown, note, dict(items)


def _patch_cards(
    group: zarr.Group, indices: Iterable[int], probs: np.ndarray | None, reasons: dict[int, str] | None = None,
    tissue: np.ndarray | None = None,
) -> list[dict]:
    """Gallery tiles: pixels, level-0 x, y, probability, QC reasons and tissue fraction (``tissue``:
    per patch, None when the store has no QC measures)."""
    indices = [int(i) for i in indices]
    if not indices:
        return []
    order = np.argsort(indices)  # zarr wants increasing indices
    sorted_idx = np.asarray(indices)[order]
    pixels = _gallery_pixels(group, sorted_idx)
    if pixels is None:
        return []
    coords = np.asarray(store.array(group, store.COORDS).get_orthogonal_selection((sorted_idx,)))
    cards: list[dict | None] = [None] * len(indices)
    for pos, k in enumerate(order):
        i = int(sorted_idx[pos])
        cards[int(k)] = {
            "index": i,
            "x": int(coords[pos, 0]),
            "y": int(coords[pos, 1]),
            "probability": None if probs is None else float(probs[i]),
            "reason": (reasons or {}).get(i, ""),
            "tissue": None if tissue is None else float(tissue[i]),
            "src": _jpeg_uri(pixels[pos]),
        }
    return [c for c in cards if c is not None]


def _gallery_pixels(group: zarr.Group, indices: np.ndarray) -> np.ndarray | None:
    """The gallery's patches (increasing ``indices``): the stored ones, or, for a store tiled with
    ``tile.store_patches: false``, read from the slide. None (the report has no gallery) when that
    slide cannot be read any more: moved, replaced or damaged since the run."""
    from wsipipe.tiles.tiling import read_store_patches  # here: the archive report needs no slide reader

    store_path = str(group.store_path).removeprefix("file:")
    try:
        return read_store_patches(group, indices, store_path)
    except (SlideOpenError, SlideReadError, MissingMppError) as exc:
        log.warning("%s: report without its patch gallery: %s", store_path, exc)
        return None


def _tumor_probabilities(group: zarr.Group, stitch_config: dict) -> np.ndarray | None:
    """The tumor column the slide was stitched with (``stitch_config``: the summary's config),
    chosen as stitching chooses it (:func:`wsipipe.outputs.stitch.tumor_column`)."""
    from wsipipe.outputs.stitch import tumor_column

    arr = store.optional_array(group, store.PROBABILITIES)
    if arr is None:
        return None
    column = tumor_column(arr.attrs, tuple(arr.shape), stitch_config.get("tumor_class"),
                          int(stitch_config.get("class_index", -1)), None)
    return column.of(np.asarray(arr[:], dtype=np.float32))


# --------------------------------------------------------------------------- slide report: figures


# Overview colours: tissue green, tumor red on a white halo, QC reasons by colour.
TISSUE_STYLE: dict[str, Any] = {"color": "#1a9850", "linewidth": 1.2}
TUMOR_RED = "#b2182b"
OVERVIEW_TUMOR_HALO: dict[str, Any] = {"color": "white", "linewidth": 2.6}
OVERVIEW_TUMOR_LINE: dict[str, Any] = {"color": TUMOR_RED, "linewidth": 1.3}


def _draw_tissue(ax, tissue_wkt: str | None, ds: float) -> list[tuple[Any, str]]:
    """The tissue outline; its legend entry."""
    import shapely
    from matplotlib.lines import Line2D

    if not tissue_wkt:
        return []
    draw_rings(ax, shapely.from_wkt(tissue_wkt), ds, **TISSUE_STYLE)
    return [(Line2D([], [], **TISSUE_STYLE), "tissue")]


def _draw_tumor(ax, tumor, ds: float, grid: HeatmapGrid | None = None) -> list[tuple[Any, str]]:
    """Numbered tumor regions; their legend entry (with the threshold and minimum area when
    the heatmap's ``grid`` is known)."""
    for k, poly in enumerate(tumor.geoms, start=1):
        draw_rings(ax, poly, ds, **OVERVIEW_TUMOR_HALO)
        draw_rings(ax, poly, ds, **OVERVIEW_TUMOR_LINE)
        p = poly.representative_point()
        ax.annotate(str(k), (p.x / ds, p.y / ds), color="white", fontsize=9, fontweight="bold", ha="center",
                    va="center", bbox={"boxstyle": "circle,pad=0.2", "fc": TUMOR_RED, "ec": "white", "lw": 0.8})
    if not len(tumor.geoms):
        return []
    label = "tumor region" if grid is None else tumor_label(grid.threshold, grid.min_area_mm2)
    return [(outline_handle(OVERVIEW_TUMOR_LINE, OVERVIEW_TUMOR_HALO), label.replace("tumor region", "tumor region, numbered", 1))]


def _draw_flagged(ax, flagged_xy: dict[str, np.ndarray], patch_size_l0: float, ds: float) -> list[tuple[Any, str]]:
    """Outlines of QC-flagged patches (up to 400 per reason); a legend entry per reason present."""
    from matplotlib.patches import Rectangle

    colours = {"pen": "#2166ac", "blur": "#f58d16", "colour": "#c51b7d"}
    legend: list[tuple[Any, str]] = []
    for reason, xy in flagged_xy.items():
        for x, y in xy[:400]:  # enough to show where; the gallery lists them
            ax.add_patch(Rectangle((x / ds, y / ds), patch_size_l0 / ds, patch_size_l0 / ds, fill=False,
                                   ec=colours[reason], lw=0.9))
        if len(xy):
            legend.append((Rectangle((0, 0), 1, 1, fill=False, ec=colours[reason], lw=1.2),
                           f"QC: {reason} ({len(xy)} patches)"))
    return legend


def overview_plot(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    tissue_wkt: str | None,
    tumor,
    flagged_xy: dict[str, np.ndarray],
    patch_size_l0: float,
    *,
    grid: HeatmapGrid | None = None,
    slide: dict[str, Any] | None = None,
    tile: dict[str, Any] | None = None,
):
    """The overview's matplotlib figure (:func:`overview_figure` encodes it): the slide with the
    tissue outline, the analysed area, numbered tumor regions, hot pieces under the minimum
    area and QC-flagged patches.

    ``grid``: the stitched heatmap (analysed area, threshold, minimum area); ``slide`` and
    ``tile``: the store's attrs, to read the background from the slide file at the figure's
    size (else, or when that file is gone, the store's ``thumbnail`` is shown)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if slide is not None:
        background = read_background(thumbnail, thumb_downsample, slide, tile or {})
    else:
        background = Background(np.asarray(thumbnail), float(thumb_downsample), "thumbnail")
    width_l0, height_l0 = (grid.bounds if grid is not None and grid.bounds else None) or background.extent_l0[1:3]
    width_in = 7.0
    fig = Figure(figsize=(width_in, min(max(width_in * height_l0 / max(width_l0, 1.0) + 0.5, 2.8), 10.5)), dpi=130,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Drawn in level-0 units (ds = 1): the background, the heatmap grid and the polygons line up.
    legend = _draw_tissue(ax, tissue_wkt, 1.0)
    legend += draw_analysis(ax, grid, tumor, line=OVERVIEW_TUMOR_LINE, halo=OVERVIEW_TUMOR_HALO)
    legend = _draw_tumor(ax, tumor, 1.0, grid) + legend + _draw_flagged(ax, flagged_xy, patch_size_l0, 1.0)
    ax.set_xlim(0, width_l0)
    ax.set_ylim(height_l0, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    legend_below(fig, legend, fontsize=7)
    draw_background(fig, ax, background)
    return fig


def overview_figure(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    tissue_wkt: str | None,
    tumor,
    flagged_xy: dict[str, np.ndarray],
    patch_size_l0: float,
    *,
    grid: HeatmapGrid | None = None,
    slide: dict[str, Any] | None = None,
    tile: dict[str, Any] | None = None,
) -> str:
    """:func:`overview_plot` as a JPEG data URI (a photograph-like figure: a quarter of its PNG)."""
    fig = overview_plot(
        thumbnail, thumb_downsample, tissue_wkt, tumor, flagged_xy, patch_size_l0, grid=grid, slide=slide, tile=tile
    )
    return data_uri(figure_jpeg(fig), "image/jpeg")


# --------------------------------------------------------------------------- slide report: headline (pure)


SEVERITIES = (qc.FAIL, qc.REVIEW, qc.INFO)  # most severe first
QC_STATUS = {qc.FAIL: "failed", qc.REVIEW: "needs review", qc.INFO: "info only", None: "no flags"}
QC_CARD_CLASS = {qc.FAIL: "fail", qc.REVIEW: "review", qc.INFO: "info", None: "ok"}
# Where a slide's resolution comes from when it is read from the file's own mpp tags.
MPP_FROM_FILE = ("openslide", "tiff-resolution")
# Gallery: patches more glass than this (QC background fraction) are left out when the
# summary and config name no max_background.
DEFAULT_MAX_BACKGROUND = 0.5


def qc_card(severities: list[str]) -> dict[str, Any]:
    """The QC card from the severities of the flags listed under it: one count of them all,
    the count per severity, and the status and colour of the most severe. A severity this
    version does not know counts as "review" (a person looks rather than nobody)."""
    known = [s if s in SEVERITIES else qc.REVIEW for s in severities]
    counts = [(s, known.count(s)) for s in SEVERITIES if s in known]
    worst = counts[0][0] if counts else None
    n = len(known)
    breakdown = ", ".join(f"{k} {s}" for s, k in counts)
    return {
        "count": n,
        "counts": dict(counts),
        "worst": worst,
        "status": QC_STATUS[worst],
        "css": QC_CARD_CLASS[worst],
        "count_text": f"{n} flag{'' if n == 1 else 's'}: {breakdown}" if n else "0 flags",
    }


def gallery_limit(explicit: float | None, stitch_config: dict, tile_attrs: dict) -> float:
    """Most background (QC background fraction) a top-scoring gallery patch may have: the one
    given, else the ``max_background`` the slide was stitched with (``stitch_config``: the
    summary's config; patches with more glass were not analysed) or tiled with (``tile_attrs``),
    else the config's default for it, else :data:`DEFAULT_MAX_BACKGROUND`."""
    defaults = [model.model_fields.get("max_background") for model in (StitchConfig, TileConfig)]
    candidates = [explicit, stitch_config.get("max_background"), tile_attrs.get("max_background"),
                  *(None if d is None else d.default for d in defaults)]
    for value in candidates:
        if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0:
            return float(value)
    return DEFAULT_MAX_BACKGROUND


def top_scoring(probs: np.ndarray | None, background: np.ndarray | None, limit: float, n: int) -> tuple[list[int], dict]:
    """The ``n`` most probable patches among those with at most ``limit`` background (QC
    background fraction), most probable first, and what the gallery says about the choice.

    ``background`` None (a store without QC measures): ranked over every patch, as is a slide
    where no patch is within the limit."""
    total = 0 if probs is None else len(probs)
    note: dict[str, Any] = {"limit": limit, "total": total, "eligible": total, "ranked": "all"}
    if probs is None or not total or n <= 0:
        return [], note
    order = np.argsort(-probs, kind="stable")
    if background is None:
        note["ranked"] = "unmeasured"
        return [int(i) for i in order[:n]], note
    eligible = np.asarray(background)[order] <= limit
    note["eligible"] = int(eligible.sum())
    if not note["eligible"]:
        note["ranked"] = "none-eligible"
        return [int(i) for i in order[:n]], note
    note["ranked"] = "tissue"
    return [int(i) for i in order[eligible][:n]], note


def file_mpp(slide_attrs: dict, properties: dict[str, str] | None) -> tuple[bool, float | None]:
    """(known, value): the resolution the slide file itself states (µm/px), None when it states
    none. The store's ``mpp_file`` when it has one; else read from the file's ``properties``
    (None when they could not be read: not known)."""
    if "mpp_file" in slide_attrs:
        value = slide_attrs["mpp_file"]
        return True, float(value) if value else None
    if slide_attrs.get("mpp_source") in MPP_FROM_FILE:
        return True, float(slide_attrs.get("mpp") or 0.0) or None
    if properties is None:
        return False, None
    from wsipipe.slides.slide import resolve_mpp

    try:
        value, source = resolve_mpp(Path(str(slide_attrs.get("path") or "")), properties)
    except MissingMppError:
        return True, None
    return True, value if source in MPP_FROM_FILE else None


def resolution_note(mpp: float | None, source: str | None, file_value: tuple[bool, float | None],
                    objective_power: float | None = None) -> dict[str, Any]:
    """The resolution shown beside the decision: ``warn`` when it was not read from the file's
    mpp tags (set by the user, a default, estimated from the objective power), with a sentence
    saying where it came from and what the file states."""
    shown = "—" if not mpp else f"{float(mpp):.4g} µm/px"
    if source in MPP_FROM_FILE:
        return {"warn": False, "value": shown, "text": f"read from the file ({source})"}
    known, stated = file_value
    what = {
        "override": "set by the user",
        "default": "set by the user as the default for files without one",
        "objective-power": "estimated from the objective power"
        + (f" ({float(objective_power):g}×) as 10 µm / magnification" if objective_power else ""),
    }.get(str(source), f"not read from the file ({source or 'source unknown'})")
    said = "" if not known else " (the file states none)" if stated is None else f" (the file states {stated:.4g} µm/px)"
    return {
        "warn": True, "value": shown,
        "text": f"resolution {shown} {what}{said}. Patch size, tumor area and the decision depend on it.",
    }


def domain_note(domain: Any, training_data: str | None) -> dict[str, Any]:
    """The out-of-domain check shown beside the decision: ``warn`` when the slide lies outside the
    model's training domain, a sentence with the share of patches beyond its training range, and
    the model's provenance in words (its card's ``training_data``)."""
    trained = f"trained on: {training_data}" if training_data else "trained on: not recorded (the model card does not say)"
    if domain is None or not getattr(domain, "checked", False):
        why = getattr(domain, "reason", None) or "the summary predates the check"
        return {"warn": False, "checked": False, "value": "not checked", "text": f"no out-of-domain check was possible: {why}",
                "trained": trained}
    share = float(domain.fraction_beyond or 0.0)
    if domain.out_of_domain:
        text = f"outside the model's training domain: {share:.0%} of patches beyond its training range — review"
    else:
        text = f"within the model's training domain: {share:.0%} of patches beyond its training range"
    return {"warn": bool(domain.out_of_domain), "checked": True, "value": "outside" if domain.out_of_domain else "within",
            "text": text, "trained": trained, "share": share}


def _scale_text(value: Any) -> str | None:
    """A file's scale as the summary gives it (a µm/px number, a record with ``um_per_px`` or
    a small dict), for people."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{float(value):.4g} µm/px"
    if isinstance(getattr(value, "um_per_px", None), int | float):
        return f"{float(value.um_per_px):.4g} µm/px"
    if isinstance(value, dict):
        for key in ("um_per_px", "mpp", "µm_per_px", "pixel_size_um", "cell_size_um"):
            if isinstance(value.get(key), int | float):
                return f"{float(value[key]):.4g} µm/px"
        return ", ".join(f"{k} {v}" for k, v in value.items()) or None
    return str(value) if value else None


def file_rows(summary: Any, thumb_um: float | None) -> list[dict[str, Any]]:
    """The slide folder's output files (kind, name, scale). Scales come from the summary's
    ``file_scales`` where it has them; the tumor mask PNG (drawn on the thumbnail's grid,
    ``thumb_um`` µm/px) and heatmap.npy (one value per heatmap cell) are known otherwise."""
    scales = getattr(summary, "file_scales", None) or {}
    scales = scales if isinstance(scales, dict) else {}
    known = {"heatmap": summary.heatmap.cell_size_um, "heatmap_ome_zarr": summary.heatmap.cell_size_um,
             "tumor_mask_png": thumb_um}
    rows = []
    for kind, name in {**summary.files, **summary.exports}.items():
        scale = _scale_text(scales.get(kind) if kind in scales else scales.get(name))
        if scale is None and known.get(kind):
            scale = f"{float(known[kind]):.4g} µm/px"
        if scale is None and kind == "tumor_geojson":
            scale = "level-0 pixels"
        rows.append({"kind": kind.replace("_", " "), "name": name, "scale": scale})
    return rows


def _levels(slide: dict) -> list[dict[str, Any]]:
    """Pyramid levels as (width, height, downsample) for the metadata table."""
    dims, downs = slide.get("level_dimensions") or [], slide.get("level_downsamples") or []
    return [{"width": d[0], "height": d[1], "downsample": ds} for d, ds in zip(dims, downs, strict=False)]


# --------------------------------------------------------------------------- slide report


def slide_report_context(slide_dir: str | Path, qc_cfg: QCConfig | None = None, max_background: float | None = None) -> dict[str, Any]:
    """Everything the slide template shows, read from a slide output folder. ``max_background``:
    see :func:`gallery_limit`."""
    slide_dir = Path(slide_dir)
    summary = load_summary(slide_dir / SUMMARY_NAME)
    store_path = slide_dir / "patches.zarr"
    if not (store_path / "zarr.json").is_file():
        store_path = Path(summary.store or store_path)
    group = store.open_store(store_path)
    meta = store.meta(group)
    slide = meta.get(store.META_SLIDE) or {}
    tile, tissue = meta.get(store.META_TILE) or {}, meta.get(store.META_TISSUE) or {}
    if qc_cfg is None:  # the thresholds the flags were computed with
        qc_cfg = QCConfig(**summary.qc.config) if summary.qc.config else QCConfig()
    mpp = float(summary.slide.mpp or slide.get("mpp") or 0.0)

    regions, tumor = _tumor_regions(slide_dir / "tumor.geojson", mpp)
    probs = _tumor_probabilities(group, summary.config)
    n_gallery = qc_cfg.report_patches
    measures = qc.read_measures(group)
    background = None if measures is None or len(measures["background_fraction"]) != (0 if probs is None else len(probs)) \
        else measures["background_fraction"]
    top, gallery = top_scoring(probs, background, gallery_limit(max_background, summary.config, tile), n_gallery)
    tissue_fraction = None if background is None else 1.0 - background
    flagged, flagged_xy = _qc_flagged(group, measures, qc_cfg, n_gallery)

    thumbnail = np.asarray(store.array(group, store.THUMBNAIL)[...])
    heatmap_png = slide_dir / "heatmap.png"
    properties, properties_note, all_properties = _slide_properties(slide.get("path"))
    seconds = {k: v for k, v in summary.seconds.items() if v is not None}
    thumb_ds = float(tile.get("thumb_downsample", 1.0))
    return {
        "title": f"wsipipe slide report — {slide.get('name') or summary.slide.name}",
        "version": __version__,
        "summary": summary,
        "slide": slide,
        "tile": tile,
        "tissue": tissue,
        "levels": _levels(slide),
        "properties": properties,
        "properties_note": properties_note,
        "score": summary.slide_score,
        "decision": summary.decision,
        "decision_reason": getattr(summary, "decision_reason", None),
        "domain": domain_note(getattr(summary, "domain", None), summary.provenance.model.training_data),
        "resolution": resolution_note(mpp, slide.get("mpp_source"), file_mpp(slide, all_properties), slide.get("objective_power")),
        "threshold": summary.threshold,
        "tumor_area_mm2": summary.tumor_area_mm2,
        "regions": regions,
        "flags": summary.qc.flags,
        "qc_card": qc_card([f.severity for f in summary.qc.flags]),
        "qc_measured": summary.qc.measured,
        "flag_counts": summary.qc.flagged_patches,
        "seconds": seconds,
        "total_seconds": sum(float(v) for v in seconds.values()),
        "provenance": summary.provenance,
        "files": file_rows(summary, thumb_ds * mpp if mpp else None),
        "overview_src": overview_figure(
            thumbnail, thumb_ds, tissue.get("polygon_wkt"), tumor, flagged_xy, float(tile.get("patch_size_l0", 0.0)),
            grid=saved_heatmap(slide_dir, summary), slide=slide, tile=tile,
        ),
        "heatmap_src": data_uri(heatmap_png.read_bytes(), "image/png") if heatmap_png.is_file() else None,
        "top_patches": _patch_cards(group, top, probs, tissue=tissue_fraction),
        "gallery": gallery,
        "flagged_patches": _patch_cards(group, [i for i, _ in flagged], probs, dict(flagged), tissue=tissue_fraction),
        "mil": _mil_view(slide_dir, summary),
    }


def _mil_view(slide_dir: Path, summary: Any) -> dict[str, Any] | None:
    """The slide-level (MIL) model's call and attention map, when ``wsipipe run --mil`` added them."""
    section = (summary.model_extra or {}).get("mil")
    if not isinstance(section, dict):
        return None
    png = slide_dir / str((section.get("files") or {}).get("attention_png", "attention.png"))
    return {**section, "attention_src": data_uri(png.read_bytes(), "image/png") if png.is_file() else None}


def _qc_flagged(
    group: zarr.Group, measures: dict[str, np.ndarray] | None, qc_cfg: QCConfig, limit: int,
) -> tuple[list[tuple[int, str]], dict[str, np.ndarray]]:
    """(patch index, reasons) of up to ``limit`` flagged patches, and the coords of every flagged patch by reason."""
    if measures is None or not len(measures["focus"]):
        return [], {}
    coords = np.asarray(store.array(group, store.COORDS)[:])
    flagged_xy = {reason: coords[mask] for reason, mask in qc.patch_flags(measures, qc_cfg).items()}
    return qc.flagged_patches(measures, qc_cfg, limit), flagged_xy


def write_slide_report(
    slide_dir: str | Path, qc_cfg: QCConfig | None = None, only_if_changed: bool = False, max_background: float | None = None,
) -> Path:
    """Write ``slide_dir/report.html`` (self-contained) from a slide output folder; returns its path.

    ``only_if_changed`` (pipeline reruns): leave an identical report as it is, so rerunning a
    finished slide writes nothing (and works on a full disk). ``max_background``: the most
    glass a top-scoring gallery patch may show (see :func:`gallery_limit`)."""
    slide_dir = Path(slide_dir)
    context = slide_report_context(slide_dir, qc_cfg, max_background)
    html = _environment().get_template("slide.html.j2").render(**context)
    path = slide_dir / REPORT_NAME
    if only_if_changed and path.is_file() and path.read_bytes() == html.encode():
        return path
    return write_atomic(path, html)


# --------------------------------------------------------------------------- no-tissue page

NO_TISSUE_THUMB_PX = 1400  # longest edge of the thumbnail on a no-tissue page


def _no_tissue_inputs(out_dir: Path, slide_path: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """What the no-tissue page shows of the slide: its attrs, the tissue attrs and the thumbnail
    tissue detection looked at, from the store tiling left (it writes them before it raises),
    else read from the slide file."""
    found: dict[str, Any] = {"slide": {}, "tissue": {}, "tile": {}, "thumbnail": None, "downsample": None, "note": None}
    store_path = out_dir / "patches.zarr"
    if (store_path / "zarr.json").is_file():
        try:
            group = store.open_store(store_path)
            meta = store.meta(group)
            found.update(slide=meta.get(store.META_SLIDE) or {}, tissue=meta.get(store.META_TISSUE) or {},
                         tile=meta.get(store.META_TILE) or {})
            thumb = store.optional_array(group, store.THUMBNAIL)
            if thumb is not None:
                found.update(thumbnail=np.asarray(thumb[...]), downsample=found["tile"].get("thumb_downsample"))
        except (WsipipeError, OSError, ValueError) as exc:  # a damaged store: the slide file still has it all
            log.warning("%s: no-tissue page reads the slide instead of the store: %s", store_path, exc)
    if found["thumbnail"] is None:
        from wsipipe.slides.slide import open_slide

        try:
            with open_slide(slide_path, cfg.mpp_override) as opened:
                found["slide"] = found["slide"] or opened.info()
                found["thumbnail"], found["downsample"] = opened.thumbnail(cfg.tissue.thumb_mpp, cfg.tissue.max_thumb_px)
        except WsipipeError as exc:
            found["note"] = f"no thumbnail: {exc}"
    return found


def _setting(value: Any) -> str:
    """A config value as a config file writes it (true/false, 50 000, 0.07)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def no_tissue_context(out_dir: str | Path, slide_path: str | Path, error: BaseException | str, cfg: PipelineConfig) -> dict[str, Any]:
    """Everything the no-tissue page shows (see :func:`write_no_tissue_report`)."""
    out_dir, slide_path = Path(out_dir), Path(slide_path)
    found = _no_tissue_inputs(out_dir, slide_path, cfg)
    slide, tissue = found["slide"], found["tissue"]
    thumb, ds = found["thumbnail"], found["downsample"]
    thumb_src = None
    if thumb is not None:
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(thumb, dtype=np.uint8))
        image.thumbnail((NO_TISSUE_THUMB_PX, NO_TISSUE_THUMB_PX))  # in place, keeps the aspect
        thumb_src = _jpeg_uri(np.asarray(image))
        ds = None if ds is None else float(ds) * thumb.shape[1] / image.width
    mpp = slide.get("mpp")
    settings = [
        {"name": f"tissue.{name}", "value": _setting(getattr(cfg.tissue, name)), "help": field.description or ""}
        for name, field in type(cfg.tissue).model_fields.items()
    ]
    settings.append({"name": "tile.min_tissue", "value": _setting(cfg.tile.min_tissue),
                     "help": type(cfg.tile).model_fields["min_tissue"].description or ""})
    problem = error.problem if isinstance(error, WsipipeError) else str(error)
    return {
        "title": f"wsipipe slide report — {slide.get('name') or slide_path.name}: no tissue",
        "version": __version__,
        "name": slide.get("name") or slide_path.name,
        "path": str(slide_path),
        "slide": slide,
        "problem": problem,
        "tissue_found": bool(tissue.get("found")),
        "tissue_area_mm2": tissue.get("area_mm2"),
        "saturation_threshold": tissue.get("saturation_threshold"),
        "thumb_src": thumb_src,
        "thumb_um": None if ds is None or not mpp else float(ds) * float(mpp),
        "thumb_note": found["note"],
        "resolution": resolution_note(mpp, slide.get("mpp_source"), file_mpp(slide, None), slide.get("objective_power")),
        "cfg": cfg,
        "settings": settings,
        "written": datetime.now(UTC),
    }


def write_no_tissue_report(out_dir: str | Path, slide_path: str | Path, error: BaseException | str, cfg: PipelineConfig) -> Path:
    """Write ``out_dir/report.html`` for a slide where tissue detection found nothing to tile: its
    name, the thumbnail detection looked at, the reason and the tissue-detection settings, so the
    slide is not only a failed row. Creates ``out_dir`` when needed; returns the page's path."""
    out_dir = Path(out_dir)
    html = _environment().get_template("no_tissue.html.j2").render(**no_tissue_context(out_dir, slide_path, error, cfg))
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_dir / REPORT_NAME, html)


# --------------------------------------------------------------------------- archive report


def _report_link(out_dir: str | None, base: Path) -> str | None:
    """The slide report's path relative to ``base`` (the page's folder), when it is there."""
    if not out_dir:
        return None
    target = Path(out_dir).resolve() / REPORT_NAME
    return Path(os.path.relpath(target, base)).as_posix() if target.is_file() else None


def _row_view(row: dict, base: Path) -> dict[str, Any]:
    """One archive row (wsipipe.run.rows) flattened for the table; ``base`` = the report's folder."""
    summary = row.get("summary") or {}
    score = (summary.get("slide_score") or {}).get("top_k_mean")
    flags = [f.get("code", "?") for f in (summary.get("qc") or {}).get("flags", [])]
    slide = str(row.get("slide") or "")
    return {
        "slide": slide,
        "name": row.get("name") or Path(slide).name,
        "status": row.get("status") or "failed",
        "error": row.get("error") or "",
        "score": score,
        "decision": summary.get("decision") or "",
        "threshold": summary.get("threshold"),
        "tumor_area_mm2": summary.get("tumor_area_mm2"),
        "flags": flags,
        "needs_review": bool((summary.get("qc") or {}).get("needs_review")),
        "seconds": row.get("seconds"),
        "started": parse_stamp(row.get("started")),
        "finished": parse_stamp(row.get("finished")),
        "link": _report_link(row.get("out_dir"), base),
    }


def archive_counts(rows: list[dict]) -> dict[str, int]:
    """Counts for the archive summary: by status, by decision, and slides that need review."""
    counts = {"slides": len(rows), "ok": 0, "failed": 0, "skipped": 0, "tumor": 0, "normal": 0, "needs_review": 0}
    for row in rows:
        status = row.get("status") or "failed"
        counts[status] = counts.get(status, 0) + 1
        summary = row.get("summary") or {}
        if summary.get("decision") in ("tumor", "normal"):
            counts[summary["decision"]] += 1
        if (summary.get("qc") or {}).get("needs_review"):
            counts["needs_review"] += 1
    return counts


def archive_throughput(rows: list[dict]) -> dict[str, Any]:
    """The run's wall time and throughput from the rows' wall-clock timestamps.

    ``wall_s``: first slide start to last slide finish (None without timestamps);
    ``processed``: slides computed (status ok; skipped and failed ones are not throughput);
    ``per_hour``: processed slides per hour of wall time, None when nothing was processed."""
    starts = [t for t in (parse_stamp(r.get("started")) for r in rows) if t is not None]
    ends = [t for t in (parse_stamp(r.get("finished")) for r in rows) if t is not None]
    processed = sum(1 for r in rows if r.get("status") == "ok")
    if not starts or not ends:
        return {"start": None, "end": None, "wall_s": None, "processed": processed, "per_hour": None}
    start, end = min(starts), max(ends)
    wall_s = max((end - start).total_seconds(), 0.0)
    per_hour = 3600.0 * processed / wall_s if processed and wall_s > 0 else None
    return {"start": start, "end": end, "wall_s": wall_s, "processed": processed, "per_hour": per_hour}


def _throughput_axes(ax, views: list[dict], start) -> None:
    """Completions against wall-clock time since the run's first slide started."""
    done = sorted(((v["finished"] - start).total_seconds(), v["status"]) for v in views if v["finished"] is not None)
    span = max((t for t, _ in done), default=0.0)
    scale, unit = (60.0, "min") if span > 600 else (1.0, "s")
    for status, colour, label in (("ok", "#1a9850", "processed"), ("skipped", "#7f8c9a", "skipped (already done)"),
                                  ("failed", "#b2182b", "failed")):
        times = [t / scale for t, s in done if s == status]
        if times:
            ax.step([0.0, *times], range(len(times) + 1), where="post", color=colour, label=label)
    ax.set(xlabel=f"wall-clock time since the run's first slide started ({unit})", ylabel="slides completed")
    ax.set_xlim(left=0.0)
    ax.legend(fontsize=8)


def archive_figures(views: list[dict], start=None) -> list[dict[str, str]]:
    """Score distribution, tumor area distribution and, when the rows carry wall-clock
    timestamps (``start``: the run's first start), slides completed over the run (PNG data URIs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    def figure():
        fig = Figure(figsize=(4.2, 3.0), dpi=120, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of slides
        ax.spines[["top", "right"]].set_visible(False)
        return fig, ax

    scores = [v["score"] for v in views if v["score"] is not None]
    areas = [v["tumor_area_mm2"] for v in views if v["tumor_area_mm2"] is not None]
    out = []

    fig, ax = figure()
    ax.hist(scores, bins=np.linspace(0, 1, 21), color="#4575b4", edgecolor="white")
    for t in sorted({v["threshold"] for v in views if v["threshold"] is not None}):
        ax.axvline(t, color="0.2", linestyle="--", linewidth=1)
        ax.annotate("threshold", (t, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=7, color="0.2")
    ax.set(xlabel="slide score (top-k mean probability)", ylabel="slides", xlim=(0, 1))
    out.append({"title": "Score distribution", "src": _figure_uri(fig)})

    fig, ax = figure()
    top = max(areas, default=0.0) or 1.0
    ax.hist(areas, bins=np.linspace(0, top * 1.05, 21), color="#d73027", edgecolor="white")
    ax.set(xlabel="tumor area (mm²)", ylabel="slides")
    out.append({"title": "Tumor area distribution", "src": _figure_uri(fig)})

    if start is not None:
        fig, ax = figure()
        _throughput_axes(ax, views, start)
        out.append({"title": "Slides completed over the run (wall clock)", "src": _figure_uri(fig)})
    return out


def write_archive_report(
    rows: list[dict], out_path: str | Path, title: str = "wsipipe archive report", index_link: str | None = None,
) -> Path:
    """Write one self-contained HTML page for an archive run (rows of wsipipe.run.rows); returns
    its path. ``index_link``: the folder's index page, relative to the report, to link to."""
    out_path = Path(out_path)
    views = [_row_view(row, out_path.parent.resolve()) for row in rows]
    run = archive_throughput(rows)
    html = _environment().get_template("archive.html.j2").render(
        title=title, version=__version__, rows=views, counts=archive_counts(rows), run=run, index_link=index_link,
        figures=archive_figures(views, run["start"]),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_path, html)


# --------------------------------------------------------------------------- archive index


def _index_view(entry: dict, base: Path) -> dict[str, Any]:
    """One index entry (wsipipe.run.archive.index_entry) for the index table."""
    slide = str(entry.get("slide") or "")
    when = parse_stamp(entry.get("when"))
    processed = parse_stamp(entry.get("processed"))
    return {
        **entry,
        "slide": slide,
        "name": entry.get("name") or Path(slide).name,
        "status": entry.get("status") or "failed",
        "when": when,
        "processed": processed,
        "flags": entry.get("flags") or [],
        "link": _report_link(entry.get("out_dir"), base),
    }


def write_index_report(entries: list[dict], out_path: str | Path, title: str = "wsipipe archive index") -> Path:
    """One self-contained page listing every slide ever processed into an output folder
    (entries of ``archive-index.json``): latest status and when, link to its report. No images:
    it stays light at thousands of rows."""
    out_path = Path(out_path)
    base = out_path.parent.resolve()
    views = [_index_view(e, base) for e in entries]
    counts = {s: sum(1 for v in views if v["status"] == s) for s in ("ok", "skipped", "failed")}
    counts["slides"] = len(views)
    counts["current"] = sum(1 for v in views if v.get("current") and v["link"])
    counts["needs_review"] = sum(1 for v in views if v.get("needs_review"))
    html = _environment().get_template("index.html.j2").render(
        title=title, version=__version__, rows=views, counts=counts,
        updated=max((v["when"] for v in views if v["when"] is not None), default=None),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_path, html)


def archive_markdown(rows: list[dict], report_path: str | Path) -> str:
    """Markdown for a Prefect artifact: summary counts and a link to the archive report."""
    c = archive_counts(rows)
    uri = Path(report_path).resolve().as_uri()
    lines = [
        "## wsipipe archive report",
        "",
        f"[Open the report]({uri})",
        "",
        "| slides | ok | skipped | failed | tumor | normal | needs review |",
        "|---|---|---|---|---|---|---|",
        f"| {c['slides']} | {c['ok']} | {c['skipped']} | {c['failed']} | {c['tumor']} | {c['normal']} | {c['needs_review']} |",
    ]
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        lines += ["", "Failed slides:"]
        lines += [f"- `{Path(str(r.get('slide'))).name}`: {str(r.get('error') or '').replace('|', '/')}" for r in failed[:20]]
    return "\n".join(lines) + "\n"
