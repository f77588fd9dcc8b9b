"""Generated slides: real files that OpenSlide opens, with consistent ground truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openslide
import pytest

from wsipipe.export import read_geojson
from wsipipe.synth import make_layout, write_synthetic_slide


@pytest.mark.parametrize("fmt,vendor", [("svs", "aperio"), ("tiff", "generic-tiff")])
def test_opens_in_openslide_with_pyramid_and_mpp(tmp_path, fmt, vendor):
    s = write_synthetic_slide(tmp_path / f"s.{fmt}", 5000, 4100, mpp=0.25, seed=3, fmt=fmt)
    with openslide.OpenSlide(str(s.path)) as o:
        assert o.properties["openslide.vendor"] == vendor
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-6)
        assert o.dimensions == (5000, 4100)
        assert o.level_count == 2 and o.level_downsamples[1] == pytest.approx(4.0, rel=1e-3)


def test_pixels_follow_the_ground_truth(tmp_path):
    s = write_synthetic_slide(tmp_path / "s.svs", 6000, 4500, mpp=0.5, seed=5, n_tissue=2, n_tumor=1)
    assert not s.tumor.is_empty and s.tissue.contains(s.tumor.buffer(-1))
    normal_only = s.tissue.difference(s.tumor.buffer(300))
    with openslide.OpenSlide(str(s.path)) as o:

        def mean_rgb(geom):
            p = geom.buffer(-150).representative_point()
            return np.asarray(o.read_region((int(p.x) - 64, int(p.y) - 64), 0, (128, 128)))[..., :3].reshape(-1, 3).mean(0)

        glass = np.asarray(o.read_region((5, 5), 0, (64, 64)))[..., :3].astype(float)
        tumor, normal = mean_rgb(s.tumor), mean_rgb(normal_only)
    assert glass.mean() > 225 and glass.std() < 8  # near-white, a little noise
    # Haematoxylin-dense tumor is darker and bluer (lower red) than eosin stroma.
    assert tumor.mean() < normal.mean() - 15 and tumor[0] < normal[0] - 20


def test_ground_truth_geojson_roundtrip_and_layout_rules(tmp_path):
    s = write_synthetic_slide(tmp_path / "g.svs", 4000, 3000, seed=11, n_tissue=3, n_tumor=2)
    regions = read_geojson(s.geojson_path)
    assert regions["Tissue"].symmetric_difference(s.tissue).area < 1e-6 * s.tissue.area
    assert regions["Tumor"].symmetric_difference(s.tumor).area < 1e-6 * max(s.tumor.area, 1)
    minx, miny, maxx, maxy = s.tissue.bounds
    assert minx > 0 and miny > 0 and maxx < 4000 and maxy < 3000
    features = json.loads(s.geojson_path.read_text())["features"]
    assert {f["properties"]["objectType"] for f in features} == {"annotation"}


def test_deterministic_per_seed():
    a = make_layout(8000, 6000, 0.5, seed=4)
    b = make_layout(8000, 6000, 0.5, seed=4)
    c = make_layout(8000, 6000, 0.5, seed=5)
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert not a[0].equals(c[0])
    empty_tissue, empty_tumor = make_layout(8000, 6000, 0.5, seed=4, n_tissue=0)
    assert empty_tissue.is_empty and empty_tumor.is_empty


def _peak_rss_mib(path, size) -> float:
    code = (
        "from wsipipe.synth import write_synthetic_slide;"
        f"write_synthetic_slide({str(path)!r}, {size}, {size}, seed=1);"
        # VmHWM is this process's own peak (ru_maxrss would carry the forking parent's over exec).
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def test_streams_in_bounded_memory(tmp_path):
    """Peak memory does not grow with the slide: 11x the pixels (20000^2 = 1.2 GB of RGB vs
    6000^2), within a few MiB of the same peak, which is the fixed cost of the textures."""
    small = _peak_rss_mib(tmp_path / "small.svs", 6000)
    big = _peak_rss_mib(tmp_path / "big.svs", 20000)
    assert big < small + 64, f"peak RSS {small:.0f} MiB at 6000^2 vs {big:.0f} MiB at 20000^2"
    assert big < 1024
    with openslide.OpenSlide(str(tmp_path / "big.svs")) as o:
        assert o.dimensions == (20000, 20000) and o.level_count == 3
