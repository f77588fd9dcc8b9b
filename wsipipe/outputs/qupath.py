"""QuPath-compatible GeoJSON: a schema check and a geometry round trip through shapely.

QuPath (0.3+) imports a FeatureCollection whose features carry ``properties.objectType``
("annotation", "detection", ...) and optionally ``classification`` = ``{"name": str,
"color": [r, g, b]}``, ``name`` and ``metadata`` (string keys and values); a feature's
``id`` is a UUID. Coordinates are level-0 pixels. This module checks exactly that, so a
file that passes here is one QuPath reads as annotations of the right classes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import shapely
from shapely.geometry import MultiPolygon, shape

from wsipipe.errors import ExportError
from wsipipe.geometry import as_multipolygon

OBJECT_TYPES = {"annotation", "detection", "tile", "cell", "tma_core"}
GEOMETRY_TYPES = {"Polygon", "MultiPolygon", "LineString", "MultiLineString", "Point", "MultiPoint"}


def qupath_schema_problems(data: Any) -> list[str]:
    """Every way ``data`` (parsed JSON) departs from what QuPath imports; [] when none."""
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        return ["top level is not a GeoJSON FeatureCollection"]
    features = data.get("features")
    if not isinstance(features, list):
        return ["'features' is not a list"]
    problems = []
    for i, feat in enumerate(features):
        problems += [f"feature {i}: {p}" for p in _feature_problems(feat)]
    return problems


def _feature_problems(feat: Any) -> list[str]:
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        return ["not a GeoJSON Feature"]
    problems = []
    if "id" in feat:
        try:
            uuid.UUID(str(feat["id"]))
        except ValueError:
            problems.append(f"id {feat['id']!r} is not a UUID")
    geom = feat.get("geometry")
    if not isinstance(geom, dict) or geom.get("type") not in GEOMETRY_TYPES:
        problems.append(f"geometry type {geom.get('type') if isinstance(geom, dict) else geom!r} not supported")
    props = feat.get("properties")
    if not isinstance(props, dict):
        return problems + ["no properties"]
    if props.get("objectType") not in OBJECT_TYPES:
        problems.append(f"objectType {props.get('objectType')!r} is not one of {sorted(OBJECT_TYPES)}")
    cls = props.get("classification")
    if cls is not None:
        colour = cls.get("color") if isinstance(cls, dict) else None
        if not isinstance(cls, dict) or not isinstance(cls.get("name"), str) or not cls["name"]:
            problems.append("classification has no name")
        elif not (
            isinstance(colour, list) and len(colour) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)
        ):
            problems.append(f"classification color {colour!r} is not [r, g, b] integers 0-255")
    meta = props.get("metadata")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        problems.append("metadata must map strings to strings")
    return problems


def validate_qupath_geojson(
    path: str | Path, expected: Mapping[str, MultiPolygon] | None = None, tolerance_px2: float = 1e-6
) -> dict[str, MultiPolygon]:
    """Check a written GeoJSON file: QuPath schema, valid shapely geometries, and (when
    ``expected`` is given) the same region per class as the polygons it was written from.

    Returns the polygons by class name; raises :class:`ExportError` naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(path, f"cannot read GeoJSON: {exc}") from None
    problems = qupath_schema_problems(data)
    if problems:
        raise ExportError(path, "not QuPath-compatible GeoJSON: " + "; ".join(problems[:5]))
    regions: dict[str, list] = {}
    for i, feat in enumerate(data["features"]):
        geom = shape(feat["geometry"])
        if not geom.is_valid:
            raise ExportError(path, f"feature {i}: invalid geometry ({shapely.is_valid_reason(geom)})")
        name = (feat["properties"].get("classification") or {}).get("name", "Unclassified")
        regions.setdefault(name, []).extend(as_multipolygon(geom).geoms)
    found = {name: as_multipolygon(shapely.union_all(polys)) for name, polys in regions.items()}
    for name, want in (expected or {}).items():
        got = found.get(name, MultiPolygon())
        diff = shapely.symmetric_difference(got, as_multipolygon(want)).area
        if diff > tolerance_px2 * max(1.0, want.area):
            raise ExportError(path, f"class {name!r}: polygons differ from those written by {diff:.3g} px²")
    return found
