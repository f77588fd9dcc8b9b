"""``summary.json``: the typed hand-off from stitching to reports, archives and users.

:func:`wsipipe.outputs.stitch.stitch_store` builds a :class:`SlideSummary` and writes it
with :func:`summary_json`; readers (the slide report, the archive) use :func:`load_summary`
and read fields, so mypy checks every hand-off instead of string keys. The JSON keeps the
keys, order and values it always had; sections a later step adds (``ground_truth`` from a
Dice check) are kept as extra fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from wsipipe.errors import StoreError

SUMMARY_NAME = "summary.json"

Number = int | float  # values stored as they were computed: an int stays an int in the JSON


class SummaryError(StoreError):
    """summary.json is missing, not JSON, or not the shape stitching writes."""


class SummarySlide(BaseModel):
    """The slide the summary is about (from the store's ``slide`` attrs)."""

    name: str | None = None
    path: str | None = None
    identity: str | None = None
    width: Number | None = None
    height: Number | None = None
    mpp: Number
    mpp_source: str | None = None  # where mpp came from: openslide, tiff-resolution, objective-power, override, default
    mpp_file: Number | None = None  # the resolution the file states (None: it states none)


class ModelRef(BaseModel):
    sha256: str | None = None
    arch: str | None = None
    training_data: str | None = None  # the model card's words on where its training patches came from


class Provenance(BaseModel):
    config_hash: dict[str, str] = {}  # stage -> hash of its config section
    model: ModelRef = ModelRef()
    stitch_identity: str  # hash of every input of the outputs (see stitch.summary_identity)


class SlideScore(BaseModel):
    """Slide-level score of the tumor probabilities (see stitch.ScoreAccumulator)."""

    n: int
    k: int
    max: Number | None = None
    top_k_mean: Number | None = None
    mean: Number | None = None


class HeatmapInfo(BaseModel):
    shape: list[int]
    cell_size_l0: Number
    cell_size_um: Number
    origin_l0: list[Number]
    cells_per_patch: int
    min_tumor_area_cells: int


class FileScale(BaseModel):
    """Where a raster output lies on the slide: its pixel (or cell) size and top-left corner."""

    um_per_px: Number  # edge of one pixel/cell, µm
    downsample_l0: Number  # edge of one pixel/cell, level-0 px
    origin_l0: list[Number] = [0, 0]  # level-0 (x, y) of the top-left corner


class QCFlag(BaseModel):
    """One slide QC flag; measured values (``value``, ``patches``) ride along as extra fields."""

    model_config = ConfigDict(extra="allow")

    code: str
    severity: str  # qc.FAIL, qc.REVIEW or qc.INFO
    message: str


class QCSection(BaseModel):
    """``summary["qc"]`` (see wsipipe.tiles.qc.slide_qc)."""

    measured: bool = False
    flags: list[QCFlag] = []
    needs_review: bool = False
    flagged_patches: dict[str, int] = {}
    config: dict[str, Any] = {}  # the QCConfig the flags were computed with


class DomainSection(BaseModel):
    """``summary["domain"]``: how far the slide's analysed patches lie from the model's training
    patches in its feature space (wsipipe.models.domain). ``checked`` False: ``reason`` says why not."""

    checked: bool = False
    reason: str | None = None
    n_patches: int | None = None  # analysed patches with a distance
    n_beyond: int | None = None  # ... beyond the training p99
    fraction_beyond: Number | None = None
    p99_distance: Number | None = None  # the training patches' (held out of the fit) 99th percentile
    median_distance: Number | None = None  # this slide's
    training_median_distance: Number | None = None
    flag_fraction: Number | None = None  # qc.ood_fraction
    out_of_domain: bool = False


OUT_OF_DOMAIN = "out_of_domain"


def domain_section(entry: dict[str, Any] | None, distances: Any, fraction: float) -> tuple[DomainSection, QCFlag | None]:
    """The domain block and, when more than ``fraction`` of the analysed patches lie beyond the
    training p99, the review flag ``out_of_domain``. ``entry``: the infer stage's ``domain``
    record; ``distances``: the analysed patches' distances (None when the store has none)."""
    from wsipipe.models.domain import slide_domain
    from wsipipe.tiles.qc import REVIEW

    entry = entry or {}
    if not entry.get("checked"):
        why = entry.get("reason") or "inference recorded no out-of-domain check (a store classified before it existed)"
        return DomainSection(reason=why), None
    if distances is None:
        return DomainSection(reason="the store has no per-patch domain distances"), None
    result = slide_domain(distances, entry, fraction)
    if not result["n_patches"]:
        return DomainSection(reason="no analysed patch has a domain distance"), None
    section = DomainSection(
        checked=True, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()},
    )
    if not section.out_of_domain:
        return section, None
    flag = QCFlag(
        code=OUT_OF_DOMAIN, severity=REVIEW,
        message=f"outside the model's training domain: {result['fraction_beyond']:.0%} of patches "
        f"({result['n_beyond']} of {result['n_patches']}) lie beyond the 99th percentile of its training patches' "
        f"feature distance (limit {fraction:.0%}); its probabilities here are unvalidated",
        value=round(result["fraction_beyond"], 4), patches=result["n_beyond"],
    )
    return section, flag


class SlideSummary(BaseModel):
    """Everything ``summary.json`` holds, in the order it is written."""

    model_config = ConfigDict(extra="allow")  # e.g. "ground_truth", added by a Dice check

    version: str
    slide: SummarySlide
    store: str
    provenance: Provenance
    config: dict[str, Any]  # the StitchConfig used
    n_patches: int
    skipped_patches: dict[str, Any] | None = None  # tiling's corrupt-patch report
    # Patches left out of the analysis by reason ({"mostly_background": n}); None when the
    # store has no QC measures to decide by (every patch analysed).
    excluded_patches: dict[str, int] | None = None
    n_tumor_patches: int
    threshold: Number
    slide_score: SlideScore
    decision: str  # "tumor" or "normal"
    decision_reason: str | None = None  # one sentence: the regions and the score behind the decision
    tumor_area_mm2: Number
    tumor_area_basis: str | None = None  # what the area, polygons and masks count (stitch.AREA_BASIS_*)
    n_tumor_regions: int
    heatmap: HeatmapInfo
    seconds: dict[str, Number | None] = {}  # wall time per stage
    files: dict[str, str] = {}  # output kind -> file name in the slide folder
    file_scales: dict[str, FileScale] = {}  # output kind (as in files) -> scale of that raster
    qc: QCSection = QCSection()
    exports: dict[str, str] = {}  # outputs for other tools, kind -> name
    domain: DomainSection = DomainSection()  # the out-of-domain check (wsipipe.models.domain)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (what stitch_store has always returned)."""
        return self.model_dump(mode="python")


def summary_json(summary: SlideSummary) -> str:
    """The text of summary.json."""
    return json.dumps(summary.as_dict(), indent=2)


def parse_summary(data: Any, path: str | Path) -> SlideSummary:
    """A summary from already-parsed JSON; SummaryError naming ``path`` when it is not one."""
    try:
        return SlideSummary.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise SummaryError(path, f"not a wsipipe summary ({where}: {first['msg']}); rerun `wsipipe stitch`") from None


def load_summary(path: str | Path) -> SlideSummary:
    """Read summary.json (a file, or a slide output folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SummaryError(path, f"no {SUMMARY_NAME} in the slide output folder; run the pipeline (or stitch) first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SummaryError(path, f"cannot read {SUMMARY_NAME}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SummaryError(path, f"{SUMMARY_NAME} is not valid JSON: {exc}") from None
    return parse_summary(data, path)
