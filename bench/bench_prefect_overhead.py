"""Prefect's overhead for one small slide, measured side by side in one run.

Same slide, model and config, each into a fresh output folder (nothing skipped):
  1. `wsipipe run`                                    (no Prefect)
  2. `wsipipe archive` on the slide                   (process-archive flow, ephemeral Prefect server)
  3. `prefect deployment run process-slide/on-demand --watch`  (real server + process worker)
  4. the same deployment run again (warm server and worker)
Server start, pool, deploy and worker start are timed separately (one-off set-up).

    python bench/bench_prefect_overhead.py [--size 4000] [--workdir /tmp/wsipipe-prefect-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-server helpers the tests use

from test_flows import BIN, _stop, deploy_and_start_worker, run_deployment, start_server  # noqa: E402
from benchutil import write_results  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 2)


def check(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4000, help="generated slide is SIZE x 3/4 SIZE px at 0.5 µm/px")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsipipe-prefect-bench"))
    args = ap.parse_args()

    import torch

    from wsipipe.models.model import build_model, save_weights
    from wsipipe.slides.synth import write_synthetic_slide

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    slide = write_synthetic_slide(work / "slide.svs", args.size, args.size * 3 // 4, mpp=0.5, seed=7).path
    torch.manual_seed(0)
    model = work / "resnet18.safetensors"
    save_weights(build_model("resnet18", 1), model, "resnet18", 1)
    base_env = {**os.environ, "PREFECT_HOME": str(work / "ephemeral-home"), "DO_NOT_TRACK": "1"}
    base_env.pop("PREFECT_API_URL", None)

    seconds: dict[str, float] = {}
    seconds["wsipipe run"] = timed(lambda: check(
        [str(BIN / "wsipipe"), "run", str(slide), "--model", str(model), "--out", str(work / "out-run")], base_env))
    seconds["wsipipe archive (ephemeral Prefect)"] = timed(lambda: check(
        [str(BIN / "wsipipe"), "archive", str(slide), "--model", str(model), "--out", str(work / "out-eph")], base_env))

    home = work / "server"
    home.mkdir()
    t0 = time.perf_counter()
    server, env = start_server(home)
    worker = None
    try:
        seconds["setup: server start"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        worker = deploy_and_start_worker(env, home)
        seconds["setup: pool + deploy + worker start"] = round(time.perf_counter() - t0, 2)
        params = {"slide": str(slide), "model": str(model)}
        for label, out in (("deployment run (first)", "out-dep1"), ("deployment run (warm)", "out-dep2")):
            seconds[label] = timed(lambda out=out: run_deployment(env, {**params, "out": str(work / out)},
                                                                  "process-slide/on-demand"))
    finally:
        _stop(worker)
        _stop(server)

    base = seconds["wsipipe run"]
    result = {"slide_px": [args.size, args.size * 3 // 4], "seconds": seconds,
              "ratio_vs_wsipipe_run": {k: round(v / base, 2) for k, v in seconds.items() if not k.startswith("setup")},
              "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    write_results("prefect_overhead", result)


if __name__ == "__main__":
    main()
