"""Size and in-browser speed of the archive report and the folder index at N slides.

Generates N result rows (ok, skipped and failed, with summaries, wall-clock timestamps and
slide reports to link to), writes them through ``write_archive_files`` (archive-report.html,
archive-index.json/.html) into a scratch output folder, then loads each page in headless
Chromium and measures, inside the page: time to the load event with layout forced, sorting
by three columns, and one text filter.

    python bench/bench_archive_html.py [--rows 1000] [--workdir /tmp/wsipipe-archive-html]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import probe_in_chromium  # noqa: E402
from wsipipe.run.archive import INDEX_FILE, RESULTS_FILE, result_row, write_archive_files  # noqa: E402

PROBE = """
var t_load = performance.now(); document.body.offsetHeight; var t_layout = performance.now();
var table = document.getElementById("slides");
var header = function (label) { return Array.from(table.tHead.rows[0].cells).filter(function (th) {
    return th.textContent.trim() === label; })[0]; };
var sorts = {};
["score", "slide", "tumor area (mm²)", "score"].forEach(function (label, k) {
  var t = performance.now(); header(label).click(); document.body.offsetHeight;
  sorts[label + (k === 3 ? " (again)" : "")] = performance.now() - t; });
var text = document.getElementById("filter");
var t = performance.now(); text.value = "slide-00"; text.dispatchEvent(new Event("input")); document.body.offsetHeight;
var filter_ms = performance.now() - t;
return {load_ms: t_load, layout_ms: t_layout, sort_ms: sorts, filter_ms: filter_ms,
        rows: table.tBodies[0].rows.length, elements: document.getElementsByTagName("*").length,
        images: document.images.length};
"""


def rows(n: int, out: Path) -> list[dict]:
    """N rows of a run that started 2 h ago: a slide every ~7 s, 80% ok, 15% skipped, 5% failed."""
    rng = random.Random(0)
    start = datetime.now(UTC) - timedelta(hours=2)
    out_rows = []
    for i in range(n):
        name = f"slide-{i:05d}-{rng.getrandbits(32):08x}"
        status = rng.choices(["ok", "skipped", "failed"], weights=[80, 15, 5])[0]
        seconds = rng.uniform(20, 90)
        finished = start + timedelta(seconds=7 * i + seconds)
        if status == "failed":
            out_rows.append(result_row(f"/archive/batch-{i // 100}/{name}.svs", "failed", seconds=seconds, finished=finished,
                                       error=f"SlideOpenError: /archive/batch-{i // 100}/{name}.svs: not a slide format"))
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.html").write_text("<!DOCTYPE html><title>slide</title>")
        score = rng.random()
        flags = [{"code": c} for c in rng.sample(["tissue_small", "out_of_focus", "pen_marks", "near_threshold"], rng.randint(0, 2))]
        summary = {"decision": "tumor" if score >= 0.5 else "normal", "threshold": 0.5, "n_patches": rng.randint(500, 40000),
                   "slide_score": {"top_k_mean": score, "max": min(1.0, score + 0.1)}, "tumor_area_mm2": rng.uniform(0, 80) * (score >= 0.5),
                   "qc": {"flags": flags, "needs_review": bool(flags)}, "seconds": {"tile": seconds / 2, "infer": seconds / 2}}
        out_rows.append(result_row(f"/archive/batch-{i // 100}/{name}.svs", status, name=name, out_dir=folder,
                                   summary=summary, seconds=seconds, finished=finished))
    return out_rows


def measure(page: Path, work: Path) -> dict:
    try:
        return probe_in_chromium(page, PROBE, work / "profile")
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wsipipe-archive-html"))
    args = parser.parse_args()
    out = args.workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    generated = rows(args.rows, out)
    t0 = time.perf_counter()
    report = write_archive_files(generated, out)
    print(f"write_archive_files, {args.rows} rows: {time.perf_counter() - t0:.2f} s", flush=True)
    for name in (RESULTS_FILE, INDEX_FILE, report.name, "archive-index.html"):
        print(f"{name}: {(out / name).stat().st_size / 1e3:.0f} kB")
    for page in (report, out / "archive-index.html"):
        found = measure(page, args.workdir)
        print(f"{page.name}: " + json.dumps(found, default=lambda v: round(v, 1)), flush=True)


if __name__ == "__main__":
    main()
