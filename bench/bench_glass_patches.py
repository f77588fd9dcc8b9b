"""How many kept patches are mostly glass, on real and generated slides: the measurement
behind the default of ``stitch.max_background``.

    python bench/bench_glass_patches.py [--slides DIR]

Tiles (default settings, 224 px at 0.5 µm/px) cmu-1-small-region.svs, the TCGA slide at
``mpp_override`` 0.25 (it records no mpp) and a generated 12 000 x 9 000 slide, then for
every patch the tiler kept (tissue fraction >= tile.min_tissue) compares two measures of
glass:

- ``qc``: the stored QC measure ``background_fraction`` (14 x 14 sampled pixels whose
  darkest channel is >= 235), the one stitching uses;
- ``pixels``: every pixel of the stored patch, by the tissue detector's own rule for
  background: grey level above ``tissue.max_brightness`` and saturation below
  ``tissue.min_saturation``.

(cmu-1-small-region.svs also at 1 µm/px, and with tile.min_tissue 0.1 to show what a looser
tissue rule lets in.) Prints, per slide and measure, how many kept patches exceed 0.5 / 0.7 / 0.9, and the
largest difference between the two measures. Writes bench/results/glass_patches.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import write_results  # noqa: E402
from wsipipe.config import load_config  # noqa: E402
from wsipipe.slides.synth import write_synthetic_slide  # noqa: E402
from wsipipe.slides.tissue import saturation_value  # noqa: E402
from wsipipe.tiles import qc, store  # noqa: E402
from wsipipe.tiles.tiling import tile_slide  # noqa: E402

LIMITS = (0.5, 0.7, 0.9)


def pixel_background(patches: np.ndarray, max_brightness: float, min_saturation: float) -> np.ndarray:
    """Per patch, the fraction of its pixels that are glass by the tissue detector's rule."""
    out = np.empty(len(patches), np.float32)
    for i, patch in enumerate(patches):
        sat, grey = saturation_value(patch)
        out[i] = np.mean((grey > max_brightness * 255) & (sat < min_saturation * 255))
    return out


def measure(slide: Path, store_path: Path, overrides: dict) -> dict:
    cfg = load_config(None, overrides)
    tile_slide(slide, store_path, cfg)
    group = store.open_store(store_path)
    measures = qc.read_measures(group)
    assert measures is not None, f"{store_path}: no QC measures"
    by_qc = measures["background_fraction"]
    by_px = np.concatenate([
        pixel_background(np.asarray(group[store.PATCHES][sl]), cfg.tissue.max_brightness, cfg.tissue.min_saturation)
        for sl in store.chunk_slices(len(by_qc), 256)
    ])
    return {
        "slide": slide.name, "settings": overrides, "kept_patches": len(by_qc),
        "qc_above": {str(t): int((by_qc > t).sum()) for t in LIMITS},
        "pixels_above": {str(t): int((by_px > t).sum()) for t in LIMITS},
        "max_abs_difference": round(float(np.max(np.abs(by_qc - by_px))) if len(by_qc) else 0.0, 3),
        "qc_max": round(float(by_qc.max()), 3) if len(by_qc) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, default=ROOT.parent / "shared" / "data" / "slides")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generated = write_synthetic_slide(work / "generated.svs", 12000, 9000, mpp=0.5, seed=3).path
        for slide, overrides in [
            (args.slides / "cmu-1-small-region.svs", {}),
            (args.slides / "cmu-1-small-region.svs", {"tile.mpp": 1.0}),
            (args.slides / "cmu-1-small-region.svs", {"tile.min_tissue": 0.1}),
            (args.slides / "tcga-cr-7395-01a-01-ts1.svs", {"mpp_override": 0.25}),
            (generated, {}),
        ]:
            rows.append(measure(Path(slide), work / f"{len(rows)}.zarr", overrides))
    head = "| slide | settings | kept patches | " + " | ".join(
        f"{m} > {t}" for m in ("qc", "pixels") for t in LIMITS) + " | largest qc − pixels difference |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "defaults"
        cells = [str(r[f"{m}_above"][str(t)]) for m in ("qc", "pixels") for t in LIMITS]
        print(f"| {r['slide']} | {settings} | {r['kept_patches']} | " + " | ".join(cells) + f" | {r['max_abs_difference']} |")
    print("results:", write_results("glass_patches", {"rows": rows}))


if __name__ == "__main__":
    main()
