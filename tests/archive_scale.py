"""An archive of many small slides through the real nightly deployment, shared by
tests/test_archive_scale.py and bench/bench_archive_scale.py.

What is here: generating the archive (good slides in parallel processes, ~1 % corrupt in
different ways, cached by a stamp), submitting and waiting for deployment runs, finding and
sampling the flow-run process a process worker starts, the SIGKILL of worker and flow
mid-run, and the exactly-once checks on an output folder after the rerun."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from test_flows import BIN, ROOT, _api, _prefect, start_server

STAMP = ".archive-stamp.json"
STAMP_VERSION = 2
TEXTURE_SEED = 3
# One of each, in turn, until ~1 % of the archive is corrupt: (file name part, expected error).
CORRUPT_KINDS: dict[str, str] = {
    "empty": "file is empty",
    "garbage-header": "not a slide format",
    "plain-tiff": "not a slide format",
    "png-named-svs": "not a slide format",
    "truncated": "",  # filled in by the error the cut file gives (checked to be a typed wsipipe error)
    "glass": "no tissue",
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# --------------------------------------------------------------------------- the archive


@dataclass
class Archive:
    folder: Path
    good: list[Path]
    corrupt: dict[Path, str]  # path -> its kind
    generate_s: float = 0.0
    cached: bool = False

    @property
    def slides(self) -> list[Path]:
        return sorted([*self.good, *self.corrupt])


def _good_slide(args: tuple[str, int, int, float, int]) -> str:
    from wsipipe.slides.synth import make_layout, write_synthetic_slide

    path, width, height, mpp, seed = args
    # Own layout per slide; one texture seed for all (textures cost seconds, cached per seed).
    # A layout with little tissue may leave tissue detection nothing at this size: next seed.
    for attempt in range(20):
        layout = make_layout(width, height, mpp, seed + 100_000 * attempt, 3, seed % 3)
        if layout[0].area >= 0.2 * width * height:  # level-0 px²
            break
    write_synthetic_slide(path, width, height, mpp=mpp, seed=TEXTURE_SEED, layout=layout)
    return path  # its ground truth .geojson beside it is not a slide name: the archive skips it


def _corrupt_slide(kind: str, path: Path, template: Path, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(len(path.name))
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage-header":
        path.write_bytes(b"II*\x00" + rng.integers(0, 256, 64_000, dtype=np.uint8).tobytes())
    elif kind == "plain-tiff":  # a valid TIFF with no slide structure in it
        Image.fromarray(np.full((300, 400, 3), 210, np.uint8)).save(path, format="TIFF")
    elif kind == "png-named-svs":
        Image.fromarray(np.full((300, 400, 3), 210, np.uint8)).save(path, format="PNG")
    elif kind == "truncated":
        data = template.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])
    elif kind == "glass":  # a real slide with nothing on it
        from wsipipe.slides.synth import write_synthetic_slide

        write_synthetic_slide(path, width, height, seed=1, n_tissue=0, n_tumor=0)
        path.with_suffix(".geojson").unlink(missing_ok=True)
    else:
        raise ValueError(kind)


def n_corrupt(n: int) -> int:
    """~1 % of ``n``, and at least one of each kind."""
    return max(len(CORRUPT_KINDS), round(n * 0.01))


def make_archive(folder: Path, n: int, width: int, height: int, mpp: float = 0.5, processes: int = 2) -> Archive:
    """``n`` slides in ``folder``: ``n - n_corrupt(n)`` generated slides with tissue (and
    tumor in two of three) and the corrupt ones, named ``bad-<kind>-<i>.svs``. Reused as is
    when the folder's stamp names the same parameters."""
    folder = Path(folder)
    params = {"version": STAMP_VERSION, "n": n, "width": width, "height": height, "mpp": mpp,
              "kinds": list(CORRUPT_KINDS)}
    n_bad = n_corrupt(n)
    good = [folder / f"slide-{i:05d}.svs" for i in range(n - n_bad)]
    kinds = list(CORRUPT_KINDS)
    corrupt = {folder / f"bad-{kinds[i % len(kinds)]}-{i:03d}.svs": kinds[i % len(kinds)] for i in range(n_bad)}
    stamp = folder / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return Archive(folder, good, corrupt, cached=True)
    t0 = time.perf_counter()
    if folder.exists():
        for p in folder.iterdir():
            if p.is_file():
                p.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), width, height, mpp, 100 + i) for i, p in enumerate(good)]
    with ProcessPoolExecutor(max(1, processes)) as pool:
        list(pool.map(_good_slide, jobs, chunksize=max(1, len(jobs) // (8 * max(1, processes)))))
    for path, kind in corrupt.items():
        _corrupt_slide(kind, path, good[0], width, height)
    stamp.write_text(json.dumps(params))
    return Archive(folder, good, corrupt, generate_s=time.perf_counter() - t0)


def start_server_retrying(home: Path, tries: int = 3) -> tuple[subprocess.Popen, dict]:
    """test_flows.start_server, again when a busy machine kept it from answering in time."""
    for attempt in range(tries):
        try:
            return start_server(home)
        except AssertionError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def tiny_model(path: Path) -> Path:
    """A random-init ResNet18 (1 output) saved as safetensors, the same bytes every time."""
    import torch

    from wsipipe.models.model import build_model, save_weights

    if not path.is_file():
        torch.manual_seed(0)
        save_weights(build_model("resnet18", 1), path, "resnet18", 1)
    return path


# --------------------------------------------------------------------------- deployment runs


def submit_deployment(env: dict, params: dict, name: str = "process-archive/nightly") -> str:
    """`prefect deployment run` without waiting; the flow run's id."""
    out = _prefect(env, "deployment", "run", name, "--params", json.dumps(params), timeout=120)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, out[-2000:]
    return match.group(1)


def wait_flow_run(env: dict, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(env, f"/flow_runs/{run_id}")
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(1.0)
    raise AssertionError(f"flow run {run_id} not finished after {timeout:.0f} s")


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    """A worker on the pool (own session: its process group is it and what it spawns)."""
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "wsipipe"], env=env, cwd=ROOT,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def flow_processes(worker_pid: int) -> list:
    """The flow-run processes (``python -m prefect.engine``) below a worker, as psutil.Process."""
    import psutil

    try:
        children = psutil.Process(worker_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "prefect.engine" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@dataclass
class Sampler:
    """RSS and open file descriptors of the worker and its flow-run process, every ``every`` s."""

    worker_pid: int
    every: float = 1.0
    samples: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _one(self) -> None:
        import psutil

        row: dict = {"t": time.monotonic()}
        procs = {"worker": [psutil.Process(self.worker_pid)]}
        procs["flow"] = flow_processes(self.worker_pid)
        for role, ps in procs.items():
            for p in ps[:1]:
                try:
                    with p.oneshot():
                        row[f"{role}_rss_mib"] = p.memory_info().rss / 2**20
                        row[f"{role}_fds"] = p.num_fds()
                        row[f"{role}_threads"] = p.num_threads()
                except psutil.Error:
                    pass
        self.samples.append(row)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the worker went away between two samples
                self._one()
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def series(self, key: str) -> list[float]:
        return [s[key] for s in self.samples if key in s]


def done_folders(out: Path) -> dict[str, Path]:
    """Slide path -> its output folder, for every folder in ``out`` with a summary.json."""
    found: dict[str, Path] = {}
    for summary in sorted(Path(out).glob("*/summary.json")):
        slide = json.loads(summary.read_text())["slide"]["path"]
        assert slide not in found, f"{slide} has two output folders: {found[slide]} and {summary.parent}"
        found[slide] = summary.parent
    return found


def kill_mid_run(env: dict, worker: subprocess.Popen, run_id: str, out: Path, after_done: int,
                 timeout: float) -> dict:
    """Wait until ``after_done`` slides of run ``run_id`` have their summary in ``out``, then
    SIGKILL the flow-run process (and what it started) and the worker's process group.
    Returns what was done at the kill: slide path -> summary.json mtime."""
    import psutil

    deadline = time.monotonic() + timeout
    flow: list = []
    while time.monotonic() < deadline:
        flow = flow or flow_processes(worker.pid)
        if len(list(out.glob("*/summary.json"))) >= after_done and flow:
            break
        if _api(env, f"/flow_runs/{run_id}")["state"]["type"] in TERMINAL:
            raise AssertionError(f"flow run ended before {after_done} slides were done: nothing to interrupt")
        time.sleep(0.05)
    else:
        raise AssertionError(f"{after_done} slides not done after {timeout:.0f} s")
    victims = []
    for p in flow:
        try:
            victims += [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(30)
    psutil.wait_procs(victims, timeout=30)
    from wsipipe.tiles import store

    # Done = summary.json written and the stitch stage marked complete after it: a kill between
    # the two leaves a slide whose rerun rightly restitches it.
    return {slide: (folder / "summary.json").stat().st_mtime_ns for slide, folder in done_folders(out).items()
            if store.is_complete(store.open_store(folder / "patches.zarr"), "stitch")}


def interrupted(archive: Archive, out: Path) -> list[Path]:
    """Good slides with an output folder but no summary yet (their writers were killed)."""
    started = {p.name.rsplit("-", 1)[0] for p in Path(out).iterdir() if p.is_dir() and not p.name.startswith(".")}
    done = {Path(s).stem for s in done_folders(out)}
    return [s for s in archive.good if s.stem in started - done]


# --------------------------------------------------------------------------- checks


def error_of(archive: Archive, rows: list[dict]) -> dict[str, str]:
    return {Path(r["slide"]).name: r.get("error") or "" for r in rows if r["status"] == "failed"}


def check_exactly_once(archive: Archive, out: Path, rows: list[dict], done_before: dict[str, int]) -> list[str]:
    """Problems (empty when none) with ``out`` after an interrupted run and its rerun:

    - each good slide: one output folder, its store complete, row ok or skipped, and
      skipped (summary not rewritten) when it was done before the kill;
    - each corrupt slide: a failed row naming it, with its kind's error; no summary;
    - no temporary file of a killed writer anywhere."""
    from wsipipe.locks import stale_temps

    problems: list[str] = []
    by_slide = {r["slide"]: r for r in rows}
    if len(rows) != len(archive.slides) or len(by_slide) != len(rows):
        problems.append(f"{len(rows)} rows ({len(by_slide)} distinct) for {len(archive.slides)} slides")
    folders = done_folders(out)
    for slide in archive.good:
        problems += _good_problems(slide, by_slide.get(str(slide)), folders.get(str(slide)), done_before)
    for slide, kind in archive.corrupt.items():
        problems += _corrupt_problems(slide, kind, by_slide.get(str(slide)))
        if str(slide) in folders:
            problems.append(f"{slide.name}: corrupt slide has outputs")
    extra = set(folders) - {str(s) for s in archive.good}
    if extra:
        problems.append(f"outputs of slides not in the archive: {sorted(extra)}")
    left = stale_temps(out, zarr_partials=False)
    if left:
        problems.append(f"temporary files left in the output folder: {[t.name for t in left]}")
    return problems


def _good_problems(slide: Path, row: dict | None, folder: Path | None, done_before: dict[str, int]) -> list[str]:
    from wsipipe.locks import stale_temps
    from wsipipe.tiles import store

    problems = []
    if row is None or row["status"] not in ("ok", "skipped"):
        problems.append(f"{slide.name}: row {row and (row['status'], row.get('error'))}")
    if folder is None:
        return [*problems, f"{slide.name}: no output folder with a summary"]
    group = store.open_store(folder / "patches.zarr")
    if not all(store.is_complete(group, s) for s in ("tile", "infer", "stitch")):
        problems.append(f"{slide.name}: store not complete")
    if str(slide) in done_before:
        if row is not None and row["status"] != "skipped":
            problems.append(f"{slide.name}: done before the kill but {row['status']} in the rerun")
        if (folder / "summary.json").stat().st_mtime_ns != done_before[str(slide)]:
            problems.append(f"{slide.name}: summary rewritten")
    temps = stale_temps(folder)
    if temps:
        problems.append(f"{slide.name}: temporary files left {[t.name for t in temps]}")
    return problems


def _corrupt_problems(slide: Path, kind: str, row: dict | None) -> list[str]:
    want = CORRUPT_KINDS[kind]
    if row is None or row["status"] != "failed" or str(slide) not in (row.get("error") or ""):
        return [f"{slide.name}: row {row and (row['status'], row.get('error'))}"]
    if want and want not in row["error"]:
        return [f"{slide.name}: error {row['error']!r} lacks {want!r}"]
    if not re.match(r"\w*Error: ", row["error"]):
        return [f"{slide.name}: error {row['error']!r} is not a typed error"]
    return []


def compare_outputs(reference: Path, got: Path, slides: list[Path]) -> list[str]:
    """Problems (empty when none): each slide's decision, score and stored probabilities in
    ``got`` must equal those in ``reference``."""
    from wsipipe.tiles import store

    problems: list[str] = []
    ref, new = done_folders(reference), done_folders(got)
    for slide in map(str, slides):
        if slide not in ref or slide not in new:
            problems.append(f"{Path(slide).name}: missing in {'reference' if slide not in ref else 'rerun'}")
            continue
        a = json.loads((ref[slide] / "summary.json").read_text())
        b = json.loads((new[slide] / "summary.json").read_text())
        for key in ("decision", "n_patches", "slide_score"):
            if a.get(key) != b.get(key):
                problems.append(f"{Path(slide).name}: {key} {a.get(key)} != {b.get(key)}")
        pa = np.asarray(store.array(store.open_store(ref[slide] / "patches.zarr"), "probabilities")[:])
        pb = np.asarray(store.array(store.open_store(new[slide] / "patches.zarr"), "probabilities")[:])
        if pa.shape != pb.shape or not np.allclose(pa, pb, atol=1e-6, equal_nan=True):
            problems.append(f"{Path(slide).name}: probabilities differ")
    return problems
