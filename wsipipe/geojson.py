"""QuPath-compatible GeoJSON: region polygons in level-0 pixels, written and read back."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import shapely
from shapely.geometry import MultiPolygon, mapping, shape

from wsipipe.errors import WsipipeError
from wsipipe.files import write_atomic
from wsipipe.geometry import as_multipolygon

# QuPath shows a class in this colour unless the project defines its own.
CLASS_COLOURS = {"Tumor": [200, 0, 0], "Tissue": [0, 150, 0], "Normal": [0, 100, 200]}



def to_geojson(
    regions: Mapping[str, MultiPolygon], properties: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """FeatureCollection that QuPath imports as annotations: one feature per polygon,
    ``objectType: annotation`` and ``classification.name`` = the key of ``regions``.
    Coordinates are level-0 pixels (x, y), as QuPath expects."""
    features = []
    for name, geom in regions.items():
        for poly in as_multipolygon(geom).geoms:
            props = {
                "objectType": "annotation",
                "classification": {"name": name, "color": CLASS_COLOURS.get(name, [255, 200, 0])},
                "area_px": float(poly.area),
            }
            props.update(properties or {})
            features.append(
                {"type": "Feature", "id": str(uuid.uuid4()), "geometry": mapping(poly), "properties": props}
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: str | Path, regions: Mapping[str, MultiPolygon], properties: Mapping[str, Any] | None = None
) -> Path:
    return write_atomic(path, json.dumps(to_geojson(regions, properties)))


def read_geojson(path: str | Path) -> dict[str, MultiPolygon]:
    """Polygons by classification name. Invalid geometries are repaired (``make_valid``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WsipipeError(path, "GeoJSON file not found") from None
    except json.JSONDecodeError as exc:
        raise WsipipeError(path, f"not valid JSON: {exc}") from None
    features = data.get("features", []) if isinstance(data, dict) else data
    out: dict[str, list] = {}
    for i, feat in enumerate(features):
        try:
            geom = shapely.make_valid(shape(feat["geometry"]))
        except Exception as exc:
            raise WsipipeError(path, f"feature {i}: invalid geometry: {exc}") from None
        cls = (feat.get("properties") or {}).get("classification") or {}
        name = cls.get("name", "Unclassified") if isinstance(cls, dict) else str(cls)
        out.setdefault(name, []).extend(as_multipolygon(geom).geoms)
    return {name: MultiPolygon(polys) for name, polys in out.items()}
