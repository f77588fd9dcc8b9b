"""What the bench scripts share: the real-H&E mosaic slide they run on, the reference
measurements (JPEG-decode bound, naive read_region loop) and where results go."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from wsipipe.slides.slide import open_slide
from wsipipe.tiles.tiling import GridSpec

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


def probe_in_chromium(page: Path, js: str, profile: Path, flags: tuple[str, ...] = ()) -> dict:
    """Run ``js`` (a function body returning a JSON-able object) in headless Chromium once
    ``page`` has loaded, on a copy of the page that carries the script; its result and the
    Chromium process's wall seconds (``chromium_process_s``). RuntimeError with Chromium's
    stderr when no result came back."""
    import html
    import re
    import shutil
    import subprocess

    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("chromium not installed (make chromium)")
    script = ('<script>window.addEventListener("load", function () { var out = (function () {' + js + "})();"
              'var pre = document.createElement("pre"); pre.id = "probe-result"; pre.textContent = JSON.stringify(out);'
              "document.body.appendChild(pre); });</script>")
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", script + "</body>"))
    t0 = time.perf_counter()
    try:
        res = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", *flags, f"--user-data-dir={profile}",
                              "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=300)
    finally:
        copy.unlink()
    wall = time.perf_counter() - t0
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', res.stdout, re.S)
    if not found:
        raise RuntimeError(f"no probe result from {page}: {res.stderr[-2000:]}")
    return {"chromium_process_s": round(wall, 2), **json.loads(html.unescape(found.group(1)))}


def needed_tiles(spec: GridSpec, coords: np.ndarray, tile: int) -> np.ndarray:
    """Row-major indices of the level tiles that the patches touch."""
    ds = spec.level_downsample
    x0, y0 = np.floor(coords / ds).astype(np.int64).T
    edge = int(np.ceil(spec.patch_size_l0 / ds)) + 1
    cols = -(-int(np.ceil(spec.slide_width / ds)) // tile)
    rows = -(-int(np.ceil(spec.slide_height / ds)) // tile)
    found = set()
    for x, y in zip(x0.tolist(), y0.tolist(), strict=True):  # a patch may reach past the slide's edge
        for ty in range(y // tile, min((y + edge - 1) // tile, rows - 1) + 1):
            for tx in range(x // tile, min((x + edge - 1) // tile, cols - 1) + 1):
                found.add(ty * cols + tx)
    return np.array(sorted(found))


def decode_bound(slide_path: Path, spec: GridSpec, tiles: np.ndarray) -> tuple[float, int]:
    """Seconds to pread + decode each needed tile once, 1 thread; and the pixels decoded."""
    with open_slide(slide_path) as s:
        level = s.fast_reader(spec.level)
        fd = os.open(slide_path, os.O_RDONLY)
        try:
            out = np.empty((level.tile_h, level.tile_w, 3), np.uint8)  # decoding into one buffer is fastest
            t0 = time.perf_counter()
            for i in tiles.tolist():
                data = os.pread(fd, int(level.counts[i]), int(level.offsets[i]))
                level.decode(data, i, out=out)
            seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
        return seconds, len(tiles) * level.tile_h * level.tile_w


def naive_loop(slide_path: Path, coords: np.ndarray, spec: GridSpec) -> float:
    size_l0, p = int(round(spec.patch_size_l0)), spec.patch_size
    with openslide.OpenSlide(str(slide_path)) as s:
        t0 = time.perf_counter()
        for x, y in coords:
            img = s.read_region((int(x), int(y)), 0, (size_l0, size_l0)).convert("RGB")
            if size_l0 != p:
                img = img.resize((p, p), Image.Resampling.LANCZOS)
            np.asarray(img)
        return time.perf_counter() - t0
