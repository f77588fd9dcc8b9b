"""The training-side commands through the CLI on generated slides: nested QuPath annotations
(a Tumor inside a Tissue outline) label the tumor, unknown and empty classes are warned
about, pretraining resumes to a raised step count, and a linear probe on one slide splits
it by position. Bad inputs are one typed line, never "unexpected"."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, box
from typer.testing import CliRunner

from wsipipe.cli import app
from wsipipe.learn.patchsets import label_by_regions, painted_coverage
from wsipipe.tiles import store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ENV = {"COLUMNS": "400"}


def wsipipe(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def one_error_line(res, *expected):
    """Exit 2 and a single typed error line containing every ``expected`` string."""
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("wsipipe")]
    assert res.exit_code == 2, res.stdout + res.stderr
    assert len(lines) == 1 and "unexpected" not in res.stderr and lines[0].startswith("wsipipe error: "), res.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _feature(geom, name):
    return {"type": "Feature", "geometry": shapely.geometry.mapping(geom),
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def _geojson(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_smallest_region_wins_where_classes_overlap():
    # a row of 10-px patches: Tissue covers the first four, Tumor (inside it) patch 1 and 0.7 of patch 2
    coords = np.array([[0, 0], [10, 0], [20, 0], [30, 0], [40, 0]])
    regions = {"Tissue": MultiPolygon([box(0, 0, 40, 10)]), "Tumor": MultiPolygon([box(10, 0, 27, 10)])}
    assert label_by_regions(coords, 10, regions, ["Normal", "Tissue", "Tumor"]).tolist() == [1, 2, 2, 1, 0]
    assert label_by_regions(coords, 10, regions, ["Normal", "Tumor", "Tissue"]).tolist() == [2, 1, 1, 2, 0]
    # Tissue not asked for: its polygons are ignored, the rest is background
    assert label_by_regions(coords, 10, regions, ["Normal", "Tumor"]).tolist() == [0, 1, 1, 0, 0]
    # no background class listed: patches clear of every polygon stay unlabelled
    assert label_by_regions(coords, 10, regions, ["Tissue", "Tumor"]).tolist() == [0, 1, 1, 0, -1]
    # partly overlapping classes: the overlap goes to the smaller polygon, nothing is counted twice
    cover = painted_coverage(np.array([[0, 0], [10, 0], [5, 0]]), 10,
                             {"B": MultiPolygon([box(5, 0, 25, 10)]), "A": MultiPolygon([box(0, 0, 10, 10)])})
    np.testing.assert_allclose(cover, [[0, 1], [1, 0], [0.5, 0.5]])


def _fractions(g, region):
    info = store.meta(g)
    coords, size = np.asarray(store.array(g, "coords")[:]), info["tile"]["patch_size_l0"]
    squares = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
    return shapely.area(shapely.intersection(squares, region)) / size**2


def test_patches_on_the_qupath_layout_label_the_tumor_inside_the_tissue(labelled_slides, tmp_path):
    """The generator's GeoJSON is QuPath's usual layout: a Tissue outline with Tumor polygons in it."""
    s = labelled_slides["slides"][0]
    path = tmp_path / "slide.zarr"
    shutil.copytree(labelled_slides["stores"][0], path)
    res = wsipipe("patches", path, "--annotations", s.geojson_path)
    assert res.exit_code == 0, res.stdout + res.stderr
    g = store.open_store(path)
    labels, info = np.asarray(store.array(g, "labels")[:]), store.meta(g)["labels"]
    assert info["classes"] == ["Normal", "Tissue", "Tumor"]
    tumor, rest = _fractions(g, s.tumor), _fractions(g, s.tissue.difference(s.tumor))
    assert (labels == 2).sum() >= 20, np.bincount(labels + 1)
    np.testing.assert_array_equal(labels == 2, tumor >= 0.5)  # independent of the labeller's painting
    np.testing.assert_array_equal(labels == 1, (rest >= 0.5) & (tumor < 0.5))
    assert f"Tumor {(labels == 2).sum()}" in res.stdout and "unlabelled" in res.stdout
    assert "ignored" not in res.stderr
    # the Tissue outline leaves nothing to the background (tiling kept tissue only): the warning says what to do
    assert not (labels == 0).any() and "'Normal' has no patches" in res.stderr, res.stderr
    assert "--classes Normal=Tissue,Tumor" in res.stderr and f"Normal 0, Tissue {(labels == 1).sum()}" in res.stdout

    # Tissue not among the classes: warned about by name, its polygons ignored (background around the tumor)
    res = wsipipe("patches", path, "--annotations", s.geojson_path, "--classes", "Normal,Tumor,Necrosis")
    assert res.exit_code == 0, res.stdout + res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("wsipipe warning: ")]
    assert any("ignored: Tissue" in w for w in warnings), res.stderr
    assert any("'Necrosis' has no patches" in w and "no polygons of Necrosis" in w for w in warnings), res.stderr
    g = store.open_store(path)
    labels, info = np.asarray(store.array(g, "labels")[:]), store.meta(g)["labels"]
    assert info["classes"] == ["Normal", "Tumor", "Necrosis"] and len(info["warnings"]) == 2
    np.testing.assert_array_equal(labels == 1, tumor >= 0.5)
    np.testing.assert_array_equal(labels == 0, tumor <= 0.1)

    # mapped onto the background class: no warning, the same binary labels
    res = wsipipe("patches", path, "--annotations", s.geojson_path, "--classes", "Normal=Tissue,Tumor")
    assert res.exit_code == 0 and "warning" not in res.stderr, res.stderr
    g = store.open_store(path)
    assert store.meta(g)["labels"]["mapping"] == {"Normal": ["Tissue"]}
    np.testing.assert_array_equal(np.asarray(store.array(g, "labels")[:]), labels)


def test_patches_bad_inputs_are_one_line(labelled_slides, tmp_path):
    s = labelled_slides["slides"][0]
    path = tmp_path / "slide.zarr"
    shutil.copytree(labelled_slides["stores"][0], path)
    before = np.asarray(store.array(store.open_store(path), "labels")[:])
    empty = _geojson(tmp_path / "empty.geojson", [])
    one_error_line(wsipipe("patches", path, "--annotations", empty), str(empty), "no polygon annotations")
    tissue_only = _geojson(tmp_path / "tissue.geojson", [_feature(s.tissue, "Tissue")])
    one_error_line(wsipipe("patches", path, "--annotations", tissue_only, "--classes", "Normal,Tumor"),
                   str(tissue_only), "no polygons of the classes ['Tumor']", "['Tissue']")
    one_error_line(wsipipe("patches", path, "--annotations", tissue_only, "--classes", "Normal,Tumor=A,B=A"),
                   "mapped to both")
    np.testing.assert_array_equal(np.asarray(store.array(store.open_store(path), "labels")[:]), before)  # nothing written
    one_error_line(wsipipe("patches", tmp_path / "nope.zarr", "--annotations", empty), "nope.zarr", "not found")
    one_error_line(wsipipe("patches", path, "--out", tmp_path / "x.zarr"), "is a Zarr store")
    one_error_line(wsipipe("patches", tmp_path, "--annotations", s.geojson_path), "not a wsipipe Zarr store")


def _small_config(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("pretrain: {arch: shufflenet_v2_x0_5, batch_size: 8, crop: 32, hidden_dim: 32, projection_dim: 16,"
                   " checkpoint_every: 50, device: cpu, precision: fp32}\n")
    return cfg


def test_pretrain_resumes_to_more_steps_and_refuses_another_method(labelled_slides, tmp_path):
    cfg, data, out = _small_config(tmp_path), labelled_slides["stores"][0], tmp_path / "enc"
    res = wsipipe("pretrain", data, "--out", out, "--method", "byol", "--steps", "2", "--config", cfg)
    assert res.exit_code == 0 and "after 2 steps (resumed from 0)" in res.stdout, res.stdout + res.stderr
    meta_path = out / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    assert meta["step"] == 2 and len(meta["losses"]) == 2
    # Steps are seeded by their number, so redone steps would give the same losses: mark the
    # recorded ones to see whether steps 1..2 run again.
    meta["losses"] = [101.0, 102.0]
    meta_path.write_text(json.dumps(meta))

    res = wsipipe("pretrain", data, "--out", out, "--method", "byol", "--steps", "4", "--config", cfg)
    assert res.exit_code == 0 and "after 4 steps (resumed from 2)" in res.stdout, res.stdout + res.stderr
    meta = json.loads(meta_path.read_text())
    assert meta["step"] == 4 and meta["config"]["steps"] == 4
    assert meta["losses"][:2] == [101.0, 102.0] and len(meta["losses"]) == 4 and max(meta["losses"][2:]) < 100

    res = wsipipe("pretrain", data, "--out", out, "--method", "byol", "--steps", "3", "--config", cfg)
    assert res.exit_code == 0 and "already at step 4" in res.stdout, res.stdout + res.stderr
    assert json.loads(meta_path.read_text())["step"] == 4

    res = wsipipe("pretrain", data, "--out", out, "--method", "simclr", "--steps", "4", "--config", cfg)
    one_error_line(res, str(meta_path), "method 'byol' in the checkpoint, 'simclr' now", "--restart")
    assert json.loads(meta_path.read_text())["method"] == "byol"  # untouched
    res = wsipipe("pretrain", data, "--out", out, "--method", "simclr", "--steps", "1", "--restart", "--config", cfg)
    assert res.exit_code == 0 and "after 1 steps (resumed from 0)" in res.stdout, res.stdout + res.stderr
    meta = json.loads(meta_path.read_text())
    assert meta["method"] == "simclr" and meta["step"] == 1


def test_pretrain_probe_on_one_slide_splits_it_by_position(labelled_slides, tmp_path):
    cfg, data, out = _small_config(tmp_path), labelled_slides["stores"][0], tmp_path / "enc"
    unlabelled = tmp_path / "unlabelled.zarr"
    shutil.copytree(data, unlabelled)
    shutil.rmtree(unlabelled / "labels")
    res = wsipipe("pretrain", data, "--out", out, "--steps", "1", "--probe", unlabelled, "--config", cfg)
    one_error_line(res, str(unlabelled), "no labels")
    assert not out.exists()  # refused before training

    res = wsipipe("pretrain", data, "--out", out, "--steps", "1", "--probe", data, "--config", cfg)
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "linear probe: accuracy" in res.stdout and "split spatial (blocks of" in res.stdout, res.stdout
    probe = json.loads((out / "probe.json").read_text())
    labels = np.asarray(store.array(store.open_store(data), "labels")[:])
    assert probe["n_train"] + probe["n_test"] <= (labels >= 0).sum() and probe["n_test"] >= (labels >= 0).sum() // 5
    assert 0.0 <= probe["auc"] <= 1.0 and "same slide" in probe["split"]


def test_augment_and_pretrain_mistakes_are_one_line(labelled_slides, tmp_path):
    cfg, data = _small_config(tmp_path), labelled_slides["stores"][0]
    copy = tmp_path / "set.zarr"
    shutil.copytree(data, copy)
    one_error_line(wsipipe("augment", copy, "--out", copy), str(copy), "would overwrite it")
    assert np.asarray(store.array(store.open_store(copy), "labels")[:]).size > 0  # the set is intact
    res = wsipipe("augment", copy, "--out", tmp_path / "aug.zarr", "--copies", "0")
    assert res.exit_code == 2 and "--copies" in res.stderr and "unexpected" not in res.stderr, res.stderr
    one_error_line(wsipipe("augment", tmp_path / "nope.zarr", "--out", tmp_path / "aug.zarr"), "nope.zarr", "not a wsipipe Zarr store")

    (tmp_path / "file").write_text("")
    one_error_line(wsipipe("pretrain", data, "--out", tmp_path / "file", "--steps", "1", "--config", cfg), "is a file")
    one_error_line(wsipipe("pretrain", tmp_path / "nope.zarr", "--out", tmp_path / "enc", "--config", cfg), "nope.zarr")
    assert not (tmp_path / "enc").exists()


def test_probe_on_a_folder_set_splits_by_patch_or_names_the_class_counts(labelled_slides, tmp_path):
    from PIL import Image

    cfg, data = _small_config(tmp_path), labelled_slides["stores"][0]
    patches = store.array(store.open_store(data), "patches")
    for k, name in enumerate(("ADI", "TUM")):
        (tmp_path / "kather" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.asarray(patches[k * 40 + i])).save(tmp_path / "kather" / name / f"s{i}.png")
    res = wsipipe("patches", tmp_path / "kather", "--out", tmp_path / "k.zarr", "--group-regex", "^(s)")
    assert res.exit_code == 0, res.stdout + res.stderr
    res = wsipipe("pretrain", data, "--out", tmp_path / "enc", "--steps", "1", "--probe", tmp_path / "k.zarr", "--config", cfg)
    assert res.exit_code == 0 and "split by patch" in res.stdout, res.stdout + res.stderr
    assert json.loads((tmp_path / "enc" / "probe.json").read_text())["n_test"] >= 2

    (tmp_path / "kather" / "TUM" / "s1.png").unlink()
    for i in (2, 3):
        (tmp_path / "kather" / "TUM" / f"s{i}.png").unlink()
    assert wsipipe("patches", tmp_path / "kather", "--out", tmp_path / "k1.zarr", "--group-regex", "^(s)").exit_code == 0
    res = wsipipe("pretrain", data, "--out", tmp_path / "enc", "--steps", "1", "--probe", tmp_path / "k1.zarr", "--config", cfg)
    one_error_line(res, str(tmp_path / "k1.zarr"), "class counts {'ADI': 4, 'TUM': 1}")
