"""QA reports rendered in a real headless Chromium: images load, values match summary.json,
the archive table sorts and filters, metadata is escaped, screenshots are taken.

Slides: a generated slide with a planted tumor (probabilities set from its ground truth, so
the report's tumor regions are known), the real CMU-1 through ``run_slide`` (which writes
the report itself), and a real broken file as the failed row of the archive."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from slide_helpers import synthetic_rgb, write_pyramid_tiff
from typer.testing import CliRunner
from wsipipe.tiles import qc, store
from wsipipe.config import load_config
from wsipipe.errors import WsipipeError
from wsipipe.models.inference import infer_store
from wsipipe.models.model import build_model, load_model, save_weights
from wsipipe.run.pipeline import run_slide, run_slides
from wsipipe.outputs.report import (
    archive_markdown, archive_throughput, file_mpp, qc_card, resolution_note, top_scoring, write_archive_report,
    write_slide_report,
)
from wsipipe.run.archive import INDEX_FILE, read_index, result_row, write_archive_files
from wsipipe.run.rows import SlideResult
from wsipipe.outputs.stitch import stitch_store
from wsipipe.tiles.tiling import tile_slide

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--hide-scrollbars", "--virtual-time-budget=5000",
]
# Untrusted text planted in the slide's metadata: if it were not escaped it would run.
EVIL_DESCRIPTION = '<script>document.title="pwned"</script> H&E <b>bold</b>'
EVIL_NAME = "planted<img src=x onerror=document.title='pwned'>.tif"


def chromium(tmp_path: Path, *args: str) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not installed: `make test` installs it (apt-get install -y chromium)")
    profile = tmp_path / "chromium-profile"
    res = subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def probe(page: Path, tmp_path: Path, body: str) -> dict:
    """Load ``page`` in Chromium with ``body`` (JS returning a JSON-able value) run after load;
    return that value, read back from the dumped DOM."""
    script = (
        '<script>window.addEventListener("load", function () { var out = (function () {' + body + "})();"
        'var pre = document.createElement("pre"); pre.id = "probe-result"; pre.textContent = JSON.stringify(out);'
        "document.body.appendChild(pre); });</script>"
    )
    copy = page.with_name(page.stem + ".probe.html")  # same folder: relative links resolve the same
    copy.write_text(page.read_text().replace("</body>", script + "</body>"))
    try:
        dom = chromium(tmp_path, "--dump-dom", copy.as_uri())
    finally:
        copy.unlink()
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, tmp_path: Path, height: int = 2600) -> Path:
    from PIL import Image

    chromium(tmp_path, f"--screenshot={out}", f"--window-size=1400,{height}", page.as_uri())
    pixels = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    assert pixels.shape == (height, 1400) and pixels.std() > 20  # a rendered page, not a blank one
    print(f"screenshot: {out}")
    return out


IMAGES_JS = """
var imgs = Array.from(document.images);
return {
  n: imgs.length,
  broken: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; }),
  external: imgs.filter(function (i) { return !i.src.startsWith("data:"); }).length,
  scripts: document.scripts.length,
  title: document.title,
"""

SLIDE_JS = IMAGES_JS + """
  text: Object.fromEntries(["decision", "score", "tumor-area", "n-patches", "meta-path", "meta-vendor", "meta-dimensions",
        "meta-mpp", "meta-identity", "model-sha", "qc-status", "qc-count", "qc-rule", "decision-reason", "resolution",
        "resolution-note", "tumor-area-note", "meta-levels", "gallery-note"].map(function (id) {
        var el = document.getElementById(id); return [id, el ? el.textContent.replace(/\\s+/g, " ").trim() : null]; })),
  flags: Array.from(document.querySelectorAll("#qc-flags li")).map(function (li) { return li.dataset.code; }),
  regions: Array.from(document.querySelectorAll("#regions tbody tr")).map(function (tr) { return tr.cells[1].textContent; }),
  top: Array.from(document.querySelectorAll("#top-patches figcaption")).map(function (c) { return c.textContent; }),
  flagged: document.querySelectorAll("#flagged-patches figure").length,
  qc_card: document.getElementById("qc-card").className,
  resolution_card: document.getElementById("resolution-card").className,
  // the resolution card sits right after the decision's
  next_to_decision: document.getElementById("decision").parentElement.nextElementSibling.id,
  files: Object.fromEntries(Array.from(document.querySelectorAll("#files tr")).map(function (tr) {
         return [tr.dataset.kind, tr.cells[1].textContent.replace(/\\s+/g, " ").trim()]; })),
  properties: document.getElementById("properties") ? document.getElementById("properties").textContent : "",
  timings: Array.from(document.querySelectorAll("#timings [data-stage]")).map(function (td) { return td.dataset.stage; })
};
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, slides_dir):
    """Three slides processed for real; the archive rows (interfaces §1) of the run."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(None, {})
    weights = tmp / "tiny.safetensors"
    torch.manual_seed(0)
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)  # random init: scores are irrelevant here
    results = tmp / "results"
    rows = []

    # 1. Generated slide with a planted tumor; patch probabilities from its ground truth.
    t0 = time.perf_counter()
    rgb, synth = synthetic_rgb(tmp, 4000, 3000, seed=5, n_tissue=2, n_tumor=1)
    slide_path = write_pyramid_tiff(tmp / EVIL_NAME, rgb, description=EVIL_DESCRIPTION)
    planted_dir = results / "planted"
    store_path = planted_dir / "patches.zarr"
    # Cells 20 % tissue are patches too: the tissue border's patches, many mostly glass.
    tile_slide(slide_path, store_path, load_config(None, {"tile.min_tissue": 0.2}))
    model, info = load_model(weights)
    infer_store(store_path, model, info, cfg.inference)
    group = store.open_store(store_path, mode="r+")
    xy = group["coords"][:]
    squares = shapely.box(xy[:, 0], xy[:, 1], xy[:, 0] + 224, xy[:, 1] + 224)
    tumor_fraction = shapely.area(shapely.intersection(squares, synth.tumor)) / 224**2
    probs = (0.02 + 0.96 * tumor_fraction).astype(np.float32)
    # A model that fires on a tissue edge: the glassiest patch scores high (below the threshold,
    # so the planted tumor stays the only region). The gallery must not show it.
    glassiest = int(np.argmax(qc.read_measures(group)["background_fraction"]))
    probs[glassiest] = 0.45
    group["probabilities"][:] = probs
    small = load_config(None, {"qc.min_tissue_area_mm2": 0.25}).qc  # ~0.7 mm² of tissue: not a QC finding here
    summary = stitch_store(store_path, planted_dir, cfg.stitch, qc_cfg=small)
    write_slide_report(planted_dir)
    rows.append({"slide": str(slide_path), "name": "planted", "status": "ok", "error": None,
                 "out_dir": str(planted_dir), "summary": summary, "seconds": time.perf_counter() - t0})

    # 2. A real slide through the whole pipeline, which writes its report itself; its resolution
    # set by the user (0.25 µm/px where the file states 0.499).
    t0 = time.perf_counter()
    real = run_slide(slides_dir / "cmu-1-small-region.svs", results, load_config(None, {"mpp_override": 0.25}), weights)
    rows.append({"slide": str(slides_dir / "cmu-1-small-region.svs"), "name": real.out_dir.name, "status": "ok",
                 "error": None, "out_dir": str(real.out_dir), "summary": real.summary, "seconds": time.perf_counter() - t0})

    # 3. A real broken file: the failure as process_archive records it.
    t0 = time.perf_counter()
    with pytest.raises(WsipipeError) as failure:
        run_slide(slides_dir / "broken.svs", results, cfg, weights)
    rows.append({"slide": str(slides_dir / "broken.svs"), "name": None, "status": "failed",
                 "error": str(failure.value).splitlines()[0], "out_dir": None, "summary": None,
                 "seconds": time.perf_counter() - t0})
    for row in rows:  # wall-clock start and end, as SlideResult.make records them
        stamped = SlideResult.make(row["slide"], row["status"], seconds=row["seconds"]).as_dict()
        row.update(started=stamped["started"], finished=stamped["finished"])
    return {"tmp": tmp, "planted": planted_dir, "truth": synth, "glassiest": glassiest, "real": real.out_dir, "rows": rows,
            "weights": weights}


def _check_slide_page(page: dict, summary: dict) -> None:
    assert page["n"] >= 4 and page["broken"] == [] and page["external"] == 0
    text = page["text"]
    assert text["decision"] == summary["decision"]
    assert float(text["score"]) == pytest.approx(summary["slide_score"]["top_k_mean"], abs=5e-4)
    assert float(text["tumor-area"]) == pytest.approx(summary["tumor_area_mm2"], rel=1e-3, abs=1e-4)
    assert int(text["n-patches"].replace(" ", "")) == summary["n_patches"]
    assert text["meta-dimensions"] == f"{summary['slide']['width']} × {summary['slide']['height']} px"
    assert text["meta-mpp"].startswith(f"{summary['slide']['mpp']:.4g} µm/px")
    assert text["meta-identity"] == summary["slide"]["identity"]
    assert text["model-sha"] == summary["provenance"]["model"]["sha256"]
    assert page["flags"] == [f["code"] for f in summary["qc"]["flags"]]
    assert len(page["regions"]) == summary["n_tumor_regions"]
    assert sum(float(a) for a in page["regions"]) == pytest.approx(summary["tumor_area_mm2"], rel=1e-2)
    assert set(page["timings"]) == {"tile", "infer", "stitch"}
    # The QC card counts every flag listed under it; its colour is the most severe one's, and it says so.
    severities = [f["severity"] for f in summary["qc"]["flags"]]
    worst = next((s for s in ("fail", "review", "info") if s in severities), None)
    assert page["qc_card"].split()[-1] == {"fail": "fail", "review": "review", "info": "info", None: "ok"}[worst]
    assert text["qc-count"] == (None if not severities else f"{len(severities)} flag{'s' * (len(severities) != 1)}: "
                                + ", ".join(f"{severities.count(s)} {s}" for s in ("fail", "review", "info") if s in severities))
    assert text["qc-rule"].startswith("Colour = most severe flag: red fail, amber review, blue info, green none")
    # Beside the decision: its reason (when the summary gives one) and the resolution it rests on.
    assert text["decision-reason"] == summary.get("decision_reason")
    assert page["next_to_decision"] == "resolution-card"
    assert text["resolution"] == f"{summary['slide']['mpp']:.4g} µm/px"
    assert "tissue only (regions are clipped to the tissue outline)" in text["tumor-area-note"]
    # Pyramid downsamples read as factors, not offsets.
    assert "÷" not in text["meta-levels"] and "+" not in text["meta-levels"] and "(×1)" in text["meta-levels"]
    # The tumor mask's scale where the files are listed.
    assert re.fullmatch(r"tumor_mask\.png · [\d.]+ µm/px", page["files"]["tumor mask png"]), page["files"]


def gallery_limit(slide_dir: Path) -> float:
    """The most glass a gallery patch may have: what the slide was stitched with, else 0.5."""
    return json.loads((slide_dir / "summary.json").read_text())["config"].get("max_background", 0.5)


def _check_gallery(page: dict, slide_dir: Path, n: int = 12) -> list[int]:
    """The top-scoring gallery shows the ``n`` most probable patches among those with at most
    the slide's limit of glass, each captioned with its probability, tissue fraction and level-0
    x, y. Returns the indices shown."""
    limit = gallery_limit(slide_dir)
    group = store.open_store(slide_dir / "patches.zarr")
    probs, xy = group["probabilities"][:].ravel(), group["coords"][:]
    background = qc.read_measures(group)["background_fraction"]
    eligible = background <= limit
    shown = []
    for caption in page["top"]:
        p, tissue, x, y = re.search(r"p = ([\d.]+) · tissue (\d+) %\s*x (\d+), y (\d+)", caption).groups()
        i = int(np.flatnonzero((xy[:, 0] == int(x)) & (xy[:, 1] == int(y)))[0])
        assert float(p) == pytest.approx(probs[i], abs=5e-3)
        assert int(tissue) == round(100 * (1 - background[i])) and eligible[i]
        shown.append(i)
    assert len(shown) == min(n, int(eligible.sum()))
    # The most probable of the eligible patches, in order (ties in any order).
    assert np.allclose(probs[shown], np.sort(probs[eligible])[::-1][: len(shown)], atol=1e-6)
    left_out = int((~eligible).sum())
    assert page["text"]["gallery-note"].startswith(f"The {len(shown)} most probable of the {int(eligible.sum())} patches "
                                                   f"with at most {limit * 100:.0f} % glass")
    assert (f"{left_out} patch" in page["text"]["gallery-note"]) == (left_out > 0)
    return shown


def test_planted_tumor_report_in_chromium(outputs):
    planted = outputs["planted"]
    summary = json.loads((planted / "summary.json").read_text())
    page = probe(planted / "report.html", outputs["tmp"], SLIDE_JS)
    _check_slide_page(page, summary)
    # The planted tumor is found where it was planted, and the report says so.
    truth_mm2 = outputs["truth"].tumor.area * 0.5**2 / 1e6
    assert summary["decision"] == "tumor" and page["text"]["decision"] == "tumor"
    assert summary["tumor_area_mm2"] == pytest.approx(truth_mm2, rel=0.35)
    assert summary["qc"]["flags"] == [] and page["text"]["qc-status"] == "no flags" and page["text"]["qc-count"] is None
    assert "warn" not in page["resolution_card"] and page["text"]["resolution-note"] == "read from the file (openslide)"
    assert page["text"]["meta-levels"].endswith("4000×3000 (×1), 1000×750 (×4)")
    # Gallery: the 12 most probable patches with enough tissue. The mostly-glass edge patch
    # that scores among the 12 highest of all is left out.
    shown = _check_gallery(page, planted)
    group = store.open_store(planted / "patches.zarr")
    probs, glassiest = group["probabilities"][:], outputs["glassiest"]
    assert qc.read_measures(group)["background_fraction"][glassiest] > gallery_limit(planted)
    assert glassiest in np.argsort(-probs)[:12] and glassiest not in shown
    # Metadata from the file is shown as text, never run: no injected script or image.
    assert page["title"] == f"wsipipe slide report — {EVIL_NAME}"  # as text; run, it would read "pwned"
    assert page["scripts"] == 1  # the probe's own
    assert EVIL_DESCRIPTION in page["properties"]
    assert "<img src=x onerror=" in page["text"]["meta-path"]
    raw = (planted / "report.html").read_text()
    assert "<script>document.title" not in raw and "&lt;script&gt;document.title" in raw
    assert not re.search(r'(src|href)="https?:', raw)  # nothing fetched from a network
    screenshot(planted / "report.html", outputs["tmp"] / "slide-report-planted.png", outputs["tmp"])


def test_real_slide_report_written_by_run_slide(outputs):
    real = outputs["real"]
    summary = json.loads((real / "summary.json").read_text())
    assert (real / "report.html").is_file()  # run_slide wrote it
    page = probe(real / "report.html", outputs["tmp"], SLIDE_JS)
    _check_slide_page(page, summary)
    assert page["text"]["meta-vendor"] == "aperio" and page["text"]["meta-path"].endswith("cmu-1-small-region.svs")
    # Several flags, one count: a 0.16 mm² crop at 0.25 µm/px (review) and the user's resolution.
    assert "tissue_small" in page["flags"] and any(code.startswith("mpp_") for code in page["flags"])
    assert page["text"]["qc-status"] == "needs review" and page["text"]["qc-count"].startswith(f"{len(page['flags'])} flags: ")
    assert "review" in page["qc_card"].split()
    # The resolution the decision rests on was set by the user: said beside the decision, in a warning.
    assert "warn" in page["resolution_card"].split() and page["text"]["resolution"] == "0.25 µm/px"
    assert page["text"]["resolution-note"].startswith("resolution 0.25 µm/px set by the user (the file states 0.499 µm/px)")
    assert "aperio.AppMag" in page["properties"]
    _check_gallery(page, real)
    screenshot(real / "report.html", outputs["tmp"] / "slide-report-cmu1.png", outputs["tmp"])


NO_TISSUE_JS = IMAGES_JS + """
  text: Object.fromEntries(["decision", "no-tissue-reason", "why", "meta-path", "tissue-area"].map(function (id) {
        var el = document.getElementById(id); return [id, el ? el.textContent.replace(/\\s+/g, " ").trim() : null]; })),
  settings: Array.from(document.querySelectorAll("#settings tr")).map(function (tr) { return tr.dataset.name; }),
  thumbnail: (function (img) { return img ? [img.naturalWidth, img.naturalHeight] : null; })(document.getElementById("thumbnail")),
};
"""


def test_slide_without_tissue_gets_a_report_page(outputs, tmp_path):
    """`wsipipe run` on a slide of bare glass: exit 3 as before, and report.html in the slide's
    folder with its thumbnail, the reason and the tissue-detection settings; the archive row of
    the slide links to it."""
    from wsipipe.cli import app

    rng = np.random.default_rng(0)  # bare glass: near-white with the sensor's noise
    glass = write_pyramid_tiff(tmp_path / "glass.tif", np.clip(rng.normal(243, 2, (1000, 1500, 3)), 0, 255).astype(np.uint8))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(glass), "--model", str(outputs["weights"]), "--out", str(out)])
    assert res.exit_code == 3 and "no tissue" in res.stderr, res.stdout + res.stderr
    (page_path,) = out.glob("*/report.html")
    page = probe(page_path, tmp_path, NO_TISSUE_JS)
    assert page["n"] == 1 and page["broken"] == [] and page["external"] == 0
    assert page["title"] == "wsipipe slide report — glass.tif: no tissue"
    assert page["text"]["decision"] == "no tissue" and "no tissue found" in page["text"]["no-tissue-reason"]
    assert page["text"]["meta-path"] == str(glass) and page["text"]["tissue-area"] == "0 mm²"
    assert "Tissue detection found nothing" in page["text"]["why"] and "tissue.detect: false" in page["text"]["why"]
    assert {"tissue.min_saturation", "tissue.max_brightness", "tissue.min_area_um2", "tile.min_tissue"} <= set(page["settings"])
    # The thumbnail tissue detection looked at: the whole 1500 x 1000 slide at 8 µm/px.
    assert page["thumbnail"] is not None and abs(page["thumbnail"][0] / page["thumbnail"][1] - 1.5) < 0.05

    # In a batch it is a failed row that keeps its folder; the archive report links to the page
    # (test_archive_report_sorts_filters_and_links follows such links in Chromium).
    (row,) = run_slides([glass], out, load_config(None, {}), outputs["weights"])
    assert row.status == "failed" and "no tissue" in (row.error or "") and row.out_dir == str(page_path.parent)
    report = write_archive_report([row.as_dict()], out / "archive-report.html")
    links = re.findall(r'<a href="([^"]+)">open</a>', report.read_text())
    assert [(report.parent / html.unescape(h)).resolve() for h in links] == [page_path.resolve()]


def test_qc_card_counts_every_flag_and_takes_the_worst_colour():
    """The card's count is the list's length; its colour the most severe flag's."""
    # A review flag and an info flag: once "1 flag" over two listed.
    card = qc_card(["review", "info"])
    assert (card["count"], card["status"], card["css"], card["count_text"]) == (2, "needs review", "review", "2 flags: 1 review, 1 info")
    # Only an mpp_override (info): once "no flags" in green.
    card = qc_card(["info"])
    assert (card["count"], card["status"], card["css"], card["count_text"]) == (1, "info only", "info", "1 flag: 1 info")
    card = qc_card(["info", "fail", "review", "review"])
    assert (card["status"], card["css"], card["count_text"]) == ("failed", "fail", "4 flags: 1 fail, 2 review, 1 info")
    assert (qc_card([])["css"], qc_card([])["count"]) == ("ok", 0)
    assert qc_card(["unheard-of"])["css"] == "review"  # a person looks rather than nobody


def test_top_scoring_ranks_among_patches_with_enough_tissue():
    probs = np.array([0.99, 0.9, 0.8, 0.7, 0.6], np.float32)
    background = np.array([0.9, 0.1, 0.6, 0.0, 0.5])
    assert top_scoring(probs, background, 0.5, 2) == ([1, 3], {"limit": 0.5, "total": 5, "eligible": 3, "ranked": "tissue"})
    assert top_scoring(probs, None, 0.5, 2)[0] == [0, 1] and top_scoring(probs, None, 0.5, 2)[1]["ranked"] == "unmeasured"
    assert top_scoring(probs, np.ones(5), 0.5, 2)[0] == [0, 1] and top_scoring(probs, np.ones(5), 0.5, 2)[1]["ranked"] == "none-eligible"
    # The limit: the one given, else the one the slide was stitched with, else the config's default.
    from wsipipe.config import StitchConfig
    from wsipipe.outputs.report import gallery_limit as limit_of

    field = StitchConfig.model_fields.get("max_background")
    assert limit_of(0.3, {"max_background": 0.7}, {}) == 0.3 and limit_of(None, {"max_background": 0.7}, {}) == 0.7
    assert limit_of(None, {"max_background": "x"}, {"max_background": 0.6}) == 0.6
    assert limit_of(None, {}, {}) == (field.default if field is not None else 0.5)


def test_resolution_not_from_the_file_says_where_it_came_from(slides_dir):
    """The TCGA slide states no resolution at all; CMU-1 states 0.499 µm/px."""
    import openslide

    tcga = slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    with openslide.OpenSlide(str(tcga)) as handle:
        properties = dict(handle.properties)
    override = {"path": str(tcga), "mpp": 0.25, "mpp_source": "override"}
    note = resolution_note(0.25, "override", file_mpp(override, properties))
    assert note["warn"] and note["text"].startswith("resolution 0.25 µm/px set by the user (the file states none).")
    # A fallback resolution (mpp_file recorded by tiling) and one estimated from the objective power.
    default = {"mpp": 1.0, "mpp_source": "default", "mpp_file": None}
    assert "set by the user as the default for files without one (the file states none)" in resolution_note(
        1.0, "default", file_mpp(default, None))["text"]
    estimated = resolution_note(0.5, "objective-power", file_mpp({"mpp_source": "objective-power", "mpp_file": None}, None), 20.0)
    assert estimated["warn"] and "estimated from the objective power (20×)" in estimated["text"]
    # Read from the file: no warning.
    assert not resolution_note(0.499, "openslide", file_mpp({"mpp": 0.499, "mpp_source": "openslide"}, None))["warn"]


ARCHIVE_JS = IMAGES_JS + """
  names: function () { return Array.from(document.querySelectorAll("#slides tbody tr")).map(function (r) {
         return r.cells[0].querySelector("b").textContent; }); },
};
"""


def test_archive_report_sorts_filters_and_links(outputs):
    rows = outputs["rows"]
    out = outputs["tmp"] / "archive" / "archive-report.html"
    assert write_archive_report(rows, out) == out
    js = """
    var table = document.getElementById("slides");
    var names = function () { return Array.from(table.tBodies[0].rows).map(function (r) {
        return r.cells[0].querySelector("b").textContent; }); };
    var visible = function () { return Array.from(table.tBodies[0].rows).filter(function (r) { return !r.hidden; }).length; };
    var header = function (label) { return Array.from(table.tHead.rows[0].cells).filter(function (th) {
        return th.textContent.trim() === label; })[0]; };
    var result = {initial: names()};
    header("score").click(); result.score_asc = names();
    header("score").click(); result.score_desc = names();
    header("slide").click(); result.name_asc = names();
    var status = document.getElementById("status-filter");
    status.value = "failed"; status.dispatchEvent(new Event("change")); result.failed_visible = visible();
    result.failed_text = Array.from(table.tBodies[0].rows).filter(function (r) { return !r.hidden; })
        .map(function (r) { return r.textContent; }).join("");
    status.value = ""; status.dispatchEvent(new Event("change"));
    var text = document.getElementById("filter");
    text.value = "cmu-1"; text.dispatchEvent(new Event("input")); result.cmu_visible = visible();
    result.links = Array.from(document.querySelectorAll("#slides a")).map(function (a) { return a.getAttribute("href"); });
    result.scores = Object.fromEntries(Array.from(table.tBodies[0].rows).map(function (r) {
        return [r.cells[0].querySelector("b").textContent, r.cells[2].textContent.trim()]; }));
    result.counts = ["slides", "ok", "failed", "tumor", "normal", "review"].map(function (k) {
        return document.getElementById("count-" + k).textContent; });
    var imgs = Array.from(document.images);
    result.n = imgs.length;
    result.broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
    return result;
    """
    page = probe(out, outputs["tmp"], js)
    names = [r["name"] or Path(r["slide"]).name for r in rows]
    scores = {n: (r["summary"] or {}).get("slide_score", {}).get("top_k_mean") for n, r in zip(names, rows, strict=True)}
    assert page["initial"] == names
    by_score = sorted((n for n in names if scores[n] is not None), key=lambda n: scores[n])
    assert page["score_asc"] == by_score + ["broken.svs"]  # no score: last either way
    assert page["score_desc"] == by_score[::-1] + ["broken.svs"]
    assert page["name_asc"] == sorted(names, key=str.lower)
    assert page["failed_visible"] == 1 and rows[2]["error"] in html.unescape(page["failed_text"])
    assert page["cmu_visible"] == 1
    for name in names:
        shown = page["scores"][name]
        assert (shown == "—") if scores[name] is None else float(shown) == pytest.approx(scores[name], abs=5e-4)
    decisions = [(r["summary"] or {}).get("decision") for r in rows]
    assert page["counts"] == ["3", "2", "1", str(decisions.count("tumor")), str(decisions.count("normal")), "1"]
    assert len(page["links"]) == 2 and all((out.parent / href).resolve().is_file() for href in page["links"])
    assert page["n"] == 3 and page["broken"] == []
    screenshot(out, outputs["tmp"] / "archive-report.png", outputs["tmp"], height=1500)

    md = archive_markdown(rows, out)
    assert out.resolve().as_uri() in md and "| 3 | 2 | 0 | 1 |" in md and "broken.svs" in md


def test_report_cli(outputs, tmp_path):
    env_cmd = [sys.executable, "-m", "wsipipe.cli", "report"]
    planted = outputs["planted"]
    before = (planted / "report.html").stat().st_mtime_ns
    res = subprocess.run([*env_cmd, str(planted)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "report.html" in res.stdout and (planted / "report.html").stat().st_mtime_ns > before
    empty = tmp_path / "not-a-slide-output"
    empty.mkdir()
    res = subprocess.run([*env_cmd, str(empty)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "summary.json" in res.stderr and "not-a-slide-output" in res.stderr


# --------------------------------------------------------------------------- archive numbers and the index


def test_archive_throughput_is_processed_slides_over_the_runs_wall_time(tmp_path):
    """3 slides in a 58.7-s run, 1 computed: 61 slides/hour (not the sum of per-slide seconds);
    a rerun that computes nothing says so instead of giving a rate."""
    t0 = datetime(2026, 1, 31, 2, 0, tzinfo=UTC)
    rows = [result_row("/s/a.svs", "ok", seconds=58.0, finished=t0 + timedelta(seconds=58.7)),
            result_row("/s/b.svs", "skipped", seconds=0.2, finished=t0 + timedelta(seconds=0.9)),
            result_row("/s/c.svs", "failed", error="boom", seconds=0.7, finished=t0 + timedelta(seconds=0.7))]
    run = archive_throughput(rows)
    assert run["start"] == t0 and run["wall_s"] == pytest.approx(58.7) and run["processed"] == 1
    assert run["per_hour"] == pytest.approx(3600 / 58.7)
    page = write_archive_report(rows, tmp_path / "a.html").read_text()
    assert '<div class="value" id="throughput">61.3</div>' in page and "1 processed in 58.7 s wall clock" in page
    assert "(58.7 s wall clock)" in page

    noop = [result_row(f"/s/{n}.svs", "skipped", seconds=0.01, finished=t0 + timedelta(seconds=0.02)) for n in "abc"]
    assert archive_throughput(noop)["per_hour"] is None and archive_throughput(noop)["processed"] == 0
    page = write_archive_report(noop, tmp_path / "noop.html").read_text()
    assert '<div class="muted" id="throughput-note">no slides processed</div>' in page and "slides per hour" not in page
    # Rows of a run that recorded no wall-clock times: no rate, no timeline.
    old = [{k: v for k, v in r.items() if k not in ("started", "finished")} for r in rows]
    assert archive_throughput(old)["per_hour"] is None
    assert "no wall-clock times recorded" in write_archive_report(old, tmp_path / "old.html").read_text()


def generated_rows(n: int, out: Path, t0: datetime) -> list[dict]:
    """``n`` rows of one run (ok, skipped, failed in turn; scores spread over [0, 1)), each ok
    or skipped slide with a report in ``out``."""
    rows = []
    for i in range(n):
        status = ("ok", "ok", "skipped", "failed")[i % 4]
        slide, finished = f"/archive/batch-{i // 100}/slide-{i:04d}.svs", t0 + timedelta(seconds=7 * i + 40)
        if status == "failed":
            rows.append(result_row(slide, "failed", error=f"SlideOpenError: {slide}: not a slide", seconds=1, finished=finished))
            continue
        folder = out / f"slide-{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.html").write_text("<!DOCTYPE html><title>slide</title>")
        score = (i * 0.6180339887) % 1.0
        summary = {"decision": "tumor" if score >= 0.5 else "normal", "threshold": 0.5, "slide_score": {"top_k_mean": score},
                   "tumor_area_mm2": 10 * score, "qc": {"flags": [{"code": "tissue_small"}] if i % 5 == 0 else [],
                                                        "needs_review": i % 5 == 0}}
        rows.append(result_row(slide, status, name=folder.name, out_dir=folder, summary=summary, seconds=40, finished=finished))
    return rows


SORT_JS = """
var table = document.getElementById("slides");
var names = function () { return Array.from(table.tBodies[0].rows).map(function (r) { return r.cells[0].querySelector("b").textContent; }); };
var header = function (label) { return Array.from(table.tHead.rows[0].cells).filter(function (th) {
    return th.textContent.trim() === label; })[0]; };
var result = {rows: table.tBodies[0].rows.length, images: document.images.length,
              broken: Array.from(document.images).filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length,
              elements: document.getElementsByTagName("*").length};
header("score").click(); result.score_asc = names();
header("slide").click(); header("slide").click(); result.name_desc = names();
var status = document.getElementById("status-filter");
status.value = "failed"; status.dispatchEvent(new Event("change"));
result.failed = Array.from(table.tBodies[0].rows).filter(function (r) { return !r.hidden; }).length;
result.shown = document.getElementById("shown-count").textContent;
result.links = document.querySelectorAll("#slides a").length;
result.stale = document.querySelectorAll("#slides .stale").length;
return result;
"""


def test_archive_report_and_index_of_1000_slides_open_and_sort_in_chromium(tmp_path):
    """1 000 rows of one run and 200 of an earlier one: archive-report.html and the folder's
    archive-index.html load in Chromium, sort and filter every row, and stay lean (no per-row
    image, under 1.5 kB of HTML and 25 elements a row)."""
    out = tmp_path / "out"
    t0 = datetime(2026, 1, 31, 2, 0, tzinfo=UTC)
    # An earlier run: 200 other slides, then 10 of this run's slides, which this run fails.
    earlier = [result_row(f"/old/old-{i:04d}.svs", "failed", error="boom", seconds=1, finished=t0 - timedelta(days=1))
               for i in range(200)]
    earlier += generated_rows(4, out, t0 - timedelta(days=1))  # slide-0000..0003: ok, ok, skipped, failed
    write_archive_files(earlier, out)
    rows = generated_rows(1000, out, t0)
    for k in (0, 1):  # two slides ok in the earlier run fail now: their earlier report stays, marked
        rows[k] = result_row(rows[k]["slide"], "failed", error="boom", seconds=1, finished=datetime.fromisoformat(rows[k]["finished"]))
    report = write_archive_files(rows, out)
    index = read_index(out)
    assert len(index) == 1200 and (out / INDEX_FILE).stat().st_size < 600_000

    names = [r["name"] or Path(r["slide"]).name for r in rows]
    scores = {n: (r["summary"] or {}).get("slide_score", {}).get("top_k_mean") for n, r in zip(names, rows, strict=True)}
    page = probe(report, tmp_path, SORT_JS)
    assert page["rows"] == 1000 and page["images"] == 3 and page["broken"] == 0
    assert page["score_asc"] == sorted((n for n in names if scores[n] is not None), key=lambda n: scores[n]) + [
        n for n in names if scores[n] is None]
    assert page["name_desc"] == sorted(names, key=str.lower, reverse=True)
    n_failed = sum(r["status"] == "failed" for r in rows)
    assert page["failed"] == n_failed and page["shown"] == f"{n_failed} of 1000 shown" and page["links"] == 1000 - n_failed
    assert report.stat().st_size < 1000 * 1500 + 150_000 and page["elements"] < 25 * 1000

    page = probe(out / "archive-index.html", tmp_path, SORT_JS)
    assert page["rows"] == 1200 and page["images"] == 0
    by_name = {e["name"]: e for e in index}
    assert page["name_desc"] == sorted(by_name, key=str.lower, reverse=True)
    assert page["failed"] == sum(e["status"] == "failed" for e in index) == 200 + n_failed
    assert page["stale"] == 2 and page["links"] == sum(1 for e in index if e["out_dir"])
    assert (out / "archive-index.html").stat().st_size < 1200 * 1500 and page["elements"] < 25 * 1200
