"""Fault injection with real files and real processes: bad slides, corrupt tiles, kill -9 at
random points (tiler, inference, a Dask worker), a full output volume, an out-of-memory
model, invalid configuration and hostile slide names. Each fault must end in a typed error
naming the file and the problem, or in a correct result; never a hang, a crash of a batch,
or a store marked complete that is not."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from torch import nn

from wsipipe.tiles import store
from wsipipe.config import InferenceConfig, load_config
from wsipipe.errors import OutputWriteError, SlideOpenError, SlideReadError, writing_outputs
from wsipipe.models.inference import BatchLimit, forward_with_backoff, infer_store, predict_patches
from wsipipe.models.model import ModelInfo, build_model, save_weights
from wsipipe.run.names import slide_output_name
from wsipipe.run.pipeline import run_slide
from wsipipe.outputs.stitch import stitch_store
from wsipipe.slides.synth import write_synthetic_slide
from wsipipe.tiles.tiling import tile_slide

pytestmark = pytest.mark.timeout(180)  # a hang is a failure, never a stuck suite

WSIPIPE = [sys.executable, "-m", "wsipipe.cli"]
# Small patches keep the whole pipeline (torch inference included) to seconds per slide.
SMALL = {
    "tile": {"patch_size": 64, "chunk_patches": 16},
    "inference": {"batch_size": 16, "device": "cpu", "precision": "fp32"},
    "dask": {"num_workers": 1},
}
TINY = {**SMALL, "tile": {"mpp": 2.0, "patch_size": 32, "chunk_patches": 16}}  # a few hundred patches


# One math thread per process: on a shared machine OpenMP threads spinning against each
# other cost several times the work itself.
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args, timeout=150):
    return subprocess.run([*WSIPIPE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stderr_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.strip()]


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One generated slide, random-init weights and a small-patch config, shared by the module."""
    d = tmp_path_factory.mktemp("faults")
    slide = write_synthetic_slide(d / "gen.svs", 3000, 2000, mpp=0.5, seed=5, n_tissue=2, n_tumor=1).path
    torch.manual_seed(0)
    weights = d / "w.safetensors"  # a small real architecture keeps inference to about a second
    save_weights(build_model("shufflenet_v2_x0_5", 1), weights, "shufflenet_v2_x0_5", 1)
    cfg_path = write_yaml(d / "small.yaml", SMALL)
    tiny_path = write_yaml(d / "tiny.yaml", TINY)
    return {"dir": d, "slide": slide, "weights": weights, "cfg_path": cfg_path, "cfg": load_config(cfg_path),
            "tiny_path": tiny_path, "tiny": load_config(tiny_path)}


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted run of the generated slide: what every interrupted run must reproduce."""
    return run_slide(work["slide"], work["dir"] / "ref", work["cfg"], work["weights"]).out_dir


def assert_same_outputs(ref: Path, got: Path) -> None:
    """Final outputs identical: arrays and images byte for byte, JSON up to timings and paths."""
    for name in ("heatmap.npy", "tumor_mask.png", "heatmap.png"):
        assert (ref / name).read_bytes() == (got / name).read_bytes(), name
    a, b = (zarr.open_group(str(p / "patches.zarr"), mode="r") for p in (ref, got))
    for name in ("patches", "coords", "grid_ij", "tissue_fraction", "probabilities"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)

    def geometry(p):
        return [f["geometry"] for f in json.loads((p / "tumor.geojson").read_text())["features"]]

    assert geometry(ref) == geometry(got)

    def summary(p):
        s = json.loads((p / "summary.json").read_text())
        s.pop("seconds"), s.pop("store")
        return s

    assert summary(ref) == summary(got)


# --------------------------------------------------------------------------- bad slide files


def _truncated(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _not_slides(tmp: Path, slides_dir: Path) -> list[tuple[Path, str]]:
    from PIL import Image

    rgb = np.full((300, 400, 3), 200, np.uint8)
    Image.fromarray(rgb).save(tmp / "png.svs", format="PNG")
    Image.fromarray(rgb).save(tmp / "jpeg.svs", format="JPEG")
    (tmp / "empty.svs").write_bytes(b"")
    (tmp / "x.svs").mkdir()
    real = slides_dir / "cmu-1-small-region.svs"
    cases = [
        (tmp / "empty.svs", "file is empty"),
        (tmp / "png.svs", "not a slide format"),
        (tmp / "jpeg.svs", "not a slide format"),
        (tmp / "x.svs", "is a directory"),
    ]
    # The real SVS keeps its directory at the end: any cut loses it.
    for frac in (0.001, 0.4, 0.99):
        cases.append((_truncated(real, tmp / f"cmu-cut{frac}.svs", frac), "not a slide format"))
    return cases


@pytest.mark.timeout(60)
def test_files_that_are_not_slides_fail_with_a_typed_error_naming_them(slides_dir, tmp_path):
    for path, problem in _not_slides(tmp_path, slides_dir):
        with pytest.raises(SlideOpenError) as err:
            tile_slide(path, tmp_path / f"{path.name}.zarr")
        assert str(path) in str(err.value) and problem in str(err.value), str(err.value)


@pytest.mark.timeout(60)
def test_truncated_generated_slide_at_several_offsets(work, tmp_path):
    """Cuts inside level-0 tile data lose the directory chain: a clear open error. A cut inside
    the (unused) thumbnail image still tiles, to exactly the patches of the whole file."""
    src = work["slide"]
    with tifffile.TiffFile(src) as tf:
        level0 = tf.pages[0]
        data_end = int(max(np.add(level0.dataoffsets, level0.databytecounts)))
        first = int(min(level0.dataoffsets))
    size = src.stat().st_size
    cfg = load_config(None, {"tile.min_tissue": 0.0})
    for cut in (first + 100, (first + data_end) // 2, data_end - 10):
        path = tmp_path / f"cut{cut}.svs"
        path.write_bytes(src.read_bytes()[:cut])
        with pytest.raises(SlideOpenError, match="not a slide format") as err:
            tile_slide(path, tmp_path / f"cut{cut}.zarr", cfg)
        assert str(path) in str(err.value)
    # Past every level's tiles, inside the thumbnail strip at the end of the file.
    path = tmp_path / "cut-thumb.svs"
    path.write_bytes(src.read_bytes()[: (data_end + size) // 2])
    tile_slide(path, tmp_path / "cut-thumb.zarr", cfg)
    tile_slide(src, tmp_path / "whole.zarr", cfg)
    a, b = store.open_store(tmp_path / "cut-thumb.zarr"), store.open_store(tmp_path / "whole.zarr")
    np.testing.assert_array_equal(a["patches"][:], b["patches"][:])


def _corrupt_tiles(path: Path, tile_rc: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Overwrite the start of level-0 tiles (row, col) in place; returns their level-0 boxes."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        offsets, tw, th = list(page.dataoffsets), page.tilewidth, page.tilelength
        cols = -(-page.shape[1] // tw)
    boxes = []
    with open(path, "r+b") as fh:
        for r, c in tile_rc:
            fh.seek(offsets[r * cols + c] + 2)  # after SOI: a scan marker before any frame header
            fh.write(b"\xff\xda\x00\x01garbage" * 4)
            boxes.append((c * tw, r * th, (c + 1) * tw, (r + 1) * th))
    return boxes


def _patches_touching(coords: np.ndarray, size: int, boxes) -> set[tuple[int, int]]:
    hit = set()
    for x, y in coords:
        for x0, y0, x1, y1 in boxes:
            if x < x1 and x + size > x0 and y < y1 and y + size > y0:
                hit.add((int(x), int(y)))
    return hit


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory):
    """Long side 4000 px: a level at downsample 4 (the thumbnail reads there, not at level 0)."""
    return write_synthetic_slide(tmp_path_factory.mktemp("pyr") / "good.svs", 4000, 1600, mpp=0.5, seed=3).path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_corrupt_tiles_fail_or_skip_as_configured(pyramid_slide, tmp_path, reader):
    """Level-0 tiles with undecodable JPEG data inside an otherwise good slide (it has a
    pyramid level, so the thumbnail still reads). fail: the slide fails, naming the count and
    the level-0 coordinates; skip: the rest is tiled exactly and the skipped patches are
    recorded in the store and summary.json, and left out of the heatmap."""
    good, bad = pyramid_slide, tmp_path / "bad tiles.svs"
    shutil.copyfile(good, bad)
    boxes = _corrupt_tiles(bad, [(2, 7), (5, 3)])
    over = {"tile.min_tissue": 0.0, "tile.reader": reader, "tile.chunk_patches": 16}
    ref = tmp_path / "good.zarr"
    tile_slide(good, ref, load_config(None, over))
    coords = store.open_store(ref)["coords"][:]
    expected = _patches_touching(coords, 224, boxes)
    assert 0 < len(expected) < len(coords)

    with pytest.raises(SlideReadError) as err:
        tile_slide(bad, tmp_path / "fail.zarr", load_config(None, over))
    msg = str(err.value)
    assert str(bad) in msg and f"{len(expected)} of {len(coords)} patches have corrupt tile data" in msg
    first = sorted(expected, key=lambda xy: (xy[1], xy[0]))[0]
    assert f"({first[0]}, {first[1]})" in msg
    assert not store.is_complete(store.open_store(tmp_path / "fail.zarr"), "tile")
    with pytest.raises(SlideReadError, match="corrupt tile data"):  # a rerun says the same, fast
        tile_slide(bad, tmp_path / "fail.zarr", load_config(None, over))

    skip = load_config(None, {**over, "tile.on_corrupt_tile": "skip"})
    tile_slide(bad, tmp_path / "skip.zarr", skip)
    g, r = store.open_store(tmp_path / "skip.zarr"), store.open_store(ref)
    report = store.stage_entry(g, "tile")["corrupt_patches"]
    assert report["count"] == len(expected) and {tuple(xy) for xy in report["coords_l0"]} == expected
    corrupt = g["corrupt"][:]
    assert {tuple(map(int, xy)) for xy in coords[corrupt]} == expected
    np.testing.assert_array_equal(g["patches"][:][~corrupt], r["patches"][:][~corrupt])

    if reader == "auto":  # the stitch side once is enough
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
        info = ModelInfo(arch="tiny", num_classes=1, sha256="0" * 64, path=None)
        infer_store(tmp_path / "skip.zarr", net, info, InferenceConfig(device="cpu", precision="fp32"))
        # Every cell was tiled (min_tissue 0): keep the glass ones too, so only the corrupt are left out.
        every = skip.stitch.model_copy(update={"max_background": 1.0})
        summary = stitch_store(tmp_path / "skip.zarr", tmp_path / "out", every)
        assert summary["skipped_patches"]["count"] == len(expected)
        assert summary["slide_score"]["n"] == len(coords) - len(expected)
        heat = np.load(tmp_path / "out" / "heatmap.npy")
        ij = g["grid_ij"][:][corrupt]
        assert np.isnan(heat[ij[:, 0], ij[:, 1]]).all()  # no result where nothing was read


@pytest.mark.timeout(60)
def test_small_odd_sized_and_unicode_named_slides_tile_correctly(slides_dir, tmp_path):
    """A slide smaller than one patch, and odd dimensions (not a multiple of the tile size),
    under a name with spaces and non-ASCII letters: patches are OpenSlide's pixels, padded
    with background past the edge."""
    import openslide

    tiny = tmp_path / "tiny slide ü.svs"
    shutil.copyfile(slides_dir / "openslide-fixtures" / "small.svs", tiny)
    cfg = load_config(None, {"tissue.detect": False, "tile.min_tissue": 0.0})
    tile_slide(tiny, tmp_path / "tiny.zarr", cfg)
    g = store.open_store(tmp_path / "tiny.zarr")
    assert g["patches"].shape == (1, 224, 224, 3)
    patch = g["patches"][0]
    with openslide.OpenSlide(str(tiny)) as osr:
        native = np.asarray(osr.read_region((0, 0), 0, (16, 16)).convert("RGB"))
    np.testing.assert_array_equal(patch[:16, :16], native)
    assert (patch[16:] == 255).all() and (patch[:, 16:] == 255).all()

    odd = write_synthetic_slide(tmp_path / "odd größe 2999×1777.svs", 2999, 1777, seed=2).path
    cfg = load_config(None, {"tile.min_tissue": 0.0})
    tile_slide(odd, tmp_path / "odd.zarr", cfg)
    g = store.open_store(tmp_path / "odd.zarr")
    coords = g["coords"][:]
    edge = np.flatnonzero((coords[:, 0] + 224 > 2999) | (coords[:, 1] + 224 > 1777))
    assert len(edge) > 0 and g["coords"].shape[0] == 14 * 8
    with openslide.OpenSlide(str(odd)) as osr:
        for k in edge[:: max(1, len(edge) // 4)]:
            x, y = map(int, coords[k])
            want = np.asarray(osr.read_region((x, y), 0, (224, 224)).convert("RGBA"))
            alpha = want[..., 3:4].astype(np.float32) / 255
            want = np.round(want[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
            np.testing.assert_array_equal(g["patches"][int(k)], want)


@pytest.mark.timeout(150)
def test_a_batch_of_bad_slides_never_stops_the_run(work, slides_dir, tmp_path):
    """`wsipipe run` over good and bad slides: each bad one is one line naming it, the good
    ones (under hostile names) finish, the exit code says some failed."""
    good = tmp_path / "my slide ü ..\\..\\x.svs"
    shutil.copyfile(work["slide"], good)
    glass = write_synthetic_slide(tmp_path / "glass.svs", 1500, 1000, seed=1, n_tissue=0, n_tumor=0).path
    bad = [p for p, _ in _not_slides(tmp_path, slides_dir)[:4]] + [
        slides_dir / "tcga-cr-7395-01a-01-ts1.svs", slides_dir / "openslide-fixtures" / "unreadable.svs", glass,
    ]
    out = tmp_path / "out"
    res = cli("run", good, *bad, "--model", work["weights"], "--out", out, "-c", work["tiny_path"])
    assert res.returncode == 2, res.stderr
    assert f"{len(bad)} of {len(bad) + 1} slides failed" in res.stderr
    failed = [ln for ln in stderr_lines(res) if ln.startswith("failed: ")]
    assert len(failed) == len(bad) and "Traceback" not in res.stderr
    for path, line in zip(bad, failed, strict=True):
        assert str(path) in line, line
    assert "no resolution" in failed[4] and "Bogus marker length" in failed[5] and "no tissue" in failed[6]
    (folder,) = [p for p in out.iterdir() if (p / "summary.json").exists()]
    assert folder.parent == out and re.fullmatch(r"[A-Za-z0-9._-]+", folder.name)
    assert json.loads((folder / "summary.json").read_text())["slide"]["path"] == str(good)


# --------------------------------------------------------------------------- interruptions


def _wait_for_flags(proc, flags_dir: Path, want: int, timeout=120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if flags_dir.is_dir() and len(os.listdir(flags_dir)) >= want:
            return True
        time.sleep(0.005)
    return False


@pytest.mark.timeout(170)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_random_points_then_rerun_gives_identical_outputs(work, reference, tmp_path, seed):
    """`wsipipe run` killed with SIGKILL in tiling (seed 0) or inference (seeds 1, 2), at a random
    chunk; the killed store is never marked complete, no output is half written, and a rerun
    produces exactly the uninterrupted outputs."""
    rng = random.Random(seed)
    stage = "tile" if seed == 0 else "infer"
    ref_store = store.open_store(reference / "patches.zarr")
    n_chunks = ref_store[f"_progress/{stage}"].shape[0]
    want = rng.randint(1, n_chunks // 2)  # room left: a busy machine may poll late
    out = tmp_path / "out"
    args = [*WSIPIPE, "run", work["slide"], "--model", work["weights"], "--out", out, "-c", work["cfg_path"]]
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    flags = out / reference.name / "patches.zarr" / "_progress" / stage / "c"
    caught = _wait_for_flags(proc, flags, want)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught, f"run ended before {want} {stage} chunks; nothing was interrupted"
    slide_dir = out / reference.name
    g = store.open_store(slide_dir / "patches.zarr")
    assert not store.is_complete(g, stage) and not store.is_complete(g, "stitch")
    done = int(g[f"_progress/{stage}"][:].sum())
    assert want <= done < n_chunks
    assert not (slide_dir / "summary.json").exists()

    assert run_slide(work["slide"], out, work["cfg"], work["weights"]).out_dir == slide_dir
    assert_same_outputs(reference, slide_dir)
    entry = store.stage_entry(store.open_store(slide_dir / "patches.zarr"), stage)
    if stage == "tile":
        assert entry["resumed"]
    else:
        assert 0 < entry["computed"] < entry["n_patches"]  # resumed, not recomputed
    assert not list(slide_dir.glob(".*.tmp"))


@pytest.mark.timeout(150)
def test_killed_dask_worker_mid_tiling_gives_identical_store(work, reference, tmp_path):
    """A real process cluster; one worker is SIGKILLed while tiling. The scheduler re-runs its
    tasks elsewhere (a half-written chunk is rewritten whole) and the store equals the reference."""
    from distributed import Client, LocalCluster

    cfg = load_config(work["cfg_path"], {"tile.chunk_patches": 2})  # many small tasks: time to kill one
    target = tmp_path / "dist.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        result: dict = {}

        def tile():
            try:
                result["stats"] = tile_slide(work["slide"], target, cfg, client=client)
            except BaseException as exc:  # surfaced by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=tile)
        thread.start()
        flags = target / "_progress" / "tile" / "c"
        deadline = time.time() + 60
        while time.time() < deadline and thread.is_alive():
            if flags.is_dir() and len(os.listdir(flags)) >= 3:
                break
            time.sleep(0.005)
        killed = thread.is_alive()
        os.kill(sorted(pids.values())[0], signal.SIGKILL)
        thread.join(120)
    assert killed, "tiling finished before a worker could be killed"
    assert "error" not in result, result.get("error")
    got, ref = store.open_store(target), store.open_store(reference / "patches.zarr")
    assert store.is_complete(got, "tile")
    for name in ("patches", "coords", "grid_ij", "tissue_fraction"):
        np.testing.assert_array_equal(ref[name][:], got[name][:], err_msg=name)


def test_every_output_file_is_written_through_write_atomic():
    """Outputs are written under a temporary name and renamed: no direct file writes in the library."""
    pkg = Path(__file__).resolve().parents[1] / "wsipipe"
    direct = re.compile(r"\.write_(text|bytes)\(|(?<!fd)open\([^)]*['\"][wa]b?['\"]|\.savefig\(\s*[^b]|np\.save\(\s*[^b]")
    offenders = []
    for path in pkg.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if direct.search(line):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    # synth writes the slide under a temporary name itself (tifffile needs a file handle).
    assert [o for o in offenders if not o.startswith("synth.py")] == [], offenders


# --------------------------------------------------------------------------- resource faults


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.environ.get("WSIPIPE_TEST_NO_TMPFS"):  # to exercise the fallback where mounting works
        return False
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _file_size_quota(limit: int):
    """preexec_fn: writes past ``limit`` bytes per file fail with EFBIG (instead of SIGXFSZ)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(170)
def test_full_output_volume_is_a_clear_error_and_the_run_resumes(work, slides_dir, tmp_path):
    """A real 24 MiB tmpfs as the output folder (where it cannot be mounted: a per-file size
    quota, RLIMIT_FSIZE, on the run instead). With it full, the second slide fails with one
    line naming the output and the OS's reason; the first slide's outputs are untouched; once
    space is freed the run finishes, matching a run on a roomy disk."""
    vol = tmp_path / "vol"
    mounted = _mount_tmpfs(vol, "24m")  # two slides: photo-like heatmap.png and report.html
    try:
        cfg_path, cfg = work["tiny_path"], work["tiny"]
        first, second = work["slide"], slides_dir / "cmu-1-small-region.svs"
        out = vol / "out"
        first_dir = run_slide(first, out, cfg, work["weights"]).out_dir
        before = _digests(first_dir)
        filler = vol / "filler"
        if mounted:
            free = os.statvfs(vol).f_bavail * os.statvfs(vol).f_frsize
            filler.write_bytes(b"\0" * max(0, free - 48 * 1024))  # leave 48 KiB: the next store fails midway
            quota, reason = None, "No space left on device"
        else:
            quota, reason = _file_size_quota(16 * 1024), "File too large"

        args = [*WSIPIPE, "run", first, second, "--model", work["weights"], "--out", out, "-c", cfg_path]
        res = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=150, env=ENV,
                             preexec_fn=quota)
        assert res.returncode == 2, res.stderr
        failed = [ln for ln in stderr_lines(res) if ln.startswith("failed: ")]
        assert len(failed) == 1 and reason in failed[0] and str(out) in failed[0], res.stderr
        assert "1 of 2 slides failed" in res.stderr and "Traceback" not in res.stderr
        assert _digests(first_dir) == before
        (second_dir,) = [p for p in out.iterdir() if p != first_dir]
        assert not (second_dir / "summary.json").exists()
        if (second_dir / "patches.zarr" / "zarr.json").exists():
            assert not store.is_complete(store.open_store(second_dir / "patches.zarr"), "tile")

        filler.unlink(missing_ok=True)
        for slide in (first, second):
            run_slide(slide, out, cfg, work["weights"])
        assert _digests(first_dir) == before
        roomy = run_slide(second, tmp_path / "roomy", cfg, work["weights"]).out_dir
        assert_same_outputs(roomy, second_dir)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(vol)], check=False)


def test_write_errors_become_a_typed_error_naming_the_file(tmp_path):
    """EFBIG from a real write past RLIMIT_FSIZE (a file-size quota) maps to OutputWriteError
    and leaves no temporary file; an unrelated OSError passes through unchanged."""
    code = (
        "import resource, signal, sys\n"
        "from wsipipe.errors import writing_outputs, OutputWriteError\n"
        "from wsipipe.files import write_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    with writing_outputs(sys.argv[1]):\n"
        "        write_atomic(sys.argv[1] + '/big.bin', b'x' * 100000)\n"
        "except OutputWriteError as exc:\n"
        "    print(exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert str(tmp_path) in res.stdout and "File too large" in res.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary file went with the failure
    with pytest.raises(OSError) as err, writing_outputs(tmp_path):
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "x"))
    assert not isinstance(err.value, OutputWriteError)


class OutOfMemoryAbove(nn.Module):
    """A real model that runs out of memory above a batch size, as a GPU does."""

    def __init__(self, model: nn.Module, max_batch: int):
        super().__init__()
        self.model, self.max_batch, self.sizes = model, max_batch, []

    def forward(self, x):
        if x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory: batch of {x.shape[0]} (injected)")
        self.sizes.append(x.shape[0])
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_gives_the_same_probabilities(tmp_path):
    rng = np.random.default_rng(0)
    n = 70
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("patches", data=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), chunks=(16, 32, 32, 3))
    group.create_array("coords", data=np.zeros((n, 2), np.int64), chunks=(n, 2))
    store.set_stage(group, "tile", {"slide": "hand-built"}, True, n_patches=n)
    torch.manual_seed(1)
    model = build_model("shufflenet_v2_x0_5", 1).eval()  # BatchNorm in eval: batch-independent
    info = ModelInfo(arch="shufflenet_v2_x0_5", num_classes=1, sha256="1" * 64, path=None)
    want = predict_patches(model, group["patches"][:], torch.device("cpu"), None, batch_size=32)

    flaky = OutOfMemoryAbove(model, max_batch=6)
    infer_store(tmp_path / "s.zarr", flaky, info, InferenceConfig(batch_size=32, device="cpu", precision="fp32"))
    g = store.open_store(tmp_path / "s.zarr")
    np.testing.assert_allclose(g["probabilities"][:], want, rtol=1e-5, atol=1e-6)
    entry = store.stage_entry(g, "infer")
    assert entry["complete"] and entry["batch_size"] == 4 and entry["oom_backoffs"] == 3  # 32 -> 16 -> 8 -> 4
    assert max(flaky.sizes) == 4 and sum(flaky.sizes) == n

    never = OutOfMemoryAbove(model, max_batch=0)  # not even one patch fits: the error surfaces
    with pytest.raises(torch.OutOfMemoryError):
        forward_with_backoff(never, torch.zeros(4, 3, 32, 32), BatchLimit(4))


# --------------------------------------------------------------------------- configuration


BAD_FIELDS = [
    ({"tile": {"mpp": 1000}}, "tile.mpp=1000"),
    ({"mpp_override": 0}, "mpp_override=0"),
    ({"tile": {"patch_size": -5}}, "tile.patch_size=-5"),
    ({"tile": {"stride": 0}}, "tile.stride=0"),
    ({"tile": {"chunk_patches": 0}}, "tile.chunk_patches=0"),
    ({"tile": {"min_tissue": 1.5}}, "tile.min_tissue=1.5"),
    ({"tile": {"on_corrupt_tile": "ignore"}}, "tile.on_corrupt_tile='ignore'"),
    ({"tile": {"patchsize": 64}}, "tile.patchsize=64"),
    ({"tissue": {"thumb_mpp": 0.5}}, "tissue.thumb_mpp=0.5"),
    ({"inference": {"batch_size": 0}}, "inference.batch_size=0"),
    ({"inference": {"precision": "int4"}}, "inference.precision='int4'"),
    ({"stitch": {"threshold": 1.5}}, "stitch.threshold=1.5"),
    ({"model": {"arch": "Not A Model"}}, "model.arch='Not A Model'"),
    ({"model": {"num_classes": 0}}, "model.num_classes=0"),
    ({"dask": {"num_workers": -1}}, "dask.num_workers=-1"),
]


@pytest.mark.parametrize("data,named", BAD_FIELDS, ids=[b[1] for b in BAD_FIELDS])
def test_every_invalid_field_is_named_with_its_value(tmp_path, data, named):
    from wsipipe.errors import ConfigError

    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value) and str(path) in str(err.value)


# Through the command line: exit 2, one line, and nothing written (not even the output folder).
BAD_RUNS = [
    (["--mpp", "1000"], None, "tile.mpp=1000.0"),
    ([], {"tile": {"patch_size": -5}}, "tile.patch_size=-5"),
    (["--model", "/nonexistent/w.safetensors"], None, "/nonexistent/w.safetensors: weights file not found"),
    (["--config", "/nonexistent/c.yaml"], None, "/nonexistent/c.yaml: config file not found"),
    (["/nonexistent/slide.svs"], None, "/nonexistent/slide.svs: file not found"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra,yaml_data,named", BAD_RUNS, ids=[b[2][:30] for b in BAD_RUNS])
def test_invalid_parameter_fails_before_any_work(work, tmp_path, extra, yaml_data, named):
    out = tmp_path / "out"
    args = ["run", work["slide"], *extra, "--out", out]
    if "--model" not in extra:
        args += ["--model", work["weights"]]
    if yaml_data is not None:
        args += ["-c", write_yaml(tmp_path / "bad.yaml", yaml_data)]
    res = cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = stderr_lines(res)
    assert len(lines) == 1 and named in lines[0], res.stderr
    assert not out.exists()


@pytest.mark.parametrize("over,named", [({"model.arch": "notamodel"}, "notamodel"),
                                         ({"inference.device": "tpu:9"}, "inference.device='tpu:9'")])
def test_model_and_device_are_checked_before_any_work(work, tmp_path, over, named):
    """Checked when the run starts (they need torch), still before the output folder exists."""
    from wsipipe.errors import WsipipeError

    with pytest.raises(WsipipeError, match=re.escape(named)):
        run_slide(work["slide"], tmp_path / "out", load_config(work["cfg_path"], over), work["weights"])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- hostile names

HOSTILE = [
    "../../etc/passwd.svs", "..svs", "...svs", ".svs", "..\\..\\windows\\x.svs", "/abs/path/../../x.svs",
    "ünïcödé 名前 slide.svs", "a b\tc\nd.svs", "-rf.svs", "x" * 500 + ".svs", "\u202egnp.svs", "con.svs",
    "a/../../../b.svs", ".hidden.svs", "slide.svs\x00.png", "%2e%2e%2fx.svs", "~user.svs", "$(rm -rf).svs",
]


def _assert_safe_name(out: Path, slide_name: str) -> None:
    name = slide_output_name(Path(slide_name), "0123456789abcdef")
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-01234567", name), (slide_name, name)
    assert len(name) <= 100  # one path component (no "/"), never "." or "..", never hidden
    target = (out / name).resolve()
    assert target.parent == out.resolve(), (slide_name, name)


@pytest.mark.parametrize("slide_name", HOSTILE, ids=range(len(HOSTILE)))
def test_output_name_never_leaves_the_output_folder(tmp_path, slide_name):
    _assert_safe_name(tmp_path, slide_name)


def test_output_name_fuzzed(tmp_path):
    rng = random.Random(7)
    alphabet = "./\\-_ ~$%:*?\"<>|\x00\n\t" + "aZ09" + "üé名\u202e\u0301"
    for _ in range(2000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) + rng.choice([".svs", "", ".."])
        _assert_safe_name(tmp_path, name)
