"""Outputs for other tools, read back with the real third-party readers: OME-Zarr through
ome-zarr-py's Reader, the OME-TIFF mask through tifffile, the GeoJSON through shapely and
QuPath's schema. Geometry and scale are checked against the slide the store describes
(see test_stitch.build_store: a 4000 x 3000 px slide at 0.5 µm/px with a planted tumor)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import tifffile
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from shapely.geometry import box

from test_stitch import MPP, SLIDE_H, SLIDE_W, STRIDE, TUMOR_L0, build_store
from wsipipe.config import ExportConfig, StitchConfig, load_config
from wsipipe.errors import ExportError
from wsipipe.geometry import mask_to_polygons
from wsipipe.outputs.omezarr import downsample_any, downsample_mean, level_transforms
from wsipipe.outputs.qupath import qupath_schema_problems, validate_qupath_geojson
from wsipipe.outputs.stitch import stitch_store

CFG = StitchConfig(threshold=0.5, min_tumor_area_um2=50_000, top_k=10)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interop")
    store_path = build_store(tmp / "case.zarr")
    out = tmp / "out"
    export = ExportConfig(ome_zarr=True, ome_tiff_mask=True, ome_tiff_mpp=2.0)
    summary = stitch_store(store_path, out, CFG, export=export)
    return out, summary


def _nodes(path):
    return list(Reader(parse_url(str(path)))())


def test_omezarr_heatmap_opens_with_ome_zarr_reader_at_slide_scale(outputs):
    out, summary = outputs
    assert summary["exports"]["heatmap_ome_zarr"] == "heatmap.ome.zarr"
    image = _nodes(out / "heatmap.ome.zarr")[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert image.metadata["name"] == "heatmap"
    assert [a["unit"] for a in image.metadata["axes"]] == ["micrometer", "micrometer"]
    levels = [np.asarray(d) for d in image.data]
    assert len(levels) >= 2  # a pyramid, not one level
    np.testing.assert_array_equal(levels[0], np.load(out / "heatmap.npy"))  # same values as stitch
    for k, (level, transforms) in enumerate(zip(levels, image.metadata["coordinateTransformations"], strict=True)):
        scale = next(t["scale"] for t in transforms if t["type"] == "scale")
        shift = next(t["translation"] for t in transforms if t["type"] == "translation")
        assert scale == pytest.approx([STRIDE * MPP * 2**k] * 2)
        # Element i covers [shift + (i - 1/2) scale, shift + (i + 1/2) scale) in µm, with slide
        # pixel centres at mpp * index: the level's extent covers the slide and at most one more
        # of its own elements (plus the grid's one cell of patch overhang at level 0).
        first_edge = np.array(shift) - np.array(scale) / 2 + MPP / 2
        last_edge = first_edge + np.array(level.shape) * np.array(scale)
        np.testing.assert_allclose(first_edge, [0.0, 0.0], atol=1e-9)
        slide_um = np.array([SLIDE_H, SLIDE_W]) * MPP
        assert np.all(last_edge >= slide_um - 1e-6), (k, last_edge, slide_um)
        assert np.all(last_edge - slide_um < 2 * np.array(scale)), (k, last_edge, slide_um)


def test_omezarr_tumor_label_matches_the_geojson_polygons(outputs):
    out, _ = outputs
    nodes = {n.metadata.get("name"): n for n in _nodes(out / "heatmap.ome.zarr")}
    label = nodes["tumor_mask"]
    assert any(isinstance(s, Label) for s in label.specs)
    assert label.metadata["color"][1] == pytest.approx([200 / 255, 0, 0, 160 / 255])
    mask = np.asarray(label.data[0]).astype(bool)
    transforms = label.metadata["coordinateTransformations"][0]
    scale_um = transforms[0]["scale"][0]
    shift_um = transforms[1]["translation"]
    # Back to level-0 pixels: cell size and the grid's top-left corner.
    cell_l0 = scale_um / MPP
    origin_l0 = (shift_um[1] / MPP + 0.5 - cell_l0 / 2, shift_um[0] / MPP + 0.5 - cell_l0 / 2)
    from_label = mask_to_polygons(mask, scale=cell_l0, offset=origin_l0)
    from_label = shapely.intersection(from_label, box(0, 0, SLIDE_W, SLIDE_H))
    tumor = validate_qupath_geojson(out / "tumor.geojson")["Tumor"]
    assert shapely.symmetric_difference(from_label, tumor).area < 1e-6
    assert shapely.symmetric_difference(tumor, TUMOR_L0).area < 1e-6  # and both are the planted tumor
    # Coarser label levels keep every tumor cell (2x2 "any" pooling).
    coarse = np.asarray(label.data[1]).astype(bool)
    assert np.array_equal(coarse, downsample_any(mask).astype(bool))


def test_ometiff_mask_is_pyramidal_with_physical_size_and_aligned(outputs):
    out, summary = outputs
    path = out / summary["exports"]["tumor_mask_ome_tiff"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        levels = [lvl.asarray() for lvl in series.levels]
        pixels = tif.ome_metadata
    assert len(levels) >= 2 and all(b.shape[0] == -(-a.shape[0] // 2) for a, b in zip(levels, levels[1:], strict=False))
    assert 'PhysicalSizeX="2.0"' in pixels and 'PhysicalSizeY="2.0"' in pixels and "µm" in pixels
    ds = 2.0 / MPP  # level-0 px per TIFF pixel
    assert levels[0].shape == (-(-SLIDE_H // ds), -(-SLIDE_W // ds))  # covers the slide exactly
    # The TIFF's tumor pixels are the planted tumor rectangle (exact: it lies on whole 4-px pixels).
    from_tiff = mask_to_polygons(levels[0] > 0, scale=ds)
    assert shapely.symmetric_difference(from_tiff, TUMOR_L0).area < 1e-6


def test_geojson_round_trip_and_qupath_schema(outputs):
    out, _ = outputs
    data = json.loads((out / "tumor.geojson").read_text())
    assert qupath_schema_problems(data) == []
    regions = validate_qupath_geojson(out / "tumor.geojson", expected={"Tumor": TUMOR_L0})
    assert set(regions) == {"Tumor"} and regions["Tumor"].is_valid


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda d: d.update(type="Feature"), "FeatureCollection"),
        (lambda d: d["features"][0]["properties"].update(objectType="polygon"), "objectType"),
        (lambda d: d["features"][0]["properties"]["classification"].update(color="red"), "color"),
        (lambda d: d["features"][0]["properties"]["classification"].pop("name"), "no name"),
        (lambda d: d["features"][0].update(id="not-a-uuid"), "UUID"),
        (lambda d: d["features"][0]["properties"].update(metadata={"k": 1}), "metadata"),
    ],
)
def test_qupath_schema_check_names_each_problem(outputs, tmp_path, mutate, problem):
    out, _ = outputs
    data = json.loads((out / "tumor.geojson").read_text())
    mutate(data)
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps(data))
    with pytest.raises(ExportError, match=problem) as info:
        validate_qupath_geojson(bad)
    assert info.value.path == bad


def test_geojson_check_catches_polygons_that_differ_and_invalid_geometry(outputs, tmp_path):
    out, _ = outputs
    with pytest.raises(ExportError, match="differ"):
        validate_qupath_geojson(out / "tumor.geojson", expected={"Tumor": box(0, 0, 10, 10)})
    data = json.loads((out / "tumor.geojson").read_text())
    bowtie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]
    data["features"][0]["geometry"] = {"type": "Polygon", "coordinates": [bowtie]}
    bad = tmp_path / "bowtie.geojson"
    bad.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="invalid geometry"):
        validate_qupath_geojson(bad)


def test_exports_follow_the_config_and_a_deleted_export_is_rewritten(tmp_path):
    store_path = build_store(tmp_path / "case.zarr")
    out = tmp_path / "out"
    off = load_config(None, {"export.ome_zarr": False}).export
    summary = stitch_store(store_path, out, CFG, export=off)
    assert not (out / "heatmap.ome.zarr").exists() and "heatmap_ome_zarr" not in summary["exports"]
    assert not (out / "tumor_mask.ome.tif").exists()  # off by default
    stitch_store(store_path, out, CFG)  # defaults: OME-Zarr on -> a new identity, written
    assert (out / "heatmap.ome.zarr" / "zarr.json").is_file()
    import shutil

    shutil.rmtree(out / "heatmap.ome.zarr")
    again = stitch_store(store_path, out, CFG)
    assert (out / "heatmap.ome.zarr" / "zarr.json").is_file() and again["exports"]["heatmap_ome_zarr"]


def test_level_transforms_and_pooling_are_exact():
    scale, shift = level_transforms(2, 100.0, (50.0, 30.0), 0.5)
    assert scale["scale"] == [100.0, 100.0]
    # Centre of the first 200-px block: (30 + 100, 50 + 100) level-0, minus half a slide pixel.
    assert shift["translation"] == [(130 - 0.5) * 0.5, (150 - 0.5) * 0.5]
    heat = np.array([[0.2, np.nan, 1.0], [0.4, np.nan, np.nan]], dtype=np.float32)
    np.testing.assert_allclose(downsample_mean(heat), [[0.3, 1.0]])
    assert np.isnan(downsample_mean(np.full((2, 2), np.nan, dtype=np.float32))).all()
    np.testing.assert_array_equal(downsample_any(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 1]])), [[1, 0], [0, 1]])
