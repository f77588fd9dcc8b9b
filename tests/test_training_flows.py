"""The training-side Prefect flows run under Prefect (ephemeral mode, offline) and do the library's work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsipipe.tiles import store

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from flows.training import augment_flow
state = augment_flow(sys.argv[1], sys.argv[2], copies=2, preview=sys.argv[3], samples=3, return_state=True)
print(json.dumps({"type": state.type.value, "result": state.result()}))
"""


@pytest.mark.timeout(300)
def test_augment_flow_runs_under_prefect(labelled_slides, tmp_path):
    src = labelled_slides["stores"][0]
    out, preview = tmp_path / "aug.zarr", tmp_path / "preview.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(out), str(preview)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["type"] == "COMPLETED"
    n = store.open_store(src)["patches"].shape[0]
    augmented = store.open_store(out)
    assert augmented["patches"].shape[0] == 2 * n and augmented["patches"].dtype == np.uint8
    assert not np.array_equal(augmented["patches"][:n], store.open_store(src)["patches"][:])  # really augmented
    assert preview.is_file() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "prefect-home").is_dir()  # the run went through Prefect, in its own home
