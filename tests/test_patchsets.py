"""Labelled patch sets: QuPath annotations -> labels on tiled slides, folder-per-class sets,
annotation validation, and splits by slide / source group."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from PIL import Image

from wsipipe.tiles import store
from wsipipe.errors import AnnotationError, WsipipeError
from wsipipe.geojson import read_geojson
from wsipipe.learn.patchsets import folder_patch_set, load_patch_sets, read_annotations, split_by_group


def test_annotation_labels_agree_with_the_polygons(labelled_slides):
    for s, path in zip(labelled_slides["slides"], labelled_slides["stores"], strict=True):
        g = store.open_store(path)
        info = store.meta(g)
        assert info["labels"]["classes"] == ["Normal", "Tumor"]
        assert info["labels"]["groups"] == [info["slide"]["identity"]]
        labels, coords = g["labels"][:], g["coords"][:]
        size = info["tile"]["patch_size_l0"]
        # independent check: each patch square against the generator's own tumor geometry
        squares = shapely.box(coords[:, 0], coords[:, 1], coords[:, 0] + size, coords[:, 1] + size)
        frac = shapely.area(shapely.intersection(squares, s.tumor)) / size**2
        assert (frac[labels == 1] >= 0.5 - 1e-6).all() and (frac[labels == 0] <= 0.1 + 1e-6).all()
        assert (labels[(frac > 0.1 + 1e-6) & (frac < 0.5 - 1e-6)] == -1).all()
        assert (labels == 1).sum() >= 20 and (labels == 0).sum() >= 100, np.bincount(labels + 1)


def _write(path, features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _feature(coords, name="Tumor", kind="Polygon"):
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": name}}}


def test_annotation_validation_repairs_or_rejects_by_feature_index(tmp_path):
    square = [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]
    bowtie = [[[200, 200], [300, 300], [300, 200], [200, 300], [200, 200]]]  # self-intersecting
    ruler = _feature([[0, 0], [50, 50]], "Ruler", "LineString")
    path = _write(tmp_path / "a.geojson", [_feature(square), _feature(bowtie, "Stroma"), ruler])
    regions = read_annotations(path)
    assert set(regions) == {"Tumor", "Stroma"}
    assert regions["Stroma"].is_valid and regions["Stroma"].area == pytest.approx(5000)
    with pytest.raises(AnnotationError, match="feature 1: invalid polygon") as err:
        read_annotations(path, repair=False)
    assert err.value.path == path
    flat = [[[0, 0], [10, 10], [20, 20], [0, 0]]]  # zero area: nothing to label with
    with pytest.raises(AnnotationError, match="feature 2: polygon has no area"):
        read_annotations(_write(tmp_path / "b.geojson", [_feature(square), _feature(square), _feature(flat)]))
    (tmp_path / "c.geojson").write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        read_annotations(tmp_path / "c.geojson")


def test_ground_truth_geojson_reader_repairs_bow_ties_and_names_bad_features(tmp_path):
    """export.read_geojson (ground truth for Dice, reports) shares the rule: self-intersecting
    polygons are repaired, an unreadable geometry fails naming its feature index."""
    bowtie = [[[200, 200], [300, 300], [300, 200], [200, 300], [200, 200]]]
    regions = read_geojson(_write(tmp_path / "a.geojson", [_feature(bowtie)]))
    assert regions["Tumor"].is_valid and regions["Tumor"].area == pytest.approx(5000)
    broken = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2]]}, "properties": {}}
    path = _write(tmp_path / "b.geojson", [_feature(bowtie), broken])
    with pytest.raises(WsipipeError, match="feature 1: invalid geometry") as err:
        read_geojson(path)
    assert err.value.path == path


def test_folder_per_class_set_round_trip(labelled_slides, tmp_path):
    """A Kather-style folder (one sub-folder per class, mixed formats and sizes) written
    from the labelled slides loads back with the same pixels, classes and source groups."""
    src = load_patch_sets(labelled_slides["stores"])
    rng = np.random.default_rng(0)
    picked = np.concatenate([rng.choice(np.flatnonzero(src.labels == k), 12, replace=False) for k in (0, 1)])
    slide_names = {g: f"slide{i}" for i, g in enumerate(sorted(set(src.groups)))}
    for n, i in enumerate(picked):
        folder = tmp_path / "set" / src.classes[src.labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        ext = (".png", ".tif", ".png")[n % 3]
        Image.fromarray(src.patches[i]).save(folder / f"{slide_names[src.groups[i]]}_{n}{ext}")
    Image.fromarray(src.patches[picked[0]]).convert("RGBA").save(tmp_path / "set" / "Normal" / "slide0_rgba.png")
    Image.fromarray(src.patches[picked[1]]).resize((96, 96)).save(tmp_path / "set" / "Normal" / "slide0_big.jpg")
    (tmp_path / "set" / "Normal" / "notes.txt").write_text("not an image")

    stats = folder_patch_set(tmp_path / "set", tmp_path / "set.zarr", group_regex=r"^(slide\d+)_")
    assert stats["classes"] == ["Normal", "Tumor"] and stats["n_patches"] == len(picked) + 2
    got = load_patch_sets([tmp_path / "set.zarr"])
    assert got.patches.shape[1:] == (64, 64, 3) and got.patches.dtype == np.uint8
    assert set(got.groups) <= set(slide_names.values())
    g = store.open_store(tmp_path / "set.zarr")
    files = store.meta(g)["labels"]["files"]
    for k, name in enumerate(files):
        if name.endswith(".png") and "rgba" not in name:
            n = int(name.rsplit("_", 1)[1].split(".")[0])
            np.testing.assert_array_equal(got.patches[k], src.patches[picked[n]])
            assert got.classes[got.labels[k]] == src.classes[src.labels[picked[n]]]
    # without a group pattern every file is its own group: still a valid set
    assert folder_patch_set(tmp_path / "set", tmp_path / "set2.zarr")["n_groups"] == len(picked) + 2
    with pytest.raises(AnnotationError, match="no class sub-folders"):
        folder_patch_set(tmp_path / "set" / "Tumor", tmp_path / "bad.zarr")


def test_splits_never_share_a_slide_or_group():
    rng = np.random.default_rng(1)
    for trial in range(30):
        groups = rng.choice([f"g{i}" for i in range(int(rng.integers(3, 12)))], size=200)
        splits = split_by_group(groups, (0.6, 0.2, 0.2), seed=trial)
        seen = [set(groups[splits[k]]) for k in ("train", "val", "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        assert sum(len(v) for v in splits.values()) == 200 and all(seen)
    assert split_by_group(groups, seed=5)["test"].tolist() == split_by_group(groups, seed=5)["test"].tolist()
    with pytest.raises(ValueError):
        split_by_group(groups, (0.5, -0.1, 0.6))
