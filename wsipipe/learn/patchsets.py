"""Labelled patch sets: tiled slides + annotation polygons, or a folder per class.

Both land in the tiled-slide Zarr layout (``patches``, ``coords``) plus::

    labels   (N,) int8    class index, -1 = unlabelled (kept, marked, never trained on)
    groups   (N,) int32   index into attrs["wsipipe"]["labels"]["groups"]: the source slide / folder group

    attrs["wsipipe"]["labels"] = {"classes": [...], "groups": [...], "source": ..., "min_overlap": ...}

Splits are drawn over groups, never over patches, so patches of one slide (or of one
source group of a folder set) never land in two splits; with fewer slides than splits they
are drawn over blocks of each slide's patch grid, with a one-patch gap between splits
(:func:`split_patch_set`).

    read_annotations("slide.geojson")                  # validated polygons by class
    label_store("slide.zarr", "slide.geojson")         # labels into the slide's store
    folder_patch_set("kather/", "kather.zarr")         # one sub-folder per class
    ps = load_patch_sets(["a.zarr", "b.zarr"])         # one in-memory labelled set
    splits = split_by_group(ps.groups, (0.6, 0.2, 0.2), seed=0)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr
from shapely.geometry import MultiPolygon, shape

from wsipipe.tiles import store
from wsipipe.errors import AnnotationError, ParameterError, StoreError
from wsipipe.geometry import as_multipolygon

BACKGROUND = "Normal"  # the class of patches clear of every annotation polygon
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}
SPLITS = ("train", "val", "test")


def read_annotations(path: str | Path, repair: bool = True) -> dict[str, MultiPolygon]:
    """Polygons by classification name from a QuPath-exported GeoJSON, validated.

    Invalid polygons (self-intersections, bow ties) are repaired with ``make_valid`` when
    ``repair``, else rejected; either way a feature that is not polygonal or is empty after
    repair is an :class:`AnnotationError` naming its index."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AnnotationError(path, "GeoJSON file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"not valid JSON: {exc}") from None
    features = data.get("features") if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise AnnotationError(path, "no 'features' list (expected a GeoJSON FeatureCollection)")
    out: dict[str, list] = {}
    for i, feat in enumerate(features):
        try:
            geom = shape(feat["geometry"])
        except Exception as exc:
            raise AnnotationError(path, f"feature {i}: unreadable geometry: {exc}") from None
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue  # points, lines (QuPath detections, rulers) carry no area to label with
        if not geom.is_valid:
            if not repair:
                raise AnnotationError(path, f"feature {i}: invalid polygon ({shapely.is_valid_reason(geom)})")
            geom = shapely.make_valid(geom)
        polys = as_multipolygon(geom)
        if polys.is_empty or polys.area <= 0:
            raise AnnotationError(path, f"feature {i}: polygon has no area (after repair)")
        cls = (feat.get("properties") or {}).get("classification") or {}
        name = cls.get("name", "Unclassified") if isinstance(cls, dict) else str(cls)
        out.setdefault(name, []).extend(polys.geoms)
    return {name: as_multipolygon(shapely.union_all(polys)) for name, polys in out.items()}


def painted_coverage(coords: np.ndarray, patch_size_l0: float, regions: dict[str, MultiPolygon]) -> np.ndarray:
    """(N, len(regions)) fraction of each level-0 patch square covered by each class, where
    polygons of several classes overlap the smallest polygon covering a point taking it: a
    ``Tumor`` polygon inside a ``Tissue`` outline keeps its area, the outline the rest.
    Polygons are the connected parts of each class's region; on equal areas the class listed
    first wins. Rows sum to at most 1.

    Only the polygons touching a patch are clipped to it, so a large outline with many
    polygons inside costs what the patches on their borders cost."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    out = np.zeros((len(coords), len(regions)))
    parts = sorted(((float(poly.area), k, poly) for k, name in enumerate(regions) for poly in regions[name].geoms),
                   key=lambda t: (t[0], t[1]))
    if not parts or not len(coords):
        return out
    polys = np.array([poly for _, _, poly in parts], dtype=object)
    cls = np.array([k for _, k, _ in parts])
    shapely.prepare(polys)
    x, y = coords[:, 0], coords[:, 1]
    squares = shapely.box(x, y, x + patch_size_l0, y + patch_size_l0)
    sq, rank = shapely.STRtree(polys).query(squares, predicate="intersects")
    order = np.lexsort((rank, sq))  # by patch, then smallest polygon first
    sq, rank = sq[order], rank[order]
    inside = shapely.contains_properly(polys[rank], squares[sq])
    clips = squares[sq]  # a patch inside a polygon is its own clip
    border = np.flatnonzero(~inside)
    clips[border] = shapely.intersection(squares[sq[border]], polys[rank[border]])
    area = shapely.area(clips) / float(patch_size_l0) ** 2
    first = np.r_[True, sq[1:] != sq[:-1]]
    alone = first & np.r_[first[1:], True]  # the only polygon touching its patch
    np.add.at(out, (sq[alone], cls[rank[alone]]), area[alone])
    starts = np.flatnonzero(first & ~alone)
    for a in starts:  # patches several polygons touch: paint them, smallest first
        b = a + 1
        while b < len(sq) and sq[b] == sq[a]:
            b += 1
        taken = clips[a]
        out[sq[a], cls[rank[a]]] += area[a]
        for i in range(a + 1, b):
            piece = shapely.area(shapely.difference(clips[i], taken)) / float(patch_size_l0) ** 2
            out[sq[a], cls[rank[i]]] += piece
            taken = shapely.union(taken, clips[i])
    return out


def label_by_regions(
    coords: np.ndarray, patch_size_l0: float, regions: dict[str, MultiPolygon], classes: list[str],
    min_overlap: float = 0.5, max_normal_overlap: float = 0.1, background: str | None = BACKGROUND,
) -> np.ndarray:
    """int8 class index per patch: the class whose region covers >= ``min_overlap`` of it (the
    most, if several; the first listed on a tie); ``background`` when at most
    ``max_normal_overlap`` of it lies in any region; else -1 (unlabelled).

    Coverage is :func:`painted_coverage`: where classes overlap (a
    ``Tumor`` polygon inside a ``Tissue`` outline), the smallest polygon wins. ``classes``
    fixes the index order; the background class, when listed, takes no polygons of its own:
    it is what lies clear of the others (when not listed, those patches stay unlabelled)."""
    if not 0.0 <= max_normal_overlap < min_overlap <= 1.0:
        raise ParameterError(None, f"need 0 <= max_normal_overlap ({max_normal_overlap}) < min_overlap ({min_overlap}) <= 1")
    named = [c for c in classes if c != background]
    n = len(np.asarray(coords).reshape(-1, 2))
    overlaps = np.zeros((n, max(len(named), 1)))
    overlaps[:, : len(named)] = painted_coverage(coords, patch_size_l0, {name: regions.get(name, MultiPolygon()) for name in named})
    labels = np.full(n, -1, dtype=np.int8)
    if background is not None and background in classes:
        labels[overlaps.sum(axis=1) <= max_normal_overlap] = classes.index(background)
    best = overlaps.argmax(axis=1)
    hit = overlaps[np.arange(n), best] >= min_overlap
    labels[hit] = np.array([classes.index(named[b]) for b in best[hit]], dtype=np.int8) if hit.any() else []
    return labels


def parse_classes(classes: Sequence[str]) -> dict[str, list[str]]:
    """``["Normal=Tissue", "Tumor=Tumor+Metastasis", "Stroma"]`` -> each class (in index order)
    with the annotation classes whose polygons it takes (by default, its own name)."""
    out: dict[str, list[str]] = {}
    taken: dict[str, str] = {}
    for item in classes:
        name, eq, src = (x.strip() for x in item.partition("="))
        sources = [s.strip() for s in src.split("+")] if eq else [name]
        if not name or not all(sources):
            raise ParameterError(None, f"classes: {item!r} is not NAME or NAME=ANNOTATION[+ANNOTATION...]")
        if name in out:
            raise ParameterError(None, f"classes: {name!r} is listed twice")
        for s in sources:
            if s in taken and taken[s] != name:
                raise ParameterError(None, f"classes: annotation class {s!r} is mapped to both {taken[s]!r} and {name!r}")
            taken[s] = name
        out[name] = sources
    if not out:
        raise ParameterError(None, "classes: no class given")
    return out


def label_store(
    store_path: str | Path, geojson_path: str | Path, classes: list[str] | None = None,
    min_overlap: float = 0.5, max_normal_overlap: float = 0.1, background: str | None = BACKGROUND,
) -> np.ndarray:
    """Write ``labels`` and ``groups`` into a tiled slide's store from its annotations.

    ``classes`` default: background first, then the annotation classes sorted (so a
    Tumor-only GeoJSON gives ["Normal", "Tumor"] = 0/1, the binary classifier's labels).
    An entry ``NAME=A+B`` gives class NAME the polygons of annotation classes A and B (see
    :func:`parse_classes`). Where polygons overlap the smallest wins (:func:`painted_coverage`).

    Warnings (annotation classes no class takes, classes left without patches) go into
    ``attrs.wsipipe.labels.warnings``. A GeoJSON without polygons, or without polygons of any
    requested class other than the background, is an :class:`AnnotationError`."""
    regions = read_annotations(geojson_path)
    if not regions and classes is None:
        raise AnnotationError(geojson_path, "no polygon annotations (no Polygon or MultiPolygon features) to label with")
    if classes is None:
        classes = ([background] if background else []) + sorted(c for c in regions if c != background)
    sources = parse_classes(classes)
    classes = list(sources)
    named = [c for c in classes if c != background]
    if named and not regions:
        raise AnnotationError(geojson_path, "no polygon annotations (no Polygon or MultiPolygon features) to label with")
    found = sorted(regions)
    if named and not any(s in regions for c in named for s in sources[c]):
        raise AnnotationError(geojson_path, f"no polygons of the classes {named} (the file has {found}); "
                              "name the annotation classes with --classes, e.g. --classes Normal,Tumor=Carcinoma")
    class_regions = {c: as_multipolygon(shapely.union_all([regions[s] for s in sources[c] if s in regions])) for c in named}
    from wsipipe.tiles.tiling import stored_patches

    group = store.open_store(store_path, "r+")
    store.require_complete(group, store.STAGE_TILE, store_path)
    stored_patches(group, store_path)  # labels are for training, which needs the patches stored
    info = store.meta(group)
    if not (info.get(store.META_TILE) or {}).get("patch_size_l0"):
        raise StoreError(store_path, "no slide positions (a folder patch set?): annotations label the patches of a "
                         "slide tiled with `wsipipe tile`")
    coords = np.asarray(store.array(group, store.COORDS)[:])
    labels = label_by_regions(coords, info[store.META_TILE]["patch_size_l0"], class_regions, classes,
                              min_overlap, max_normal_overlap, background)
    warnings = []
    ignored = [name for name in found if not any(name in s for s in sources.values())]
    if ignored:
        warnings.append(f"annotation classes not in the classes {classes}, ignored: {', '.join(ignored)} "
                        f"(map one onto a class with NAME=ANNOTATION, e.g. {classes[-1]}={ignored[0]})")
    counts = np.bincount(labels[labels >= 0], minlength=len(classes))
    widest = max(named, key=lambda c: counts[classes.index(c)], default=None)
    for k, name in enumerate(classes):
        if counts[k] > 0:
            continue
        if name not in named:
            why = f"no patch is clear of the other classes' polygons (<= {max_normal_overlap} covered)"
            if widest is not None and len(named) > 1:
                rest = ",".join(c if sources[c] == [c] else f"{c}={'+'.join(sources[c])}" for c in named if c != widest)
                why += f"; if {widest} outlines all the tissue, map it onto {name}: --classes {name}={widest},{rest}"
        elif class_regions[name].is_empty:
            why = "no polygons of " + "+".join(sources[name]) + " in the GeoJSON"
        else:
            why = f"its polygons cover no patch by >= {min_overlap}"
        warnings.append(f"class {name!r} has no patches: {why}")
    slide_id = (info.get(store.META_SLIDE) or {}).get("identity") or str(store_path)
    _write_labels(group, labels, np.zeros(len(labels), np.int32), {
        "classes": classes, "groups": [slide_id], "source": str(geojson_path),
        "min_overlap": min_overlap, "max_normal_overlap": max_normal_overlap,
        "mapping": {c: s for c, s in sources.items() if s != [c]}, "warnings": warnings,
    })
    return labels


def _write_labels(group: zarr.Group, labels: np.ndarray, groups: np.ndarray, info: dict[str, Any]) -> None:
    chunk = max(len(labels), 1)
    group.create_array(store.LABELS, data=labels.astype(np.int8), chunks=(chunk,), overwrite=True)
    group.create_array(store.GROUPS, data=groups.astype(np.int32), chunks=(chunk,), overwrite=True)
    store.update_meta(group, labels=info)


def _load_rgb(f: Path, size: int | None) -> np.ndarray:
    """An image file as (size, size, 3) uint8 RGB: alpha composited on white, resized (Lanczos)
    when ``size`` is given and differs."""
    from PIL import Image

    try:
        with Image.open(f) as src:
            src.load()
            im: Image.Image = src
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise AnnotationError(f, f"not a readable image: {exc}") from None


def folder_patch_set(
    folder: str | Path, out: str | Path, patch_size: int | None = None, group_regex: str | None = None,
    chunk_patches: int = 64,
) -> dict:
    """A Zarr patch set from ``folder/<class>/*.{png,tif,jpg,...}`` (Kather-style).

    Classes are the sub-folder names, sorted. Images are read as RGB (alpha composited on
    white, greyscale expanded) and resized (Lanczos) to ``patch_size`` (default: the first
    image's size) when they differ. Source groups come from ``group_regex`` (its first
    capture group, matched on the file stem, e.g. a patient or slide id); without it every
    file is its own group. Nested folders below a class count as groups of their own."""
    folder, out = Path(folder), Path(out)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
    if not class_dirs:
        raise AnnotationError(folder, "no class sub-folders (expected one folder of images per class)")
    pattern = re.compile(group_regex) if group_regex else None
    files, labels, group_names = [], [], []
    for k, d in enumerate(class_dirs):
        for f in sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            files.append(f)
            labels.append(k)
            match = pattern.search(f.stem) if pattern else None
            if pattern and not match:
                raise AnnotationError(f, f"file name does not match group_regex {group_regex!r}")
            sub = f.parent.relative_to(d)
            group_names.append(match.group(1) if match and match.groups() else match.group(0) if match
                               else str(sub / f.stem) if str(sub) != "." else f"{d.name}/{f.stem}")
    if not files:
        raise AnnotationError(folder, f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")

    first = _load_rgb(files[0], patch_size)
    size = patch_size or first.shape[0]
    first = _load_rgb(files[0], size) if first.shape[:2] != (size, size) else first
    uniq = sorted(set(group_names))
    group_ids = np.searchsorted(uniq, group_names).astype(np.int32)
    g = store.open_store(out, "w")
    patches = g.create_array(store.PATCHES, shape=(len(files), size, size, 3), chunks=(chunk_patches, size, size, 3),
                             dtype="uint8")
    for start in range(0, len(files), chunk_patches):
        block = [first if i == 0 else _load_rgb(files[i], size) for i in range(start, min(start + chunk_patches, len(files)))]
        patches[start : start + len(block)] = np.stack(block)
    g.create_array(store.COORDS, data=np.zeros((len(files), 2), np.int64), chunks=(max(len(files), 1), 2))
    _write_labels(g, np.asarray(labels, np.int8), group_ids, {
        "classes": [d.name for d in class_dirs], "groups": uniq, "source": str(folder),
        "files": [str(f.relative_to(folder)) for f in files],
    })
    store.update_meta(g, tile={"patch_size": size}, slide=None)
    store.set_stage(g, store.STAGE_TILE, {"folder": str(folder), "n": len(files)}, True)
    return {"n_patches": len(files), "classes": [d.name for d in class_dirs], "n_groups": len(uniq)}


@dataclass
class PatchSet:
    """A labelled set in memory: patches of several stores with one class list."""

    patches: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    groups: np.ndarray  # (N,) str: source slide identity / folder group, prefixed by the store
    classes: list[str]
    identity: str  # hash of the stores' slide identities, label sources and counts
    coords: np.ndarray | None = None  # (N, 2) level-0 x, y of each patch (zeros for folder sets)
    pitch: np.ndarray | None = None  # (N,) level-0 grid step of each patch's store (0 for folder sets)

    def subset(self, idx: np.ndarray) -> PatchSet:
        return PatchSet(self.patches[idx], self.labels[idx], self.groups[idx], self.classes, self.identity,
                        None if self.coords is None else self.coords[idx], None if self.pitch is None else self.pitch[idx])


def load_patch_sets(
    paths: Sequence[str | Path], labelled_only: bool = True, read_rows: Callable[[zarr.Group, Any], Any] | None = None,
) -> PatchSet:
    """Concatenate labelled stores (same classes, same patch size) into one :class:`PatchSet`.

    ``read_rows(group, path)``: what each labelled row holds, one row per patch (default the stored
    patches; :func:`wsipipe.learn.features_head.load_feature_set` reads their features instead), so
    every kind of row gets the same labels, groups, positions and data identity."""
    from wsipipe.tiles.tiling import stored_patches

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    where: list[tuple[np.ndarray, np.ndarray]] = []  # coords and grid pitch of the kept patches
    classes: list[str] | None = None
    ident = hashlib.sha256()
    for p in paths:
        g = store.open_store(p)
        rows: Any = (read_rows or stored_patches)(g, p)  # first: a store without patches cannot be labelled either
        info = store.meta(g).get(store.META_LABELS)
        if info is None or store.LABELS not in g:
            raise AnnotationError(p, "store has no labels; run `wsipipe patches` on it first")
        if classes is None:
            classes = list(info["classes"])
        elif list(info["classes"]) != classes:
            raise AnnotationError(p, f"classes {info['classes']} differ from the first store's {classes}")
        labels = np.asarray(store.array(g, store.LABELS)[:]).astype(np.int64)
        if read_rows is not None and len(rows) != len(labels):
            raise AnnotationError(p, f"{len(labels)} labels but {len(rows)} rows: relabel the store after re-tiling")
        keep = np.flatnonzero(labels >= 0) if labelled_only else np.arange(len(labels))
        names = np.asarray(info["groups"], dtype=object)[np.asarray(store.array(g, store.GROUPS)[:])[keep]]
        parts.append((_patches_at(rows, keep) if isinstance(rows, zarr.Array) else np.asarray(rows)[keep], labels[keep], names))
        tile = store.meta(g).get(store.META_TILE) or {}
        step = float(tile.get("stride_l0") or tile.get("patch_size_l0") or 0.0)
        coords = np.asarray(store.array(g, store.COORDS)[:]).reshape(-1, 2)[keep] if store.COORDS in g else \
            np.zeros((len(keep), 2), np.int64)
        where.append((coords.astype(np.int64), np.full(len(keep), step)))
        ident.update(json.dumps([info["groups"], info.get("source"), int(len(labels))]).encode())
    if not parts:
        raise AnnotationError(None, "no patch sets given")
    shapes = {x.shape[1:] for x, _, _ in parts}
    if len(shapes) > 1:
        raise AnnotationError(paths[0], f"patch sets have different patch shapes {sorted(shapes)}")
    return PatchSet(np.concatenate([x for x, _, _ in parts]), np.concatenate([y for _, y, _ in parts]),
                    np.concatenate([g for _, _, g in parts]).astype(str), classes or [], ident.hexdigest()[:16],
                    np.concatenate([c for c, _ in where]), np.concatenate([p for _, p in where]))


def _patches_at(patches: zarr.Array, idx: np.ndarray) -> np.ndarray:
    """The patches ``idx`` (increasing) of a store, as one array ((0, H, W, 3) for none)."""
    if not len(idx):
        return np.zeros((0, *patches.shape[1:]), np.uint8)
    return np.asarray(patches.get_orthogonal_selection((idx,)))


def split_by_group(groups: np.ndarray, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> dict[str, np.ndarray]:
    """Patch indices of train / val / test, assigning whole groups (slides) to one split.

    Groups are shuffled with ``seed`` and dealt out by ``fractions`` of the group count; a
    split with a non-zero fraction gets at least one group when there are enough groups."""
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ParameterError(None, f"train/val/test split fractions must be three non-negative numbers, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    counts = np.floor(fr / fr.sum() * len(uniq)).astype(int)
    for k in np.argsort(-fr):  # leftovers and empty-but-wanted splits, largest fraction first
        if counts.sum() < len(uniq) and (counts[k] == 0 and fr[k] > 0):
            counts[k] += 1
    counts[int(np.argmax(fr))] += len(uniq) - counts.sum()
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out = {}
    for k, name in enumerate(SPLITS):
        chosen = uniq[order[bounds[k] : bounds[k + 1]]]
        out[name] = np.flatnonzero(np.isin(groups, chosen))
    return out


SPLIT_MODES = ("auto", "slide", "spatial")
SPATIAL_BLOCKS = (8, 6, 5, 4, 3, 2)  # block edges (patches) tried, largest first: fewer borders, less leakage
SPATIAL_MIN_PER_CLASS = 2  # patches of each class every split with a non-zero fraction must keep


@dataclass
class Split:
    """Patch indices of train / val / test and how they were drawn (recorded in the model card)."""

    indices: dict[str, np.ndarray]
    by: str  # "slide" or "spatial"
    block_patches: int | None = None  # spatial: edge of the square blocks, in patches
    gap_patches: int = 0  # spatial: patches dropped between blocks of different splits, at least this wide
    dropped: int = 0  # spatial: labelled patches in the gaps (in no split)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"by": self.by}
        if self.by == "spatial":
            out.update(block_patches=self.block_patches, gap_patches=self.gap_patches, dropped_patches=self.dropped,
                       note="train, val and test are regions of the same slide(s): held-out metrics are optimistic; "
                            "measure on other slides before trusting them")
        return out


def _data_error(problem: str):
    from wsipipe.errors import TrainingDataError

    return TrainingDataError(None, problem)


def _class_counts(labels: np.ndarray, classes: Sequence[str]) -> str:
    return ", ".join(f"{name} {int(np.count_nonzero(labels == k))}" for k, name in enumerate(classes))


def split_patch_set(data: PatchSet, fractions=(0.6, 0.2, 0.2), by: str = "auto", seed: int = 0) -> Split:
    """Train / val / test of a labelled set, by slide (source group) or spatially within slides.

    ``by="slide"`` deals whole groups out (:func:`split_by_group`) and needs at least one group per
    split; ``"spatial"`` cuts each slide's patch grid into blocks (:func:`split_spatial`);
    ``"auto"`` splits by slide when there are at least as many groups as non-empty splits,
    else spatially. A split that cannot be drawn is a :class:`TrainingDataError` naming the
    groups or the class counts."""
    if by not in SPLIT_MODES:
        raise ParameterError(None, f"split_by must be one of {', '.join(SPLIT_MODES)}, got {by!r}")
    fr = _fractions(fractions)
    n_groups = len(np.unique(data.groups))
    wanted = int(np.count_nonzero(fr > 0))
    if by == "slide" or (by == "auto" and n_groups >= wanted):
        indices = split_by_group(data.groups, fr, seed)
        for k, name in enumerate(SPLITS):
            if fr[k] > 0 and len(indices[name]) == 0:
                raise _data_error(f"split {name!r} is empty: {n_groups} source group(s) cannot fill train/val/test "
                                  f"{tuple(fractions)} by slide; add slides, or split within slides (--split-by spatial)")
        return Split(indices, "slide")
    if data.coords is None or data.pitch is None or not (data.pitch > 0).all():
        raise _data_error(f"{n_groups} source group(s) cannot fill train/val/test {tuple(fractions)} by group, and a "
                          "folder patch set has no patch positions to split within; add groups")
    return split_spatial(data.groups, data.coords, data.pitch, data.labels, fr, seed, data.classes)


def _fractions(fractions) -> np.ndarray:
    fr = np.asarray(fractions, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise ParameterError(None, f"train/val/test split fractions must be three non-negative numbers, got {fractions}")
    return fr / fr.sum()


def split_spatial(
    groups: np.ndarray, coords: np.ndarray, pitch: np.ndarray, labels: np.ndarray, fractions=(0.6, 0.2, 0.2),
    seed: int = 0, classes: Sequence[str] | None = None,
) -> Split:
    """Train / val / test as contiguous blocks of each slide's patch grid, stratified by class.

    Each slide's grid (level-0 ``coords`` over its ``pitch``) is cut into square blocks of
    ``b`` x ``b`` patches; blocks go to splits greedily (those holding most of a class first)
    so that every split gets its fraction of every class. A patch next to (within one pitch
    of, diagonals included) a patch of a split later in test > val > train is dropped, so
    patches of different splits are never neighbours: at least one patch lies between them.
    The largest ``b`` of :data:`SPATIAL_BLOCKS` that leaves every split with a non-zero fraction
    at least :data:`SPATIAL_MIN_PER_CLASS` patches of each class wins; none does = a
    :class:`TrainingDataError` with the class counts. Deterministic for a ``seed``."""
    fr = _fractions(fractions)
    groups, labels = np.asarray(groups), np.asarray(labels)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    pitch = np.asarray(pitch, dtype=np.float64)
    present = np.unique(labels[labels >= 0])
    names = list(classes) if classes is not None else [str(k) for k in range(int(present.max(initial=0)) + 1)]
    wanted = np.flatnonzero(fr > 0)
    if len(present) < 2 or any(np.count_nonzero(labels == k) < SPATIAL_MIN_PER_CLASS * len(wanted) for k in present):
        raise _data_error(f"too few labelled patches to split one slide into train/val/test with every class in each "
                          f"(class counts: {_class_counts(labels, names)}; need at least {SPATIAL_MIN_PER_CLASS * len(wanted)} "
                          "of each of two classes or more); annotate more regions or add slides")
    # grid cell of each patch, per group: (group, column, row)
    _, gid = np.unique(groups, return_inverse=True)
    cell = np.zeros((len(labels), 2), np.int64)
    for g in np.unique(gid):
        sel = gid == g
        cell[sel] = np.rint((coords[sel] - coords[sel].min(axis=0)) / pitch[sel][:, None]).astype(np.int64)
    rng = np.random.default_rng(seed)
    tie = rng.random(len(labels) + 1)  # one draw per seed, reused by every block size
    for b in SPATIAL_BLOCKS:
        indices, dropped = _spatial_at(gid, cell, labels, fr, b, tie)
        kept = [np.count_nonzero(labels[indices[SPLITS[s]]] == k) for s in wanted for k in present]
        if min(kept) >= SPATIAL_MIN_PER_CLASS:
            return Split(indices, "spatial", block_patches=b, gap_patches=1, dropped=dropped)
    raise _data_error(f"cannot split the slide(s) spatially into train/val/test with every class in each: the "
                      f"classes are too concentrated (class counts: {_class_counts(labels, names)}); annotate more "
                      "regions of the rarer class or add slides")


def _spatial_at(gid: np.ndarray, cell: np.ndarray, labels: np.ndarray, fr: np.ndarray, b: int,
                tie: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """One spatial split with ``b`` x ``b`` blocks: (indices per split, patches dropped in gaps)."""
    block = np.column_stack([gid, cell // b])
    ublocks, of_patch = np.unique(block, axis=0, return_inverse=True)
    of_patch = of_patch.reshape(-1)
    n_classes = int(labels.max()) + 1
    counts = np.zeros((len(ublocks), n_classes))
    lab = labels >= 0
    np.add.at(counts, (of_patch[lab], labels[lab]), 1)
    totals = np.maximum(counts.sum(axis=0), 1)
    share = counts / totals  # each block's share of each class
    target = fr[:, None] * share.sum(axis=0)[None, :]  # (split, class) shares to reach
    got = np.zeros_like(target)
    order = np.lexsort((tie[: len(ublocks)], -share.max(axis=1)))  # big shares first, seeded ties
    split_of_block = np.zeros(len(ublocks), np.int64)
    for j in order:
        cost = [((got + np.where(np.arange(3)[:, None] == s, share[j], 0) - target) ** 2).sum() if fr[s] > 0 else np.inf
                for s in range(3)]
        s = int(np.argmin(cost))
        split_of_block[j] = s
        got[s] += share[j]
    split = split_of_block[of_patch]
    # drop a patch with a neighbour (8-connected) of a split later in test > val > train
    where = {(int(g), int(x), int(y)): int(s) for g, (x, y), s in zip(gid, cell, split, strict=True)}
    keep = np.ones(len(labels), bool)
    for i, (g, (x, y), s) in enumerate(zip(gid, cell, split, strict=True)):
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                if where.get((int(g), int(x) + dx, int(y) + dy), -1) > s:
                    keep[i] = False
    indices = {name: np.flatnonzero((split == k) & keep) for k, name in enumerate(SPLITS)}
    return indices, int(np.count_nonzero(~keep & lab))


def split_identity(groups: np.ndarray, split: np.ndarray, coords: np.ndarray | None = None) -> str:
    """Identity of a split = hash of its sorted group names and size (compare test sets by it);
    with ``coords`` (a spatial split: regions of slides, not whole slides) also of the patches' positions."""
    names = sorted(set(np.asarray(groups)[split].tolist()))
    key: list[Any] = [names, int(len(split))]
    if coords is not None:
        where = sorted(zip(np.asarray(groups)[split].tolist(), np.asarray(coords)[split].reshape(-1, 2).tolist(), strict=True))
        key.append(hashlib.sha256(json.dumps(where).encode()).hexdigest())
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
