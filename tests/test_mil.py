"""Patch embeddings in the store and slide-level attention MIL: features equal the encoder's output,
embedding resumes after kill -9 to the same features, MIL learns tumor present/absent from slide
labels alone, bad label files are one-line errors, and `wsipipe run --mil` writes the attention
map, summary.json's `mil` and a report that shows it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsipipe.config import load_config
from wsipipe.errors import TrainingDataError
from wsipipe.learn.encoders import load_encoder_spec
from wsipipe.models.embed import embed_store, read_features
from wsipipe.models.inference import to_tensor
from wsipipe.models.model import build_model, save_weights
from wsipipe.slides.synth import make_layout, write_synthetic_slide
from wsipipe.tiles import store
from wsipipe.tiles.tiling import tile_slide

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"tile.mpp": 2.0, "tile.patch_size": 64, "tile.chunk_patches": 8, "inference.device": "cpu",
            "inference.precision": "fp32", "inference.batch_size": 8, "dask.num_workers": 1,
            "export.ome_zarr": False, "mil.epochs": 25}
N_SLIDES = 8


def _slide(path: Path, seed: int, n_tumor: int):
    """A 1.5 x 1.1 mm generated slide with one tissue piece; its own layout per seed but shared
    textures (the texture bank is cached by seed and is most of a small slide's generation time)."""
    layout = make_layout(1500, 1100, 1.0, seed, n_tissue=1, n_tumor=n_tumor)
    return write_synthetic_slide(path, 1500, 1100, mpp=1.0, seed=7, layout=layout)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, one_torch_thread):
    """Eight generated slides, the odd ones with a planted tumor, tiled at 2 µm/px into 64-px patches
    and embedded by a randomly initialised ResNet18 saved as a classifier weights file."""
    root = tmp_path_factory.mktemp("mil")
    cfg = load_config(None, SETTINGS)
    torch.manual_seed(0)
    weights = root / "encoder.safetensors"
    save_weights(build_model("resnet18", 1), weights, "resnet18", 1)
    encoder, identity = load_encoder_spec(weights)
    paths, stores, labels = [], [], []
    for i in range(N_SLIDES):
        tumor = i % 2
        s = _slide(root / f"s{i}.svs", 200 + i, tumor)
        out = root / f"s{i}.zarr"
        tile_slide(s.path, out, cfg)
        embed_store(out, encoder, identity, cfg.inference)
        paths.append(s.path)
        stores.append(out)
        labels.append(tumor)
    labels_csv = root / "labels.csv"
    labels_csv.write_text("slide,label\n" + "".join(f"s{i},{'tumor' if y else 'normal'}\n" for i, y in enumerate(labels)))
    return {"root": root, "cfg": cfg, "weights": weights, "encoder": encoder, "identity": identity,
            "paths": paths, "stores": stores, "labels": labels, "csv": labels_csv}


@pytest.fixture(scope="module")
def trained(slides):
    from wsipipe.learn.mil import train_mil

    out = slides["root"] / "mil-model"
    card = train_mil(slides["stores"], slides["csv"], out, slides["cfg"].mil)
    return {"dir": out, "card": card}


@pytest.mark.slow
def test_n_tumor_zero_gives_a_tumor_free_slide(slides):
    import json

    def tumors(path):
        features = json.loads(path.with_suffix(".geojson").read_text())["features"]
        return [f for f in features if f["properties"]["classification"]["name"] == "Tumor"]

    assert tumors(slides["paths"][0]) == [] and tumors(slides["paths"][1])


@pytest.mark.slow
def test_features_equal_the_encoders_output_on_the_same_patches(slides):
    path = slides["stores"][1]
    group = store.open_store(path)
    patches = np.asarray(store.array(group, store.PATCHES)[:])
    with torch.inference_mode():
        expected = slides["encoder"](to_tensor(patches, torch.device("cpu"))).float().numpy()
    features = read_features(path, slides["identity"])
    assert features.shape == expected.shape == (len(patches), 512)
    np.testing.assert_allclose(features, expected.astype(np.float16).astype(np.float32), rtol=1e-2, atol=1e-3)
    entry = store.stage_entry(group, store.STAGE_EMBED)
    assert entry["complete"] and entry["identity"]["encoder"] == {k: slides["identity"][k] for k in ("kind", "arch", "sha256", "dim")}
    assert store.array(group, store.FEATURES).chunks[0] == store.array(group, store.PATCHES).chunks[0]
    # Same encoder again: left as is; another encoder: recomputed.
    assert embed_store(path, slides["encoder"], slides["identity"], slides["cfg"].inference)["skipped"]
    torch.manual_seed(1)
    other = slides["root"] / "other.safetensors"
    save_weights(build_model("resnet18", 1), other, "resnet18", 1)
    enc2, id2 = load_encoder_spec("torchvision:resnet18", other)
    copy = slides["root"] / "copy.zarr"
    shutil.copytree(path, copy)
    stats = embed_store(copy, enc2, id2, slides["cfg"].inference)
    assert not stats["skipped"] and stats["computed"] == len(patches)
    assert id2["kind"] == "torchvision" and not np.allclose(read_features(copy), features)
    # A store without stored patches: read from the slide, the same features.
    fused = slides["root"] / "fused.zarr"
    cfg = load_config(None, {**SETTINGS, "tile.store_patches": False})
    tile_slide(slides["paths"][1], fused, cfg)
    embed_store(fused, slides["encoder"], slides["identity"], cfg.inference)
    assert np.array_equal(read_features(fused), features)
    # The command: same features as the library call, from the classifier file.
    from typer.testing import CliRunner

    from wsipipe.cli import app

    again = slides["root"] / "again.zarr"
    shutil.copytree(path, again)
    shutil.rmtree(again / store.FEATURES)
    store.set_stage(store.open_store(again, mode="r+"), store.STAGE_EMBED, {}, False)
    result = CliRunner().invoke(app, ["embed", str(again), "--encoder", str(slides["weights"]), "--device", "cpu",
                                      "--batch-size", "8", "--set", "inference.precision=fp32"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_features(again, slides["identity"]), features)


KILLED_RUN = """
import sys, time, torch
from torch import nn
torch.set_num_threads(1)
from wsipipe.config import load_config
from wsipipe.learn.encoders import load_encoder_spec
from wsipipe.models.embed import embed_store

class Slow(nn.Module):  # the same encoder, slowed so that the kill lands mid-run
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        time.sleep(0.3)
        return self.inner(x)

encoder, identity = load_encoder_spec(sys.argv[2])
cfg = load_config(None, {"inference.device": "cpu", "inference.precision": "fp32", "inference.batch_size": 8,
                         "inference.prefetch_batches": 1})
embed_store(sys.argv[1], Slow(encoder), identity, cfg.inference)
"""


@pytest.mark.slow
def test_embedding_resumes_after_kill_9_with_identical_features(slides, tmp_path):
    source = slides["root"] / "s3.svs"
    cfg = slides["cfg"]
    tiled = tmp_path / "tiled.zarr"
    tile_slide(source, tiled, cfg)
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    shutil.copytree(tiled, killed)
    shutil.copytree(tiled, reference)
    n_chunks = len(store.chunk_slices(int(store.array(store.open_store(tiled), store.PATCHES).shape[0]), 8))
    assert n_chunks >= 4
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILLED_RUN))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(slides["weights"])], env=env)
    flags_dir = killed / store.progress_name(store.STAGE_EMBED) / "c"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if flags_dir.is_dir() and len(list(flags_dir.iterdir())) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the embedding finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    flags = store.array(store.open_store(killed), store.progress_name(store.STAGE_EMBED))
    pending = store.pending_chunks(flags)
    assert 0 < len(pending) < n_chunks
    resumed = embed_store(killed, slides["encoder"], slides["identity"], cfg.inference)
    assert resumed["computed"] < resumed["n"]
    embed_store(reference, slides["encoder"], slides["identity"], cfg.inference)
    a, b = read_features(killed, slides["identity"]), read_features(reference, slides["identity"])
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_mil_learns_tumor_present_from_slide_labels(slides, trained, tmp_path):
    from wsipipe.learn.registry import register
    from wsipipe.models.mil import load_mil, predict

    card = trained["card"]
    cv = card["cv"]
    assert cv["folds"] == 5 and cv["split_by"] == "slide" and len(cv["out_of_fold"]) == N_SLIDES
    assert cv["held_out_auc"] >= 0.8, cv  # chance is 0.5
    assert card["kind"] == "mil" and card["feature_dim"] == 512 and card["classes"] == ["normal", "tumor"]
    assert card["encoder"]["sha256"] == slides["identity"]["sha256"] and (trained["dir"] / card["encoder"]["weights"]).is_file()
    assert len(card["training_slides"]) == N_SLIDES and card["mpp"] == 2.0 and card["patch_size"] == 64
    model, loaded = load_mil(trained["dir"])
    probs = [predict(model, read_features(s)).probability for s in slides["stores"]]
    labels = np.array(slides["labels"])
    assert min(np.array(probs)[labels == 1]) > max(np.array(probs)[labels == 0])
    attention = predict(model, read_features(slides["stores"][1])).attention
    assert attention.shape[0] == read_features(slides["stores"][1]).shape[0] and abs(float(attention.sum()) - 1) < 1e-4
    assert register(tmp_path / "registry", trained["dir"]) == "v0001"  # the registry takes MIL folders as they are


def test_patient_folds_keep_a_patients_slides_together():
    from wsipipe.learn.mil import folds_by_group

    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    groups = ["p1", "p1", "p2", "p2", "p3", "p4", "p5", "p6"]
    folds = folds_by_group(labels, groups, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(8))
    for test in folds:
        inside = {groups[i] for i in test}
        assert all(groups[j] not in inside for j in set(range(8)) - set(test.tolist()))


@pytest.mark.slow
def test_bad_label_files_name_the_csv_and_row(slides, tmp_path):
    from typer.testing import CliRunner

    from wsipipe.cli import app
    from wsipipe.learn.mil import train_mil

    stores = slides["stores"]
    cases = {
        "no_label.csv": ("slide,class\ns0,1\n", "no 'label' column"),
        "unknown.csv": ("slide,label\ns0,0\nnope,1\n", "row 3: slide 'nope' matches none"),
        "one_class.csv": ("slide,label\ns0,1\ns1,1\n", "two classes"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(TrainingDataError, match=message) as info:
            train_mil(stores, path, tmp_path / "out")
        assert info.value.path == path
    bare = tmp_path / "bare.zarr"  # tiled, never embedded
    tile_slide(slides["paths"][0], bare, slides["cfg"])
    path = tmp_path / "no_features.csv"
    path.write_text(f"slide,label\ns1,1\n{bare},0\n")
    result = CliRunner().invoke(app, ["mil", "train", str(stores[1]), str(bare), "--labels", str(path), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "row 3" in lines[0] and "no patch features" in lines[0], result.output


@pytest.mark.slow
def test_run_with_mil_writes_attention_summary_and_report(slides, trained, tmp_path):
    import json

    from tests.test_report import probe
    from wsipipe.run.pipeline import run_slide

    slide = _slide(tmp_path / "new.svs", 299, 1)
    cfg = load_config(None, {**SETTINGS, "mil.model": str(trained["dir"]), "export.ome_zarr": True})
    result = run_slide(slide.path, tmp_path / "out", cfg, slides["weights"])
    out = result.out_dir
    summary = json.loads((out / "summary.json").read_text())
    mil = summary["mil"]
    assert set(mil) >= {"probability", "label", "model_sha256", "encoder"}
    assert mil["model_sha256"] == trained["card"]["weights_sha256"] and mil["encoder"]["dim"] == 512
    assert mil["label"] in ("normal", "tumor") and 0.0 <= mil["probability"] <= 1.0
    assert (out / "attention.png").stat().st_size > 1000 and np.load(out / "attention.npy").ndim == 2
    import zarr

    ome = zarr.open_group(str(out / "attention.ome.zarr"), mode="r")
    assert ome.attrs["ome"]["multiscales"][0]["name"] == "attention"
    assert ome["0"].shape == np.load(out / "heatmap.npy").shape == np.load(out / "attention.npy").shape
    group = store.open_store(out / "patches.zarr")
    assert store.is_complete(group, store.STAGE_EMBED)
    found = probe(out / "report.html", tmp_path, """
        var img = document.getElementById("attention"), heat = document.getElementById("mil-heatmap");
        return {loaded: img.complete && img.naturalWidth > 0, heat: heat !== null && heat.naturalWidth > 0,
                p: document.getElementById("mil-probability").textContent.trim(),
                label: document.getElementById("mil-label").textContent.trim()};""")
    assert found["loaded"] and found["heat"] and found["label"] == mil["label"]
    assert float(found["p"]) == pytest.approx(mil["probability"], abs=1e-4)
    # A rerun finds everything done: nothing rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "summary.json", out / "attention.png")}
    again = run_slide(slide.path, tmp_path / "out", cfg, slides["weights"])
    assert again.status == "skipped" and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.slow
def test_encoder_specs_load_local_weights_only(tmp_path, one_torch_thread):
    from safetensors.torch import save_file

    from wsipipe.errors import ModelLoadError
    from wsipipe.learn.pretrain import FORMAT, build_encoder

    body, dim = build_encoder("resnet18")
    folder = tmp_path / "simclr"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in body.state_dict().items()}, str(folder / "encoder.safetensors"),
              metadata={"format": FORMAT, "arch": "resnet18"})
    _, identity = load_encoder_spec(folder)
    assert identity["kind"] == "pretrain" and identity["dim"] == dim == 512
    # A timm model filled from a classifier's file: its head is dropped, the pooled features kept.
    import timm

    head = timm.create_model("resnet18", pretrained=False, num_classes=3)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    _, identity = load_encoder_spec("timm:resnet18", tmp_path / "timm.safetensors")
    assert identity["kind"] == "timm" and identity["dim"] == 512
    with pytest.raises(ModelLoadError, match="--weights"):
        load_encoder_spec("torchvision:resnet18")
    with pytest.raises(ModelLoadError, match="encoder not found"):
        load_encoder_spec(tmp_path / "nothing.safetensors")
