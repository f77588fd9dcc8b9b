"""bench/bench_peers.py cannot rot: on a small dense mosaic its wsipipe, naive-loop and
decode-bound measurements run and agree on the patch list; TIAToolbox's too where the peers
virtualenv (bench/.venv-peers, `make bench-peers`) exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"
TIA = "TIAToolbox SlidingWindowPatchExtractor"


def _bench(tmp_path: Path, *extra: str) -> dict:
    results = tmp_path / "peers.json"
    args = [sys.executable, str(ROOT / "bench" / "bench_peers.py"), "--size", "2048", "--slides", "dense",
            "--mpp", "0.5", "--work", str(tmp_path / "work"), "--results", str(results), *extra]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wsipipe tile" in res.stdout and "per CPU-second" in res.stdout
    return json.loads(results.read_text())


def _check_case(case: dict, variants: set[str]) -> None:
    assert set(case["variants"]) == variants
    n = case["patches"]
    assert n > 0
    for name, v in case["variants"].items():
        assert v["cpu_s"] > 0 and v["wall_s"] > 0 and v["process_cpu_s"] >= v["cpu_s"] * 0.99, name
        assert v["per_cpu_s"] == pytest.approx(v["patches"] / v["cpu_s"]), name
    # The references are measured over exactly the patches wsipipe kept.
    for name in ("wsipipe tile", "naive read_region loop", "decode bound"):
        assert case["variants"][name]["patches"] == n, name
    assert case["variants"]["decode bound"]["tiles"] > 0
    # A dense slide: most of it is tissue that wsipipe keeps.
    assert case["tissue_fraction_kept"] > 0.5
    assert case["ratios_per_cpu_s"]["wsipipe / decode bound"] > 0
    assert case["ratios_per_cpu_s"]["wsipipe / naive loop"] > 0


def test_wsipipe_naive_and_decode_bound(tmp_path):
    results = _bench(tmp_path, "--peers-python", "NONE")
    assert results["size"] == 2048 and results["tiatoolbox"] is False
    (case,) = results["cases"]
    assert case["mpp"] == 0.5 and case["slide"] == "peers-dense-2048.svs"
    _check_case(case, {"wsipipe tile", "naive read_region loop", "decode bound"})
    assert case["ratios_per_cpu_s"]["wsipipe / TIAToolbox"] is None


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="no peers virtualenv (make bench-peers creates it)")
def test_with_tiatoolbox(tmp_path):
    results = _bench(tmp_path)
    (case,) = results["cases"]
    _check_case(case, {"wsipipe tile", "naive read_region loop", "decode bound", TIA})
    # Its own tissue mask: a patch count of the same order as wsipipe's, not the same list.
    assert 0.5 * case["patches"] <= case["variants"][TIA]["patches"] <= 1.5 * case["patches"]
    assert case["ratios_per_cpu_s"]["wsipipe / TIAToolbox"] > 0
