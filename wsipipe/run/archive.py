"""Archives of slides: what to process, what is already done, and how results are reported.

Everything here is plain Python on files (no Prefect): the flows in ``flows/`` only wire
these functions to tasks. The "done" check reads what is on disk (store stage markers and
summary.json provenance), so it survives a server restart and a fresh process.

A result row (one per slide, shared with the QA report) is a
:class:`wsipipe.run.rows.SlideResult`; its JSON form (``as_dict``) is what
archive-results.json holds and what :func:`result_row` returns. The functions here that
read rows take either form.
"""

from __future__ import annotations

import csv
import glob
import logging
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from wsipipe.config import PipelineConfig
from wsipipe.errors import ConfigError, MissingMppError, StoreError, WsipipeError
from wsipipe.run.names import slide_output_name
from wsipipe.run.rows import STATUSES, SlideResult, error_line

Row = SlideResult | dict[str, Any]
log = logging.getLogger(__name__)

# Extensions OpenSlide reads (the slide's main file). DICOM slides are one folder of files.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
MANIFEST_COLUMNS = ("slide", "path", "file", "filename")


# --------------------------------------------------------------------------- what to process


def scan_archive(source: str | Path) -> list[Path]:
    """The slides named by ``source``: a folder (searched recursively), a glob pattern,
    a CSV manifest (``.csv``), or one slide file. Sorted, without duplicates, as absolute paths
    (symlinks kept), so result rows name a slide the same from any working folder.

    A manifest's rows name slides relative to the manifest's folder; missing files are
    kept (they become failed rows naming the file, not a silent gap)."""
    text = str(source)
    path = _absolute(Path(text).expanduser())
    if path.suffix.lower() == ".csv":
        return read_manifest(path)
    if path.is_dir():
        return _dedupe_dicom(sorted(p for p in path.rglob("*") if p.is_file() and _is_slide_name(p)))
    if glob.has_magic(text):
        return _dedupe_dicom(sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()))
    if path.is_file():
        return [path]
    raise ConfigError(path, "archive not found (expected a folder, a glob pattern, a .csv manifest or a slide file)")


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised without resolving symlinks."""
    return Path(os.path.normpath(os.path.abspath(path)))


def read_manifest(path: str | Path) -> list[Path]:
    """Slide paths from a CSV with a header holding one of ``slide``, ``path``, ``file``,
    ``filename``; blank rows and rows starting with ``#`` are skipped. Per-slide setting
    columns (:data:`SETTING_COLUMNS`) are read by :func:`read_manifest_settings`; other
    columns are ignored."""
    return list(_manifest_rows(Path(path), log_ignored=False))


# Manifest columns that set one slide's config: column -> config field. ``mpp`` is the
# slide's level-0 µm/px, for a file that has none or a wrong one.
SETTING_COLUMNS = {"mpp": "mpp_override"}


def read_manifest_settings(path: str | Path) -> dict[Path, dict[str, Any]]:
    """Per-slide config fields from a manifest's setting columns (:data:`SETTING_COLUMNS`):
    slide path (as :func:`read_manifest` gives it) -> ``{"mpp_override": 0.25}``, only for
    slides with a non-empty setting cell. A bad value (not a number, <= 0, out of the
    field's range) is a ConfigError naming the manifest, the row and the column."""
    return {slide: settings for slide, settings in _manifest_rows(Path(path)).items() if settings}


def archive_settings(source: str | Path) -> dict[Path, dict[str, Any]]:
    """Per-slide config fields of an archive: those of a CSV manifest, none for a folder, a
    glob or a slide file. Read before any work, so a bad value fails the run up front."""
    path = Path(str(source)).expanduser()
    return read_manifest_settings(path) if path.suffix.lower() == ".csv" else {}


def slide_config(cfg: PipelineConfig, settings: dict[str, Any] | None) -> PipelineConfig:
    """``cfg`` with one slide's manifest settings on top (``cfg`` itself when there are none)."""
    if not settings:
        return cfg
    return cfg.model_copy(update=settings)


def _manifest_rows(path: Path, log_ignored: bool = True) -> dict[Path, dict[str, Any]]:
    """Slide -> its settings, in manifest order without duplicates. Rows are counted as a
    spreadsheet shows them (the file's lines; the header is row 1)."""
    import io

    path = _absolute(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(path, "manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read manifest: {exc}") from None
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    slide_col = -1
    setting_cols: dict[int, str] = {}  # cell index -> column name
    slides: dict[Path, dict[str, Any]] = {}
    where: dict[Path, int] = {}  # slide -> row it was first listed in
    ignored: list[str] = []
    for cells in reader:
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [c.strip().lower() for c in cells]
            slide_col = next((header.index(c) for c in MANIFEST_COLUMNS if c in header), -1)
            if slide_col < 0:
                raise ConfigError(
                    path, f"manifest has no slide column (header {header}; expected one of {list(MANIFEST_COLUMNS)})"
                )
            setting_cols = {i: name for i, name in enumerate(header) if name in SETTING_COLUMNS}
            ignored = [name for i, name in enumerate(header) if i != slide_col and i not in setting_cols and name]
            continue
        value = cells[slide_col].strip() if slide_col < len(cells) else ""
        if not value:
            continue
        p = Path(value).expanduser()
        slide = _absolute(p if p.is_absolute() else path.parent / p)
        settings = {
            SETTING_COLUMNS[name]: _setting_value(path, reader.line_num, name, cells[i].strip())
            for i, name in setting_cols.items()
            if i < len(cells) and cells[i].strip()
        }
        if slide in slides:
            if settings != slides[slide]:
                raise ConfigError(
                    path, f"row {reader.line_num}: {value} is listed again (first in row {where[slide]}) with other settings"
                )
            continue
        slides[slide] = settings
        where[slide] = reader.line_num
    if header is None:
        raise ConfigError(path, f"manifest is empty (expected a header row with one of {list(MANIFEST_COLUMNS)})")
    if ignored and log_ignored:
        log.info(
            "%s: columns ignored: %s (per-slide columns: %s)", path, ", ".join(ignored), ", ".join(SETTING_COLUMNS)
        )
    return slides


def _setting_value(manifest: Path, line: int, column: str, text: str) -> Any:
    """One setting cell as its config field's value, checked against the field's bounds."""
    from pydantic import ValidationError

    field = SETTING_COLUMNS[column]
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(manifest, f"row {line}, column {column!r}: {text!r} is not a positive number of µm/px")
    try:
        PipelineConfig.__pydantic_validator__.validate_assignment(PipelineConfig.model_construct(), field, value)
    except ValidationError as exc:
        reason = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(manifest, f"row {line}, column {column!r}: {text!r}: {reason}") from None
    return value


def _is_slide_name(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")


def _dedupe_dicom(paths: list[Path]) -> list[Path]:
    """OpenSlide opens a DICOM slide from any one of its files: keep the first per folder."""
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p.suffix.lower() == ".dcm":
            if p.parent in seen:
                continue
            seen.add(p.parent)
        out.append(p)
    return out


# --------------------------------------------------------------------------- what is done


def slide_output_dir(slide_path: str | Path, out_root: str | Path, cfg: PipelineConfig) -> Path:
    """The slide's output folder in ``out_root`` (opens the slide: its identity is in the name)."""
    from wsipipe.slides.slide import open_slide_for

    slide_path = Path(slide_path)
    with open_slide_for(slide_path, cfg) as slide:
        return Path(out_root) / slide_output_name(slide_path, slide.identity)


def done_outputs(
    slide_path: str | Path, out_root: str | Path, cfg: PipelineConfig, model_info
) -> tuple[Path, dict] | None:
    """(output folder, summary) when the slide's outputs in ``out_root`` were made from this
    very slide, configuration and model; None when anything must be (re)computed.

    Decided from disk only: the store's stage markers must carry the identities this run
    would give them (slide identity + tile config hash, model sha256, stitch settings), and
    every output file must be there with summary.json naming the same stitch identity.
    Raises the slide's own error (e.g. SlideOpenError) when it cannot be opened."""
    from wsipipe.tiles import store
    from wsipipe.models.identity import infer_identity
    from wsipipe.slides.slide import open_slide_for
    from wsipipe.outputs.report import REPORT_NAME
    from wsipipe.outputs.stitch import existing_outputs
    from wsipipe.tiles.tiling import tile_identity

    slide_path = Path(slide_path)
    with open_slide_for(slide_path, cfg) as slide:
        slide_dir = Path(out_root) / slide_output_name(slide_path, slide.identity)
        expected_tile = tile_identity(slide, cfg)
    try:
        group = store.open_store(slide_dir / "patches.zarr")
    except StoreError:
        return None
    if not store.is_complete(group, "tile", expected_tile):
        return None
    if not store.is_complete(group, "infer", infer_identity(group, model_info)):
        return None
    summary = existing_outputs(group, slide_dir, cfg.stitch, cfg.qc, cfg.export)
    if summary is None or not (slide_dir / REPORT_NAME).is_file():  # the report is written last
        return None
    if cfg.mil.model is not None and not _mil_done(summary, Path(cfg.mil.model)):
        return None
    return slide_dir, summary


def _mil_done(summary: dict, model_dir: Path) -> bool:
    """Whether the summary holds the slide-level result of the MIL model in ``model_dir`` (a slide
    finished before a MIL model was set still needs its ``mil`` stage). Its card only: no torch."""
    from wsipipe.models.card import CARD_FILE, read_card

    try:
        card = read_card(model_dir / CARD_FILE)
    except WsipipeError:
        return False  # the mil stage names what is wrong with the folder
    section = summary.get("mil")
    return isinstance(section, dict) and section.get("model_sha256") == card.weights_sha256


# --------------------------------------------------------------------------- result rows


def result_row(
    slide: str | Path, status: str, *, name: str | None = None, error: BaseException | str | None = None,
    out_dir: str | Path | None = None, summary: dict | None = None, seconds: float = 0.0,
    finished: datetime | None = None,
) -> dict[str, Any]:
    """One archive result row in its JSON form (see :class:`SlideResult`)."""
    return SlideResult.make(
        slide, status, name=name, error=error, out_dir=out_dir, summary=summary, seconds=seconds, finished=finished,
    ).as_dict()


# How an archive run gives a slide its resolution: per slide in a manifest, or one for all.
ARCHIVE_MPP_HINT = (
    "add an mpp column (the slide's µm/px) to a CSV manifest of the archive, "
    "or --mpp-default <µm/px> for every slide whose file states none"
)


def archive_error(exc: BaseException) -> BaseException:
    """A slide's error as an archive run reports it: a missing resolution says how an
    archive gives one (a manifest's ``mpp`` column, ``--mpp-default``)."""
    return exc.with_hint(ARCHIVE_MPP_HINT) if isinstance(exc, MissingMppError) else exc


__all__ = ["SlideResult", "error_line", "result_row"]


def rows_json(rows: list[Row]) -> list[dict[str, Any]]:
    return [SlideResult.of(row).as_dict() for row in rows]


def status_counts(rows: list[Row]) -> dict[str, int]:
    counts: dict[str, int] = {status: 0 for status in STATUSES}
    for row in rows:
        counts[SlideResult.of(row).status] += 1
    return counts


def archive_message(rows: list[Row]) -> str:
    """E.g. ``3 slides: 1 ok, 1 skipped, 1 failed``: the archive run's final state message."""
    c = status_counts(rows)
    return f"{len(rows)} slides: {c['ok']} ok, {c['skipped']} skipped, {c['failed']} failed"


RESULTS_FILE = "archive-results.json"


def write_results(rows: list[Row], out_root: str | Path) -> Path:
    """The last archive run's rows as ``out_root/archive-results.json`` (atomic)."""
    import json

    from wsipipe.files import write_atomic

    return write_atomic(Path(out_root) / RESULTS_FILE, json.dumps(rows_json(rows), indent=1))


def write_archive_files(rows: list[Row], out_root: str | Path) -> Path:
    """archive-results.json and archive-report.html (this run's rows), and the folder's index
    (archive-index.json and archive-index.html: this run's rows merged into every earlier
    run's), written by one run at a time under the folder's lock (two runs over one output
    folder each write their own rows whole; the last one to finish stays; the index keeps
    both). Temporary files of an earlier run killed mid-write go first. Returns the report's path."""
    from wsipipe.locks import folder_lock, remove_stale_temps
    from wsipipe.outputs.report import ARCHIVE_REPORT_NAME, INDEX_REPORT_NAME, write_archive_report

    with folder_lock(out_root):
        remove_stale_temps(out_root, zarr_partials=False)
        write_results(rows, out_root)
        update_index(rows, out_root)
        return write_archive_report(rows_json(rows), Path(out_root) / ARCHIVE_REPORT_NAME, index_link=INDEX_REPORT_NAME)


def read_results(out_root: str | Path) -> list[dict]:
    import json

    return json.loads((Path(out_root) / RESULTS_FILE).read_text())


# --------------------------------------------------------------------------- the folder's index

INDEX_FILE = "archive-index.json"
INDEX_KEYS = ("slide", "name", "status", "when", "error", "out_dir", "processed", "current",
              "decision", "score", "tumor_area_mm2", "needs_review", "flags")


def slide_key(slide: str | Path) -> str:
    """The index's key of a slide: its absolute, normalised path (symlinks kept)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(str(slide))))


def _index_headline(summary: dict | None) -> dict[str, Any]:
    summary = summary or {}
    qc = summary.get("qc") or {}
    return {
        "decision": summary.get("decision"),
        "score": (summary.get("slide_score") or {}).get("top_k_mean"),
        "tumor_area_mm2": summary.get("tumor_area_mm2"),
        "needs_review": bool(qc.get("needs_review")),
        "flags": [f.get("code", "?") for f in qc.get("flags") or []],
    }


def index_entry(row: Row, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """A slide's entry in archive-index.json after ``row`` (its latest run) on top of its
    ``earlier`` entry::

        {"slide": absolute path, "name": str, "status": latest status, "when": its finish (ISO),
         "error": str | None, "out_dir": output folder of the latest good output,
         "processed": when that output was computed (ISO) | None, "current": bool,
         "decision", "score", "tumor_area_mm2", "needs_review", "flags": its headline}

    ``ok`` sets the output, ``processed`` and the headline; ``skipped`` (outputs up to date)
    keeps the earlier ``processed`` and marks the output current; ``failed`` keeps the
    earlier output and headline, marked not current (the latest attempt did not produce it)."""
    row = SlideResult.of(row)
    entry: dict[str, Any] = {**dict.fromkeys(INDEX_KEYS), "current": False, **_index_headline(None), **(earlier or {})}
    entry.update(slide=slide_key(row.slide), name=row.name or entry.get("name") or Path(row.slide).name,
                 status=row.status, when=row.finished, error=row.error)
    if row.status == "failed":
        entry["current"] = False
    else:
        if row.out_dir:
            if row.status == "ok" or entry["out_dir"] != row.out_dir:
                entry["processed"] = row.finished if row.status == "ok" else None
            entry["out_dir"] = row.out_dir
        entry["current"] = True
        entry.update(_index_headline(row.summary))
    return {key: entry[key] for key in INDEX_KEYS}


def merge_index(entries: list[dict[str, Any]], rows: list[Row], newest: bool = True) -> list[dict[str, Any]]:
    """``entries`` (archive-index.json) with ``rows`` merged in: one entry per slide path,
    sorted by path. A row older than the slide's entry (a run that overlapped a later one)
    does not replace it, unless ``newest`` is False (entries rebuilt from the folders, whose
    file times say when they were written, not when a run ended)."""
    from wsipipe.outputs.report import parse_stamp

    by_slide = {e["slide"]: e for e in entries if isinstance(e, dict) and e.get("slide")}
    for row in map(SlideResult.of, rows):
        key = slide_key(row.slide)
        earlier = by_slide.get(key)
        if earlier is not None:
            seen, new = parse_stamp(earlier.get("when")), parse_stamp(row.finished)
            if newest and seen is not None and new is not None and new < seen:
                # An overlapping run's older row: the status stays; its computation still counts.
                done = parse_stamp(earlier.get("processed"))
                if row.status == "ok" and row.out_dir == earlier.get("out_dir") and (done is None or new > done):
                    earlier["processed"] = row.finished
                continue
        by_slide[key] = index_entry(row, earlier)
    return [by_slide[k] for k in sorted(by_slide)]


def read_index(out_root: str | Path) -> list[dict[str, Any]] | None:
    """The entries of ``out_root/archive-index.json``; None when it is missing, unreadable or
    not an index (the caller rebuilds it)."""
    import json

    try:
        entries = json.loads((Path(out_root) / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("slide"), str) for e in entries):
        return None
    return entries


def rebuild_index(out_root: str | Path) -> list[dict[str, Any]]:
    """Index entries from the slide folders of ``out_root`` (their summary.json): one per slide
    path, the most recent output when a slide has several; ``when`` is summary.json's time."""
    import json

    rows: list[SlideResult] = []
    for summary_path in sorted(Path(out_root).glob("*/summary.json")):
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            slide = (summary.get("slide") or {}).get("path")
            finished = datetime.fromtimestamp(summary_path.stat().st_mtime, UTC)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(slide, str) and slide:
            rows.append(SlideResult.make(slide, "ok", name=summary_path.parent.name, out_dir=summary_path.parent,
                                         summary=summary, finished=finished))
    rows.sort(key=lambda r: r.finished or "")  # the latest output of a slide last
    return merge_index([], list(rows), newest=False)


def update_index(rows: list[Row], out_root: str | Path) -> list[dict[str, Any]]:
    """Merge ``rows`` into ``out_root``'s archive-index.json and rewrite archive-index.html.
    The caller holds the folder's lock. A missing index starts from the slide folders already
    there; a corrupt one is rebuilt from them, and a log line says so."""
    import json

    from wsipipe.files import write_atomic
    from wsipipe.outputs.report import INDEX_REPORT_NAME, write_index_report

    out_root = Path(out_root)
    entries = read_index(out_root)
    rebuilt = entries is None
    if entries is None:
        entries = rebuild_index(out_root)
        if (out_root / INDEX_FILE).exists():
            log.warning("%s: unreadable or not an index; rebuilt from %d slide folders' summary.json",
                        out_root / INDEX_FILE, len(entries))
    entries = merge_index(entries, rows, newest=not rebuilt)
    write_atomic(out_root / INDEX_FILE, json.dumps(entries, indent=0, separators=(",", ":")))
    write_index_report(entries, out_root / INDEX_REPORT_NAME)
    return entries


# --------------------------------------------------------------------------- artifacts


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from free text."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key[:100] or "wsipipe"


def _headline(summary: dict | None) -> dict[str, Any]:
    summary = summary or {}
    score = summary.get("slide_score") or {}
    return {
        "patches": summary.get("n_patches"),
        "decision": summary.get("decision"),
        "score_top_k_mean": score.get("top_k_mean"),
        "score_max": score.get("max"),
        "tumor_area_mm2": summary.get("tumor_area_mm2"),
    }


def archive_table(rows: list[Row]) -> list[dict[str, Any]]:
    """One flat record per slide for a Prefect table artifact."""
    return [
        {
            "slide": Path(row.slide).name,
            "status": row.status,
            **_headline(row.summary),
            "seconds": row.seconds,
            "error": row.error or "",
            "out_dir": row.out_dir or "",
        }
        for row in map(SlideResult.of, rows)
    ]


def slide_markdown(row: Row) -> str:
    """Markdown for one slide's artifact: headline numbers, stage timings, output paths."""
    row = SlideResult.of(row)
    summary = row.summary or {}
    title = f"### {Path(row.slide).name}: {row.status}"
    if row.status == "failed":
        return f"{title}\n\n`{row.slide}`\n\n**Error:** {row.error}\n"
    lines = [title, "", f"`{row.slide}`", "", "| | |", "|---|---|"]
    for key, value in _headline(summary).items():
        lines.append(f"| {key.replace('_', ' ')} | {value} |")
    for stage, seconds in (summary.get("seconds") or {}).items():
        lines.append(f"| {stage} seconds | {seconds} |")
    lines.append(f"| run seconds | {row.seconds} |")
    out_dir = row.out_dir
    if out_dir:
        lines += ["", "**Outputs**", ""]
        lines += [f"- {label}: `{Path(out_dir) / name}`" for label, name in (summary.get("files") or {}).items()]
        lines.append(f"- store: `{summary.get('store')}`")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parameters


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Dotted config overrides from ``["tile.mpp=1.0", ...]`` (values read as YAML) or a dict."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(None, f"override {item!r}: expected FIELD=VALUE, e.g. tile.mpp=1.0")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(None, f"override {item!r}: value is not valid YAML ({exc})") from None
    return out
