"""The training-side commands as a user meets them: real processes, files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from wsipipe.tiles import store

WSIPIPE = [sys.executable, "-m", "wsipipe.cli"]


def run(*args, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*WSIPIPE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_patches_augment_pretrain_and_registry_commands(labelled_slides, tmp_path):
    g = store.open_store(labelled_slides["stores"][0])
    for k, cls in enumerate(("ADI", "TUM")):  # a Kather-like folder
        (tmp_path / "kather" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(g["patches"][k * 3 + i]).save(tmp_path / "kather" / cls / f"{cls}-{i}.tif")
    res = run("patches", tmp_path / "kather", "--out", tmp_path / "kather.zarr")
    assert res.returncode == 0 and "6 patches" in res.stdout and "['ADI', 'TUM']" in res.stdout, res.stdout + res.stderr

    cfg = tmp_path / "small.yaml"
    cfg.write_text("pretrain: {arch: shufflenet_v2_x0_5, batch_size: 8, crop: 32, hidden_dim: 32, projection_dim: 16,"
                   " device: cpu, precision: fp32}\naugment: {jpeg_p: 0.5}\n")
    res = run("augment", tmp_path / "kather.zarr", "--out", tmp_path / "aug.zarr", "--preview", tmp_path / "grid.png",
              "--config", cfg)
    assert res.returncode == 0, res.stderr
    assert store.open_store(tmp_path / "aug.zarr")["patches"].shape == (6, 64, 64, 3)
    assert (tmp_path / "grid.png").stat().st_size > 0

    res = run("pretrain", tmp_path / "kather.zarr", labelled_slides["stores"][0], "--out", tmp_path / "enc",
              "--method", "byol", "--steps", "2", "--config", cfg)
    assert res.returncode == 0, res.stderr
    assert "loss" in res.stderr and "patches/s" in res.stderr  # the progress bar
    assert json.loads((tmp_path / "enc" / "checkpoint.json").read_text())["step"] == 2

    res = run("models", "promote", "v0007", "--registry", tmp_path / "models")
    assert res.returncode == 2 and "no model version 'v0007'" in res.stderr
