"""The nightly archive deployment at scale: N generated slides (~1 % corrupt) through a real
Prefect server, process work pool, worker and `prefect deployment run 'process-archive/nightly'`.

Prints (and writes bench/results/archive_scale.json):
  - wall time of the deployment run over all N slides, and per slide;
  - orchestration overhead: the deployment run vs `wsipipe run` over the same subset of
    slides (a CSV manifest), one after the other on this machine in this run;
  - RSS, open file descriptors and threads of the worker and the flow-run process, sampled
    every second (first/last tenth of the run side by side: flat or not);
  - Prefect's SQLite database size, task runs, artifacts and log lines the runs created;
  - headless Chromium: load, sort and filter of the N-row archive report, timed in the page;
  - the kill test: a second run over a fresh output folder, SIGKILL of the flow-run process
    and the worker mid-run, a new worker, a rerun; exactly-once outcome, failed corrupt
    slides, no temporary files, outputs equal to the uninterrupted run.

    python bench/bench_archive_scale.py [--n 1000] [--width 2048] [--subset 40]
        [--workdir /tmp/wsipipe-archive-bench] [--in-flight 2] [--no-kill]
Generated slides are cached in WORKDIR/slides (a stamp names N and the size).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-server helpers the tests use

from archive_scale import (  # noqa: E402
    Sampler, check_exactly_once, compare_outputs, interrupted, kill_mid_run, make_archive, start_worker, submit_deployment,
    start_server_retrying, tiny_model, wait_flow_run,
)
from test_flows import BIN, _api, _stop, deploy_and_start_worker  # noqa: E402
from test_report import CHROMIUM_FLAGS  # noqa: E402
from benchutil import probe_in_chromium, write_results  # noqa: E402


def say(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def run_seconds(run: dict) -> float:
    """Server-side wall time of a flow run: scheduled start to end."""
    from datetime import datetime

    start = datetime.fromisoformat(run["start_time"])
    end = datetime.fromisoformat(run["end_time"])
    return round((end - start).total_seconds(), 2)


def count(env: dict, what: str, flow_run_ids: list[str]) -> int:
    if what == "task_runs":
        body = {"flow_runs": {"id": {"any_": flow_run_ids}}}
    elif what == "artifacts":
        body = {"artifacts": {"flow_run_id": {"any_": flow_run_ids}}}
    else:  # logs: no count endpoint; page through
        n, offset = 0, 0
        while True:
            page = _api(env, "/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200,
                                              "offset": offset})
            n += len(page)
            offset += 200
            if len(page) < 200:
                return n
    return int(_api(env, f"/{what}/count", body))


def profile(sampler: Sampler, t0: float, t1: float) -> dict:
    """Per process: peak, the median over the run's second tenth (the flow process has
    started and imported everything by then) and over its last tenth, and a series of
    (seconds, value) points every ~5 % of the run."""
    out: dict = {}
    span = max(t1 - t0, 1e-9)
    for key in ("flow_rss_mib", "flow_fds", "flow_threads", "worker_rss_mib", "worker_fds"):
        pts = [(s["t"], s[key]) for s in sampler.samples if key in s and t0 <= s["t"] <= t1]
        if not pts:
            continue
        early = [v for t, v in pts if t0 + span / 10 <= t <= t0 + span / 5] or [pts[0][1]]
        last = [v for t, v in pts if t >= t1 - span / 10] or [pts[-1][1]]
        every = max(1, len(pts) // 20)
        out[key] = {"samples": len(pts), "peak": round(max(v for _, v in pts), 1),
                    "second_tenth_median": round(statistics.median(early), 1),
                    "last_tenth_median": round(statistics.median(last), 1),
                    "series": [(round(t - t0), round(v, 1)) for t, v in pts[::every]]}
    return out


def sample_process(proc: subprocess.Popen, every: float = 1.0) -> list[tuple[int, float, int]]:
    """(seconds, RSS MiB, open descriptors) of ``proc`` every ``every`` s until it exits; ~25 points."""
    import psutil

    handle, t0, series = psutil.Process(proc.pid), time.monotonic(), []
    while proc.poll() is None:
        try:
            series.append((round(time.monotonic() - t0), round(handle.memory_info().rss / 2**20, 1), handle.num_fds()))
        except psutil.Error:
            break
        time.sleep(every)
    return series[:: max(1, len(series) // 25)]


def chromium_report(page: Path, tmp: Path) -> dict:
    """Load the archive report in headless Chromium; time load, sort and filter in the page."""
    js = """
    var nav = performance.getEntriesByType("navigation")[0];
    var table = document.getElementById("slides");
    var header = function (label) { return Array.from(table.tHead.rows[0].cells).filter(function (th) {
        return th.textContent.trim() === label; })[0]; };
    var timed = function (fn) { var t = performance.now(); fn(); void table.offsetHeight; return performance.now() - t; };
    var r = {rows: table.tBodies[0].rows.length, dom_content_loaded_ms: nav.domContentLoadedEventEnd,
             load_ms: nav.loadEventStart, bytes: nav.transferSize || nav.decodedBodySize};
    var t = performance.now(); void table.offsetHeight; r.first_layout_ms = performance.now() - t;
    t = performance.now(); header("time (s)").click(); r.sort_time_script_only_ms = performance.now() - t;
    r.sort_time_ms = r.sort_time_script_only_ms + timed(function () {});
    var sorts = [];
    for (var i = 0; i < 6; i++) { sorts.push(timed(function () { header("score").click(); })); }
    sorts.sort(function (a, b) { return a - b; });
    r.sort_score_ms = sorts[0]; r.sort_score_median_ms = (sorts[2] + sorts[3]) / 2; r.sort_score_max_ms = sorts[5];
    r.sort_name_ms = timed(function () { header("slide").click(); });
    var status = document.getElementById("status-filter");
    r.filter_failed_ms = timed(function () { status.value = "failed"; status.dispatchEvent(new Event("change")); });
    r.failed_visible = Array.from(table.tBodies[0].rows).filter(function (x) { return !x.hidden; }).length;
    r.filter_clear_ms = timed(function () { status.value = ""; status.dispatchEvent(new Event("change")); });
    var text = document.getElementById("filter");
    r.filter_text_ms = timed(function () { text.value = "slide-0001"; text.dispatchEvent(new Event("input")); });
    return r;
    """
    try:
        result = probe_in_chromium(page, js, tmp / "chromium-profile", tuple(CHROMIUM_FLAGS))
    except RuntimeError as exc:
        return {"error": str(exc)[-1000:]}
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    result["html_bytes"] = page.stat().st_size
    return result


def report_at_rows(rows: list[dict], n: int, out: Path) -> Path:
    """An archive report of ``n`` rows made from a run's real rows, cycled under new slide
    names (the same mix of ok and failed slides, scores, links and errors)."""
    from wsipipe.outputs.report import ARCHIVE_REPORT_NAME, write_archive_report

    many = []
    for i in range(n):
        row = dict(rows[i % len(rows)])
        stem = Path(row["slide"]).stem
        row["slide"] = str(Path(row["slide"]).with_name(f"{stem}-copy{i:05d}.svs"))
        row["name"] = f"{row.get('name') or stem}-copy{i:05d}"
        many.append(row)
    return write_archive_report(many, out / f"rows{n}-{ARCHIVE_REPORT_NAME}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--width", type=int, default=2048, help="slides are WIDTH x 3/4 WIDTH px at 0.5 µm/px")
    ap.add_argument("--subset", type=int, default=40, help="slides of the wsipipe-run vs deployment comparison")
    ap.add_argument("--in-flight", type=int, default=2, help="orchestration.slides_in_flight")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsipipe-archive-bench"))
    ap.add_argument("--no-kill", action="store_true", help="skip the kill test")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--report-rows", type=int, default=1000,
                    help="also time the archive report at this many rows (the run's rows, cycled)")
    ap.add_argument("--report-only", type=Path, default=None,
                    help="only time the report built from OUT/archive-results.json of an earlier run")
    args = ap.parse_args()
    if args.report_only:
        rows = json.loads((args.report_only / "archive-results.json").read_text())
        page = report_at_rows(rows, args.report_rows, args.report_only)
        print(json.dumps(chromium_report(page, args.report_only), indent=2))
        return

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"n": args.n, "slide_px": [args.width, args.width * 3 // 4], "mpp": 0.5,
                    "slides_in_flight": args.in_flight, "cores": os.cpu_count()}
    say(f"generating {args.n} slides in {work / 'slides'}")
    archive = make_archive(work / "slides", args.n, args.width, args.width * 3 // 4, processes=2)
    result["archive"] = {"good": len(archive.good), "corrupt": len(archive.corrupt), "cached": archive.cached,
                         "generate_s": round(archive.generate_s, 1)}
    model = tiny_model(work / "resnet18.safetensors")
    config = work / "bench.yaml"
    config.write_text(json.dumps({"tile": {"mpp": 1.0, "patch_size": 64}, "dask": {"num_workers": 1},
                                  "orchestration": {"slides_in_flight": args.in_flight}}))
    step = max(1, len(archive.slides) // args.subset)
    subset = archive.slides[::step][: args.subset]
    manifest = work / "subset.csv"
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows([["slide"], *[[str(s)] for s in subset]])
    for name in ("out-full", "out-killed", "out-subset-deploy", "out-subset-run", "prefect"):
        shutil.rmtree(work / name, ignore_errors=True)
    home = work / "prefect"
    home.mkdir()

    t = time.perf_counter()
    server, env = start_server_retrying(home)
    worker = None
    try:
        worker = deploy_and_start_worker(env, home)
        result["setup_s"] = round(time.perf_counter() - t, 1)

        def deploy(source: Path, out: Path) -> tuple[str, dict, float]:
            params = {"archive": str(source), "out": str(out), "model": str(model), "config": str(config),
                      "overrides": {}}
            t0 = time.perf_counter()
            run_id = submit_deployment(env, params)
            run = wait_flow_run(env, run_id, args.timeout)
            return run_id, run, round(time.perf_counter() - t0, 2)

        # 1. Overhead on the subset: deployment run, then `wsipipe run`, same slides and config.
        say(f"subset of {len(subset)}: deployment run")
        sub_id, sub_run, sub_deploy_s = deploy(manifest, work / "out-subset-deploy")
        say(f"subset: wsipipe run ({sub_deploy_s} s for the deployment run)")
        t0 = time.perf_counter()
        cli = subprocess.Popen([str(BIN / "wsipipe"), "run", *map(str, subset), "--model", str(model), "-c",
                                str(config), "--out", str(work / "out-subset-run")], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli_memory = sample_process(cli)
        sub_run_s = round(time.perf_counter() - t0, 2)
        result["subset"] = {
            "slides": len(subset), "deployment_run_s": sub_deploy_s, "flow_run_server_s": run_seconds(sub_run),
            "wsipipe_run_s": sub_run_s,
            "overhead_per_slide_s": round((sub_deploy_s - sub_run_s) / len(subset), 3),
            "ratio": round(sub_deploy_s / sub_run_s, 3),
            # Split: once per run (submission -> worker -> new flow process -> running), and
            # per slide inside the flow (its tasks, states, logs, artifact vs `wsipipe run`).
            "start_latency_s": round(sub_deploy_s - run_seconds(sub_run), 2),
            "in_flow_overhead_per_slide_s": round((run_seconds(sub_run) - sub_run_s) / len(subset), 3),
            "wsipipe_run_rss_mib_fds": cli_memory,
        }
        say("subset", json.dumps(result["subset"]))

        # 2. The whole archive, sampled.
        say(f"full archive: {len(archive.slides)} slides")
        with Sampler(worker.pid, every=1.0) as sampler:
            t0 = time.monotonic()
            full_id, full_run, full_s = deploy(archive.folder, work / "out-full")
            t1 = time.monotonic()
        rows = json.loads((work / "out-full" / "archive-results.json").read_text())
        statuses = [r["status"] for r in rows]
        result["full"] = {
            "deployment_run_s": full_s, "flow_run_server_s": run_seconds(full_run),
            "per_slide_s": round(full_s / len(archive.slides), 3),
            "state": full_run["state"]["type"], "message": full_run["state"]["message"],
            "ok": statuses.count("ok"), "failed": statuses.count("failed"), "skipped": statuses.count("skipped"),
            "wsipipe_run_per_slide_s": round(sub_run_s / len(subset), 3),
            "overhead_per_slide_s": round(full_s / len(archive.slides) - sub_run_s / len(subset), 3),
            "start_latency_s": round(full_s - run_seconds(full_run), 2),
            "processes": profile(sampler, t0, t1),
            "task_runs": count(env, "task_runs", [full_id]),
            "artifacts": count(env, "artifacts", [full_id]),
            "log_lines": count(env, "logs", [full_id]),
        }
        say("full", json.dumps(result["full"]))

        # 3. The same archive again: nothing new.
        say("second run: nothing new")
        again_id, again_run, again_s = deploy(archive.folder, work / "out-full")
        result["nothing_new"] = {"deployment_run_s": again_s, "message": again_run["state"]["message"],
                                 "task_runs": count(env, "task_runs", [again_id]),
                                 "artifacts": count(env, "artifacts", [again_id])}
        say("nothing new", json.dumps(result["nothing_new"]))

        # 4. The report in Chromium.
        result["report"] = chromium_report(work / "out-full" / "archive-report.html", work)
        say("report", json.dumps(result["report"]))
        page = report_at_rows(rows, args.report_rows, work / "out-full")
        result["report_at_rows"] = chromium_report(page, work)
        say(f"report at {args.report_rows} rows", json.dumps(result["report_at_rows"]))

        # 5. The kill test.
        if not args.no_kill:
            out = work / "out-killed"
            params = {"archive": str(archive.folder), "out": str(out), "model": str(model), "config": str(config),
                      "overrides": {}}
            t0 = time.perf_counter()
            killed_id = submit_deployment(env, params)
            done_before = kill_mid_run(env, worker, killed_id, out, after_done=len(archive.good) // 3,
                                       timeout=args.timeout)
            killed_at = round(time.perf_counter() - t0, 1)
            cut = interrupted(archive, out)
            say(f"killed worker and flow after {killed_at} s, {len(done_before)} slides done")
            worker = start_worker(env, home / "worker.log")
            rerun_id = submit_deployment(env, params)
            rerun = wait_flow_run(env, rerun_id, args.timeout)
            krows = json.loads((out / "archive-results.json").read_text())
            worker_log = (home / "worker.log").read_text(errors="replace")
            result["kill"] = {
                "killed_after_s": killed_at, "done_at_kill": len(done_before), "cut_by_kill": [p.name for p in cut],
                "rerun_s": round(time.perf_counter() - t0 - killed_at, 1),
                "rerun_message": rerun["state"]["message"],
                "killed_run_state": _api(env, f"/flow_runs/{killed_id}")["state"]["type"],
                "exactly_once_problems": check_exactly_once(archive, out, krows, done_before),
                "differences_from_uninterrupted": compare_outputs(work / "out-full", out, archive.good),
                "tracebacks_in_worker_log": worker_log.count("Traceback"),
            }
            say("kill", json.dumps(result["kill"]))
        db = home / "prefect.db"
        result["prefect_db_mib"] = round(sum(p.stat().st_size for p in home.glob("prefect.db*")) / 2**20, 1)
        result["prefect_db_file"] = str(db)
    finally:
        _stop(worker)
        _stop(server)

    # Targets: overhead ≤ 0.5 s/slide and ≤ 5 % of a 100k² slide's processing (BENCHMARKS.md:
    # 633 s end to end for one 100 000² slide at 0.5 µm/px on this machine's 2 cores).
    overhead = max(result["subset"]["overhead_per_slide_s"], result["full"]["overhead_per_slide_s"])
    result["targets"] = {"overhead_per_slide_s": overhead, "overhead_vs_100k_slide_pct": round(100 * overhead / 633, 2),
                         "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    write_results("archive_scale", result)


if __name__ == "__main__":
    main()
