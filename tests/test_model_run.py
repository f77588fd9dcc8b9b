"""Inference runs a model as its card says: normalisation, input size, stain normalisation, class
columns, resolution and patch size. Real Zarr stores on disk, real slides, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from wsipipe.config import InferenceConfig, StitchConfig, load_config
from wsipipe.errors import ConfigError
from wsipipe.models.card import ModelCard, Normalisation
from wsipipe.models.carded import with_model_card
from wsipipe.models.identity import ModelInfo, file_sha256, infer_identity
from wsipipe.models.inference import infer_store, predict_patches
from wsipipe.models.stain import fit_stain_normaliser
from wsipipe.tiles import store

N, SIZE, CHUNK = 20, 32, 8
CPU = torch.device("cpu")
FP32 = InferenceConfig(batch_size=5, precision="fp32", device="cpu", prefetch_batches=2)
CMU = "cmu-1-small-region.svs"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(nn.Module):
    """A small conv net whose output depends on every input pixel's colour and position."""

    def __init__(self, num_classes: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 5, stride=2)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def h_and_e_patches(slides_dir: Path, n: int = N, size: int = SIZE) -> np.ndarray:
    """Real H&E pixels: ``n`` patches cut from the middle of the CMU slide."""
    import openslide

    with openslide.OpenSlide(str(slides_dir / CMU)) as s:
        side = size * int(np.ceil(np.sqrt(n)))
        region = np.asarray(s.read_region((900, 1200), 0, (side, side)).convert("RGB"))
    per = side // size
    tiles = [region[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(per) for c in range(per)]
    return np.ascontiguousarray(np.stack(tiles[:n]))


def make_store(path: Path, patches: np.ndarray) -> Path:
    group = zarr.open_group(str(path), mode="w")
    group.create_array("patches", data=patches, chunks=(CHUNK, *patches.shape[1:]))
    group.create_array("coords", data=np.arange(2 * len(patches), dtype=np.int64).reshape(-1, 2), chunks=(len(patches), 2))
    store.set_stage(group, "tile", {"slide": "hand-built"}, True, n_patches=len(patches))
    return path


def info_for(tmp_path: Path, num_classes: int = 1, **card) -> ModelInfo:
    weights = tmp_path / f"tiny-{num_classes}.bin"
    weights.write_bytes(f"tiny weights {num_classes}".encode())
    sha = file_sha256(weights)
    return ModelInfo("tiny", num_classes, sha, weights,
                     card=ModelCard(arch="tiny", num_classes=num_classes, weights_sha256=sha, **card) if card else None)


def test_card_normalisation_and_resize_are_the_input(tmp_path, slides_dir):
    patches = h_and_e_patches(slides_dir)
    path = make_store(tmp_path / "s.zarr", patches)
    model = Tiny().eval()
    mean, std = (0.7, 0.6, 0.75), (0.15, 0.2, 0.1)
    card_kw = {"normalisation": Normalisation(mean=mean, std=std, resize=48)}
    info = info_for(tmp_path, **card_kw)
    infer_store(path, model, info, FP32)
    got = np.asarray(store.open_store(path)["probabilities"][:])

    # The same arithmetic through predict_patches, batch for batch.
    np.testing.assert_array_equal(got, predict_patches(model, patches, CPU, None, batch_size=5, card=info.card))
    # And by hand: (resize(rgb) / 255 - mean) / std, bilinear with antialiasing.
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        manual = torch.sigmoid(model(x)[:, 0]).numpy()
    np.testing.assert_allclose(got, manual, rtol=0, atol=2e-6)
    # Not what the default input gives.
    assert np.abs(got - predict_patches(model, patches, CPU, None, batch_size=5)).max() > 1e-3


def test_card_stain_normaliser_changes_the_input_as_apply_does(tmp_path, slides_dir):
    patches = h_and_e_patches(slides_dir)
    # A reference with another stain look: the same tissue, red and blue channels shifted.
    reference = np.clip(patches.astype(np.int16) + np.array([-30, 10, 25], np.int16), 0, 255).astype(np.uint8)
    norm = fit_stain_normaliser("macenko", reference)
    normalised = norm.apply(patches)
    assert np.abs(normalised.astype(np.int16) - patches).mean() > 2  # it does change the input

    path = make_store(tmp_path / "s.zarr", patches)
    model = Tiny(seed=1).eval()
    info = info_for(tmp_path, stain_normalisation=norm.to_dict())
    infer_store(path, model, info, FP32)
    got = np.asarray(store.open_store(path)["probabilities"][:])
    np.testing.assert_array_equal(got, predict_patches(model, normalised, CPU, None, batch_size=5))
    np.testing.assert_array_equal(got, predict_patches(model, patches, CPU, None, batch_size=5, card=info.card))

    broken = info_for(tmp_path, stain_normalisation={"method": "macenko", "params": {}})
    with pytest.raises(Exception, match="stain_normalisation cannot be applied"):
        infer_store(make_store(tmp_path / "t.zarr", patches), model, broken, FP32)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_input_matches_cpu(tmp_path, slides_dir):
    """On CUDA the card's normalisation and resize run on the device: the same input as on CPU."""
    patches = h_and_e_patches(slides_dir)
    path = make_store(tmp_path / "s.zarr", patches)
    model = Tiny(seed=3).eval()
    norm = fit_stain_normaliser("reinhard", patches[:4])
    info = info_for(tmp_path, normalisation=Normalisation(mean=(0.6, 0.5, 0.7), std=(0.2, 0.25, 0.15), resize=24),
                    stain_normalisation=norm.to_dict())
    want = predict_patches(model, patches, CPU, None, batch_size=5, card=info.card)
    infer_store(path, model, info, InferenceConfig(batch_size=5, precision="fp32", device="cuda"))
    np.testing.assert_allclose(store.open_store(path)["probabilities"][:], want, atol=1e-4)


def test_infer_identity_follows_the_card_input_and_a_changed_card_recomputes(tmp_path, slides_dir):
    path = make_store(tmp_path / "s.zarr", h_and_e_patches(slides_dir, n=8))
    group = store.open_store(path)
    bare = info_for(tmp_path)
    ids = {
        "bare": infer_identity(group, bare),
        "default card": infer_identity(group, info_for(tmp_path, training_data="somewhere")),
        "mean": infer_identity(group, info_for(tmp_path, normalisation=Normalisation(mean=(0.5, 0.5, 0.5)))),
        "std": infer_identity(group, info_for(tmp_path, normalisation=Normalisation(std=(0.5, 0.5, 0.5)))),
        "resize": infer_identity(group, info_for(tmp_path, normalisation=Normalisation(resize=64))),
        "stain": infer_identity(group, info_for(tmp_path, stain_normalisation={"method": "reinhard", "params": {
            "mean": [70.0, 10.0, -10.0], "std": [10.0, 5.0, 5.0]}})),
    }
    assert ids["bare"] == ids["default card"]  # no card and a card of the default input: same input
    others = [json.dumps(v, sort_keys=True) for k, v in ids.items() if k != "default card"]
    assert len(set(others)) == len(others)

    model = Tiny().eval()
    assert not infer_store(path, model, bare, FP32)["skipped"]
    assert infer_store(path, model, bare, FP32)["skipped"]
    changed = info_for(tmp_path, normalisation=Normalisation(resize=40))
    assert not infer_store(path, model, changed, FP32)["skipped"]

    # A card.json beside the weights (for these very weights) is followed without being attached.
    card = ModelCard(arch="tiny", num_classes=1, weights_sha256=bare.sha256, normalisation=Normalisation(resize=40))
    (bare.path.parent / "card.json").write_text(card.to_json())
    assert infer_identity(group, with_model_card(bare)) == infer_identity(group, changed)
    assert infer_store(path, model, bare, FP32)["skipped"]


def _tiled(tmp_path: Path, slides_dir: Path) -> Path:
    from wsipipe.tiles.tiling import tile_slide

    path = tmp_path / "cmu.zarr"
    tile_slide(slides_dir / CMU, path, load_config(None, {"tile.mpp": 2.0, "tile.patch_size": 64, "dask.num_workers": 1}))
    return path


@pytest.mark.slow
def test_class_columns_by_name_and_tumor_class(tmp_path, slides_dir):
    """A 3-class model whose tumor column is the middle one: the store names its columns, stitching
    reads the tumor one by name, stitch.tumor_class picks another, a wrong name lists them."""
    from wsipipe.outputs.report import _tumor_probabilities
    from wsipipe.outputs.stitch import stitch_store

    path = _tiled(tmp_path, slides_dir)
    info = info_for(tmp_path, 3, classes=["stroma", "tumor", "normal"])
    infer_store(path, Tiny(3, seed=2).eval(), info, FP32)
    group = store.open_store(path)
    probs = group["probabilities"]
    assert probs.attrs["classes"] == ["stroma", "tumor", "normal"] and probs.attrs["positive_class"] == "tumor"
    p = np.asarray(probs[:])

    summary = stitch_store(path, tmp_path / "out", StitchConfig(min_tumor_area_um2=0))
    assert summary["tumor_class"] == "tumor" and summary["classes"] == ["stroma", "tumor", "normal"]
    assert summary["slide_score"]["max"] == pytest.approx(float(p[:, 1].max()), abs=1e-6)
    np.testing.assert_array_equal(_tumor_probabilities(group, summary["config"]), p[:, 1])  # the report's choice

    other = stitch_store(path, tmp_path / "out2", StitchConfig(tumor_class="normal", min_tumor_area_um2=0))
    assert other["tumor_class"] == "normal" and other["config"]["tumor_class"] == "normal"
    assert other["slide_score"]["max"] == pytest.approx(float(p[:, 2].max()), abs=1e-6)
    np.testing.assert_array_equal(_tumor_probabilities(group, other["config"]), p[:, 2])

    with pytest.raises(ConfigError) as bad:
        stitch_store(path, tmp_path / "out3", StitchConfig(tumor_class="tumour"))
    assert "stitch.tumor_class='tumour' names no probability column (columns: stroma, tumor, normal)" in str(bad.value)
    assert "\n" not in str(bad.value) and not (tmp_path / "out3").exists()


# ------------------------------------------------------------------ the card's resolution, end to end


def _cli(*args):
    from typer.testing import CliRunner

    from wsipipe.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def carded_model(tmp_path_factory):
    """A torchvision ResNet18 (one logit) with a card.json beside it: trained at 1 µm/px, 64-px patches."""
    from wsipipe.models.model import build_model, save_weights

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    info = save_weights(build_model("resnet18", 1).eval(), root / "model.safetensors", "resnet18", 1)
    card = ModelCard(arch="resnet18", num_classes=1, classes=["normal", "tumor"], mpp=1.0, patch_size=64,
                     weights_sha256=info.sha256)
    (root / "card.json").write_text(card.to_json())
    return root / "model.safetensors"


RUN = ["--set", "dask.num_workers=1", "--set", "inference.device=cpu", "--set", "qc.report_patches=2",
       "--set", "export.ome_zarr=false"]


@pytest.mark.slow
def test_run_tiles_at_the_card_resolution_and_refuses_a_conflicting_mpp(tmp_path, slides_dir, carded_model):
    out = tmp_path / "out"
    res = _cli("run", slides_dir / CMU, "--model", carded_model, "--out", out, *RUN)
    assert res.exit_code == 0, res.output
    (slide_dir,) = out.iterdir()
    tile = store.meta(store.open_store(slide_dir / "patches.zarr"))["tile"]
    assert tile["mpp"] == pytest.approx(1.0, rel=0.05) and tile["patch_size"] == 64
    summary = json.loads((slide_dir / "summary.json").read_text())
    assert summary["tumor_class"] == "tumor" and summary["classes"] == ["tumor"]
    assert "model_card_overridden" not in [f["code"] for f in summary["qc"]["flags"]]
    # The done-check reads the card too: its class names are part of what the store was made with.
    res = _cli("run", slides_dir / CMU, "--model", carded_model, "--out", out, "--dry-run", *RUN)
    assert res.exit_code == 0 and res.stdout.startswith("would skip (up to date)"), res.output

    fresh = tmp_path / "fresh"
    res = _cli("run", slides_dir / CMU, "--model", carded_model, "--out", fresh, "--mpp", "0.5", *RUN)
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.splitlines()
    assert line.startswith(f"wsipipe error: {carded_model.parent / 'card.json'}: "), line
    assert "tile.mpp 1 (this run sets 0.5)" in line and "--force" in line, line
    assert not fresh.exists()  # refused before any work
    res = _cli("run", slides_dir / CMU, "--model", carded_model, "--out", fresh, "--set", "tile.patch_size=32", *RUN)
    assert res.exit_code == 2 and "tile.patch_size 64 (this run sets 32)" in res.stderr and not fresh.exists()


@pytest.mark.slow
def test_force_runs_at_the_given_mpp_and_flags_the_slide(tmp_path, slides_dir, carded_model):
    out = tmp_path / "out"
    res = _cli("run", slides_dir / CMU, "--model", carded_model, "--out", out, "--mpp", "2", "--force", *RUN)
    assert res.exit_code == 0, res.output
    (slide_dir,) = out.iterdir()
    group = store.open_store(slide_dir / "patches.zarr")
    assert store.meta(group)["tile"]["mpp"] == pytest.approx(2.0, rel=0.05)
    summary = json.loads((slide_dir / "summary.json").read_text())
    (flag,) = [f for f in summary["qc"]["flags"] if f["code"] == "model_card_overridden"]
    assert flag["severity"] == "review" and summary["qc"]["needs_review"]
    assert flag["values"]["tile.mpp"]["card"] == 1.0 and flag["values"]["tile.mpp"]["used"] == pytest.approx(2.0, rel=0.05)

    # wsipipe infer on that store with the same model: the same rule against the store's tiling.
    res = _cli("infer", slide_dir / "patches.zarr", "--model", carded_model, "--device", "cpu")
    assert res.exit_code == 2 and "tile.mpp 1 (the patches of" in res.stderr and "are 2)" in res.stderr, res.output
    assert str(carded_model.parent / "card.json") in res.stderr
    res = _cli("infer", slide_dir / "patches.zarr", "--model", carded_model, "--device", "cpu", "--force")
    assert res.exit_code == 0, res.output
