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
import re
from pathlib import Path
from typing import Any

import yaml

from wsipipe.config import PipelineConfig
from wsipipe.errors import ConfigError, StoreError
from wsipipe.run.names import slide_output_name
from wsipipe.run.rows import STATUSES, SlideResult, error_line

Row = SlideResult | dict[str, Any]

# Extensions OpenSlide reads (the slide's main file). DICOM slides are one folder of files.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)
MANIFEST_COLUMNS = ("slide", "path", "file", "filename")


# --------------------------------------------------------------------------- what to process


def scan_archive(source: str | Path) -> list[Path]:
    """The slides named by ``source``: a folder (searched recursively), a glob pattern,
    a CSV manifest (``.csv``), or one slide file. Sorted, without duplicates.

    A manifest's rows name slides relative to the manifest's folder; missing files are
    kept (they become failed rows naming the file, not a silent gap)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".csv":
        return read_manifest(path)
    if path.is_dir():
        return _dedupe_dicom(sorted(p for p in path.rglob("*") if p.is_file() and _is_slide_name(p)))
    if glob.has_magic(text):
        return _dedupe_dicom(sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()))
    if path.is_file():
        return [path]
    raise ConfigError(path, "archive not found (expected a folder, a glob pattern, a .csv manifest or a slide file)")


def read_manifest(path: str | Path) -> list[Path]:
    """Slide paths from a CSV with a header holding one of ``slide``, ``path``, ``file``,
    ``filename``; other columns are ignored; blank rows and rows starting with ``#`` are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(path, "manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read manifest: {exc}") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    header = {(name or "").strip().lower(): name for name in (reader.fieldnames or [])}
    column = next((header[c] for c in MANIFEST_COLUMNS if c in header), None)
    if column is None:
        raise ConfigError(
            path, f"manifest has no slide column (header {list(header)}; expected one of {list(MANIFEST_COLUMNS)})"
        )
    slides: list[Path] = []
    for row in reader:
        value = (row.get(column) or "").strip()
        if value:
            p = Path(value).expanduser()
            slides.append(p if p.is_absolute() else path.parent / p)
    return list(dict.fromkeys(slides))


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
    from wsipipe.slides.slide import open_slide

    slide_path = Path(slide_path)
    with open_slide(slide_path, cfg.mpp_override) as slide:
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
    from wsipipe.slides.slide import open_slide
    from wsipipe.outputs.report import REPORT_NAME
    from wsipipe.outputs.stitch import existing_outputs
    from wsipipe.tiles.tiling import tile_identity

    slide_path = Path(slide_path)
    with open_slide(slide_path, cfg.mpp_override) as slide:
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
    return slide_dir, summary


def any_to_compute(slides: list[Path], out_root: str | Path, cfg: PipelineConfig, model_info) -> bool:
    """Whether some slide has work to do (so a Dask cluster is worth starting). A slide that
    cannot even be opened has none: it fails before tiling."""
    for slide in slides:
        try:
            if done_outputs(slide, out_root, cfg, model_info) is None:
                return True
        except Exception:  # its own error is reported by the run itself
            continue
    return False


# --------------------------------------------------------------------------- result rows


def result_row(
    slide: str | Path, status: str, *, name: str | None = None, error: BaseException | str | None = None,
    out_dir: str | Path | None = None, summary: dict | None = None, seconds: float = 0.0,
) -> dict[str, Any]:
    """One archive result row in its JSON form (see :class:`SlideResult`)."""
    return SlideResult.make(slide, status, name=name, error=error, out_dir=out_dir, summary=summary, seconds=seconds).as_dict()


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
    """archive-results.json and archive-report.html, written by one run at a time (two runs
    over one output folder each write their own rows whole; the last one to finish stays).
    Temporary files of an earlier run killed mid-write go first. Returns the report's path."""
    from wsipipe.locks import folder_lock, remove_stale_temps
    from wsipipe.outputs.report import ARCHIVE_REPORT_NAME, write_archive_report

    with folder_lock(out_root):
        remove_stale_temps(out_root, zarr_partials=False)
        write_results(rows, out_root)
        return write_archive_report(rows_json(rows), Path(out_root) / ARCHIVE_REPORT_NAME)


def read_results(out_root: str | Path) -> list[dict]:
    import json

    return json.loads((Path(out_root) / RESULTS_FILE).read_text())


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
