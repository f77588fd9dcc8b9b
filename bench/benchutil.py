"""What the bench scripts share: the real-H&E mosaic slide they run on and where results go."""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"


def mosaic_slide(work: Path, size: int) -> Path:
    """A size x size mosaic of real H&E tiles at 0.5 µm/px in ``work`` (made once, then reused)."""
    from wsipipe.slides.mosaic import write_mosaic_slide

    slide = work / f"mosaic-{size}.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        write_mosaic_slide(slide, size, size, SOURCE, mpp=0.5, seed=7)
        print(f"generated {slide} in {time.perf_counter() - t0:.1f} s", flush=True)
    return slide


def write_results(name: str, results: dict) -> Path:
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path
