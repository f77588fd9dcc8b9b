"""The slide's resolution on the real slides, as a user meets it: `wsipipe tile` with an override,
a default or neither, the store's attrs, the QC flags and summary.json, and the one-line errors for
a missing or implausible resolution and for images that are not whole-slide images."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from wsipipe.cli import app
from wsipipe.config import QCConfig, StitchConfig
from wsipipe.errors import ImplausibleMppError, MissingMppError
from wsipipe.outputs.stitch import stitch_store
from wsipipe.run.archive import archive_error
from wsipipe.slides.slide import open_slide
from wsipipe.tiles import qc, store
from wsipipe.tiles.tiling import plan_grid

TCGA, CMU1 = "tcga-cr-7395-01a-01-ts1.svs", "cmu-1-small-region.svs"
QC = QCConfig()


def tile(slides_dir, tmp_path, name, *options, config=None):
    """`wsipipe tile` in process (as a user runs it): (exit code, one-line stderr, store group or None)."""
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.zarr"
    args = ["tile", str(slides_dir / name), "--out", str(out), *map(str, options)]
    if config:
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
        args += ["--config", str(tmp_path / "cfg.yaml")]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    group = store.open_store(out) if res.exit_code == 0 else None
    tile.last_store = out
    return res.exit_code, lines, group


def flags_of(group, cfg=QC):
    return {f["code"]: f for f in qc.slide_qc(group, store.meta(group), None, 0.5, cfg)["flags"]}


def test_tcga_upsampled_4x_is_flagged_and_its_blur_not_blamed_on_the_scanner(slides_dir, tmp_path):
    """Override 2.0 on the TCGA slide with the 0.5 µm/px target: every patch is enlarged 4x. The store
    says so, QC raises `upsampled` (review) naming the factor and both resolutions, and the blur the
    upsampling makes is not reported as `out_of_focus` (it was, with a stricter blur limit)."""
    code, lines, group = tile(slides_dir, tmp_path, TCGA, "--mpp-override", 2.0, config={"tile": {"stride": 896}})
    assert code == 0, lines
    meta = store.meta(group)
    assert meta["tile"]["upsample"] == 4.0 and meta["tile"]["mpp"] == 0.5
    flags = flags_of(group)
    up = flags["upsampled"]
    assert up["severity"] == qc.REVIEW and up["value"] == 4.0
    assert "4x" in up["message"] and "2 µm/px" in up["message"] and "0.5 µm/px" in up["message"]
    assert "blurred by upsampling" in up["message"] and "less detail than it was trained on" in up["message"]

    strict = QCConfig(max_blur_fraction=0.01)  # low enough that this slide's soft patches exceed it
    measures = qc.read_measures(group)
    without_tile = qc.slide_flags(meta["slide"], meta["tissue"], measures, None, 0.5, strict)  # what tiling did unknown
    assert "out_of_focus" in [f["code"] for f in without_tile]
    assert "out_of_focus" not in flags_of(group, strict) and "upsampled" in flags_of(group, strict)


def test_upsampling_factor_of_the_grid():
    """TCGA's pyramid (level 1 at 2.0005x) at 0.5 µm/px: at 0.25 µm/px no upsampling, at 1.0 2x, at 2.0 4x;
    within tile.mpp_tolerance of level 0 counts as none. 2x is review, a few per cent is info."""
    ds = (1.0, 2.000505)
    assert [plan_grid(4443, 3567, m, ds, 0.5, 224, 224).upsample for m in (0.25, 0.5, 1.0, 2.0)] == [1.0, 1.0, 2.0, 4.0]
    assert plan_grid(4443, 3567, 0.51, ds, 0.5, 224, 224).upsample == 1.0  # 2 %: level 0 as is
    slide = {"mpp": 0.526, "mpp_source": "openslide", "width": 40000, "height": 30000}
    (mild,) = qc.resolution_flags(slide, {"upsample": 0.526 / 0.5, "mpp": 0.5}, QC)
    assert mild["code"] == "upsampled" and mild["severity"] == qc.INFO


def test_tcga_at_025_is_too_small_for_glass_and_cmu1_as_stated_is_not(slides_dir, tmp_path):
    """TCGA at 0.25 µm/px would be a 1.1 x 0.89 mm slide: `mpp_suspicious` (review) naming the size,
    whether the value came from --mpp-override or mpp_default. CMU-1 is a genuine 1.1 x 1.5 mm crop
    whose file states 0.499: no review flag about its resolution."""
    code, lines, group = tile(slides_dir, tmp_path, TCGA, "--mpp-override", 0.25)
    assert code == 0, lines
    flags = flags_of(group)
    assert flags["mpp_suspicious"]["severity"] == qc.REVIEW
    assert "1.1 x 0.89 mm" in flags["mpp_suspicious"]["message"] and flags["mpp_suspicious"]["extent_mm"] == 1.111
    assert "upsampled" not in flags  # level 1 (2.0005x) read as is
    with open_slide(slides_dir / CMU1) as cmu:
        assert [f for f in qc.resolution_flags(cmu.info(), {}, QC) if f["severity"] != qc.INFO] == []
    with open_slide(slides_dir / TCGA, mpp_default=0.25) as tcga:
        assert [f["code"] for f in qc.resolution_flags(tcga.info(), {}, QC)] == ["mpp_suspicious", "mpp_default"]
    with open_slide(slides_dir / TCGA, mpp_default=0.5) as tcga:  # 2.2 x 1.8 mm: plausible
        assert [f["code"] for f in qc.resolution_flags(tcga.info(), {}, QC)] == ["mpp_default"]


def test_mpp_default_applies_to_tcga_and_not_to_cmu1(slides_dir, tmp_path):
    """mpp_default gives TCGA (no resolution in the file) its 0.25; CMU-1 keeps the 0.499 its file
    states, with the very patches and store identity it gets without a default."""
    code, lines, tcga = tile(slides_dir, tmp_path, TCGA, config={"mpp_default": 0.25})
    assert code == 0, lines
    slide = store.meta(tcga)["slide"]
    assert (slide["mpp"], slide["mpp_source"], slide["mpp_file"]) == (0.25, "default", None)
    assert store.meta(tcga)["tile"]["mpp_default"] == 0.25

    _, _, plain = tile(slides_dir, tmp_path, CMU1)
    code, lines, cmu = tile(slides_dir, tmp_path, CMU1, config={"mpp_default": 0.25})
    assert code == 0, lines
    slide = store.meta(cmu)["slide"]
    assert (slide["mpp"], slide["mpp_source"], slide["mpp_file"]) == (0.499, "openslide", 0.499)
    assert cmu["coords"].shape[0] == plain["coords"].shape[0] == 49
    assert store.stage_entry(cmu, "tile")["identity"] == store.stage_entry(plain, "tile")["identity"]
    assert "mpp_default" not in flags_of(cmu)


def test_override_contradicting_cmu1_is_flagged_in_summary_and_report(slides_dir, tmp_path):
    """--mpp-override 0.25 on CMU-1 (file: 0.499) keeps 15 patches instead of 49: flagged for review
    with both values, in summary.json (whose slide section names the source and the file's value)
    and in the report. An override that agrees with the file is only an info flag."""
    from wsipipe.outputs.report import write_slide_report

    code, lines, group = tile(slides_dir, tmp_path, CMU1, "--mpp-override", 0.25)
    assert code == 0, lines
    n = group["coords"].shape[0]
    assert n == 15
    group = store.open_store(tile.last_store, mode="a")
    # Probabilities stand in for a model here: the flags come from the store, not the scores.
    group.create_array("probabilities", data=np.linspace(0.1, 0.9, n, dtype=np.float32), chunks=(n,))
    store.set_stage(group, "infer", {"tile": "t", "model": "m"}, True, model={"sha256": "m", "arch": "resnet18"})
    out = tmp_path / "out"
    summary = stitch_store(tile.last_store, out, StitchConfig(), qc_cfg=QC)
    assert summary["slide"]["mpp"] == 0.25
    assert summary["slide"]["mpp_source"] == "override" and summary["slide"]["mpp_file"] == pytest.approx(0.499)
    flags = {f["code"]: f for f in summary["qc"]["flags"]}
    bad = flags["mpp_override_contradicts"]
    assert bad["severity"] == qc.REVIEW and bad["value"] == 0.25 and bad["file_value"] == pytest.approx(0.499)
    assert "0.25 µm/px" in bad["message"] and "0.499 µm/px the file states" in bad["message"]
    assert "mpp_override" not in flags and summary["qc"]["needs_review"]
    html = write_slide_report(out, QC).read_text()
    assert "mpp_override_contradicts" in html and "0.499 µm/px the file states" in html

    with open_slide(slides_dir / CMU1, mpp_override=0.5) as agreeing:  # 0.2 % from the file's 0.499
        (info,) = qc.resolution_flags(agreeing.info(), {"mpp_tolerance": 0.05}, QC)
    assert info["code"] == "mpp_override" and info["severity"] == qc.INFO and "agrees with the file's 0.499" in info["message"]


def test_resolution_errors_are_one_line_that_says_how_to_find_and_give_it(slides_dir, tmp_path):
    """TCGA without a resolution, and a TIFF whose tags say 352.9 µm/px (72 dpi): `wsipipe tile`
    stops with one line naming the file, the problem, how to find the value and how to give it;
    an archive gives it its own way. mpp_default or an override (the user's word, even
    out of range: then flagged) get past the implausible one."""
    code, lines, _ = tile(slides_dir, tmp_path, TCGA)
    assert code == 2 and len(lines) == 1, lines
    (line,) = lines
    assert f"{slides_dir / TCGA}: no resolution in the file" in line
    for words in ("--mpp-override", "--mpp-default", "objective power", "20x ≈ 0.5 µm/px, 40x ≈ 0.25",
                  "scanner model", "another slide from the same scanner", "openslide.mpp-x"):
        assert words in line, words

    code, lines, _ = tile(slides_dir, tmp_path, "pathml-small_HE_levels.tiff")
    assert code == 2 and len(lines) == 1, lines
    assert f"{slides_dir / 'pathml-small_HE_levels.tiff'}: implausible resolution in the file: its TIFF resolution " \
           "tags say 352.9 µm/px, outside the 0.1–2 µm/px of brightfield scanners (qc.mpp_range)" in lines[0]
    assert "--mpp-override" in lines[0] and "objective power" in lines[0]

    archived = archive_error(ImplausibleMppError(slides_dir / "x.tiff", "implausible resolution in the file"))
    assert type(archived) is ImplausibleMppError and isinstance(archived, MissingMppError)
    assert "mpp column" in str(archived) and "--mpp-override" not in str(archived) and "objective power" in str(archived)
    back = pickle.loads(pickle.dumps(archived))
    assert type(back) is ImplausibleMppError and str(back) == str(archived)

    code, lines, group = tile(slides_dir, tmp_path, "pathml-small_HE_levels.tiff", config={"mpp_default": 0.5,
                              "tissue": {"detect": False}, "tile": {"patch_size": 32, "min_tissue": 0.0}})
    assert code == 0, lines
    slide = store.meta(group)["slide"]
    assert slide["mpp_source"] == "default" and slide["mpp_file"] == pytest.approx(352.858, rel=1e-4)
    assert "352.9 µm/px is implausible" in flags_of(group)["mpp_default"]["message"]
    with open_slide(slides_dir / "pathml-small_HE_levels.tiff", mpp_override=5.0, mpp_range=QC.mpp_range) as s:
        flags = {f["code"]: f for f in qc.resolution_flags(s.info(), {}, QC)}
    assert s.mpp_source == "override" and flags["mpp_suspicious"]["severity"] == qc.REVIEW


@pytest.mark.parametrize("name,what", [
    ("kidney-48-5.tif", "not a slide format OpenSlide can read: an untiled TIFF (a single 1493x901 image in strips, "
                        "uncompressed), not a tiled pyramidal whole-slide image"),
    ("pathml-small_dicom.dcm", "a DICOM whole-slide image OpenSlide cannot read"),
])
def test_images_that_are_not_whole_slide_images_say_what_to_do_through_the_cli(slides_dir, tmp_path, name, what):
    code, lines, _ = tile(slides_dir, tmp_path, name)
    assert code == 2 and len(lines) == 1, lines
    assert f"{slides_dir / name}: {what}" in lines[0]
    assert "generic tiled TIFF and DICOM WSI" in lines[0] and "vips tiffsave IN OUT.tif --tile --pyramid" in lines[0]
