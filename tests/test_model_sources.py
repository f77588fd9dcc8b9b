"""Every model source through one loader: timm architectures from safetensors and state dicts
(with the usual key prefixes), TorchScript files, torch.export programs and WSInfer model
folders, each with its card; their identities without torch; `wsipipe models card/export`.

Real torch, real files in tmp_path; small inputs (64 px for CNNs, 224 only where a ViT needs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from wsipipe.errors import ModelLoadError, ParameterError
from wsipipe.models.identity import weights_identity
from wsipipe.models.inference import predict_patches
from wsipipe.models.model import build_model, export_model, load_model, save_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _model(arch: str, k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, k).eval()
    with torch.no_grad():  # BatchNorm statistics other than the (0, 1) defaults, so a mix-up shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A torchvision resnet18 with two outputs and its safetensors file."""
    torch.set_num_threads(1)
    model = _model("resnet18", 2)
    path = tmp_path_factory.mktemp("resnet") / "model.safetensors"
    save_weights(model, path, "resnet18", 2, {"classes": json.dumps(["normal", "tumor"])})
    return model, path


@pytest.mark.parametrize(("arch", "size"), [("timm:vit_tiny_patch16_224", 224), ("timm:resnet18.a1_in1k", 64)])
def test_timm_safetensors_give_the_eager_probabilities(tmp_path, arch, size):
    model = _model(arch, 3)
    path = tmp_path / "w.safetensors"
    info = save_weights(model, path, arch, 3)
    patches = _patches(2, size)
    expected = predict_patches(model, patches)

    loaded, got = load_model(path)  # arch and classes from the file's metadata
    assert (got.arch, got.num_classes, got.sha256) == (arch, 3, info.sha256)
    assert got.card is not None and got.card.source == "timm" and got.card.arch == arch
    np.testing.assert_array_equal(predict_patches(loaded, patches), expected)
    assert weights_identity(path) == got


@pytest.mark.parametrize("prefix", ["model.", "module.", "backbone.", "module.model.", "_orig_mod."])
def test_wrapped_state_dict_layouts_load(tmp_path, prefix):
    model = _model("timm:resnet18", 2)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint's wrapper dict too
    loaded, info = load_model(path, "timm:resnet18")
    assert (info.arch, info.num_classes) == ("timm:resnet18", 2)  # classes from the head's rows
    patches = _patches(2, 64)
    np.testing.assert_array_equal(predict_patches(loaded, patches), predict_patches(model, patches))


def test_state_dict_of_another_architecture_names_the_keys(tmp_path, resnet):
    model, _ = resnet
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelLoadError) as err:
        load_model(path, "timm:vit_tiny_patch16_224")
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert "timm:vit_tiny_patch16_224" in msg and "missing keys (e.g. cls_token" in msg
    assert "unexpected keys (e.g. conv1.weight" in msg

    with pytest.raises(ModelLoadError, match=r"shape mismatches \(e\.g\. fc\.weight: file \(2, 512\), model \(3, 512\)"):
        load_model(path, "resnet18", 3)


def test_unknown_timm_name_suggests_close_ones(tmp_path, resnet):
    with pytest.raises(ParameterError, match=r"unknown timm architecture 'vit_tiny_patch16'.*vit_tiny_patch16_224"):
        build_model("timm:vit_tiny_patch16", 2)
    with pytest.raises(ParameterError, match="hub models are downloaded once"):
        build_model("timm:hf-hub:someone/model", 2)
    with pytest.raises(ParameterError, match="give timm:convnext_atto"):
        build_model("convnext_atto", 2)
    _, path = resnet
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: unknown timm architecture 'resnet_18'"):
        load_model(path, "timm:resnet_18")


@pytest.mark.parametrize(("fmt", "name"), [("torchscript", "tumor.pt"), ("export", "tumor.pt2")])
def test_torchscript_and_export_give_the_eager_probabilities(tmp_path, resnet, fmt, name):
    model, weights = resnet
    out = tmp_path / fmt / name
    written = export_model(weights, fmt, out)
    card = json.loads((out.parent / "card.json").read_text())
    assert card["source"] == card["arch"] == fmt and card["weights_sha256"] == written.sha256
    assert card["classes"] == ["normal", "tumor"] and card["exported_from"]["arch"] == "resnet18"

    loaded, info = load_model(out)
    assert (info.arch, info.num_classes, info.sha256) == (fmt, 2, written.sha256)
    assert info.card is not None and info.card.classes == ["normal", "tumor"]
    patches = _patches(3, 64)
    np.testing.assert_array_equal(predict_patches(loaded, patches), predict_patches(model, patches))
    assert weights_identity(out) == info
    assert weights_identity(out.parent) == info == load_model(out.parent)[1]  # the folder with its card

    (out.parent / "card.json").unlink()  # alone: outputs counted by a forward pass, a card made up
    _, bare = load_model(out)
    assert bare.num_classes == 2 and bare.card is not None and bare.card.source == fmt
    assert weights_identity(out) is None  # needs the forward pass, i.e. torch
    assert weights_identity(out, num_classes=2) == bare


class _Maps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :4, :4]  # (N, 3, 4, 4): a segmentation-like output, not logits


def test_torchscript_with_the_wrong_output_shape_fails_naming_it(tmp_path):
    path = tmp_path / "maps.bin"  # content, not suffix, says what it is
    torch.jit.save(torch.jit.script(_Maps()), path)
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert str(err.value) == (f"{path}: the model outputs shape (2, 3, 4, 4) for input (2, 3, 224, 224), "
                              "expected (2, k) logits")


def _wsinfer_config(**changes) -> dict:
    config = {
        "spec_version": "1.0", "architecture": "resnet18", "num_classes": 2, "class_names": ["Other", "Tumor"],
        "patch_size_pixels": 96, "spacing_um_px": 0.5,
        "transform": [{"name": "Resize", "arguments": {"size": 64}}, {"name": "ToTensor"},
                      {"name": "Normalize", "arguments": {"mean": [0.7, 0.6, 0.7], "std": [0.1, 0.15, 0.1]}}],
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


@pytest.fixture(scope="module")
def timm_resnet() -> nn.Module:
    torch.set_num_threads(1)
    return _model("timm:resnet18", 2, seed=1)


@pytest.mark.parametrize("variant", ["torchscript", "safetensors"])
def test_wsinfer_folder_loads_with_its_card(tmp_path, timm_resnet, variant):
    folder = tmp_path / "breast-tumor.tcga"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_wsinfer_config()))
    if variant == "torchscript":
        torch.jit.save(torch.jit.script(timm_resnet), folder / "torchscript_model.pt")
    else:  # as WSInfer publishes it: bare tensors, no metadata of ours
        save_file({k: v.contiguous() for k, v in timm_resnet.state_dict().items()}, folder / "model.safetensors")

    loaded, info = load_model(folder)
    card = info.card
    assert card is not None
    assert (info.arch, info.num_classes) == ("torchscript" if variant == "torchscript" else "timm:resnet18", 2)
    assert (card.source, card.classes, card.mpp, card.patch_size) == ("wsinfer", ["Other", "Tumor"], 0.5, 96)
    assert card.normalisation.resize == 64 and card.normalisation.mean == (0.7, 0.6, 0.7)
    assert card.positive == "Tumor" and card.columns == ["Other", "Tumor"]
    assert "WSInfer model folder breast-tumor.tcga" in (card.training_data or "")
    patches = _patches(2, 64)
    np.testing.assert_array_equal(predict_patches(loaded, patches), predict_patches(timm_resnet, patches))
    assert weights_identity(folder) == info

    (folder / "config.json").write_text(json.dumps(_wsinfer_config(num_classes=3, class_names=["a", "b", "c"])))
    with pytest.raises(ModelLoadError, match=r"config\.json: num_classes 3 .* outputs 2 column\(s\)"):
        load_model(folder)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"spacing_um_px": None}, "missing field 'spacing_um_px'"),
    ({"spec_version": "2.0"}, "spec_version '2.0' is not supported (only '1.0')"),
    ({"class_names": ["Tumor"]}, "1 class_names ['Tumor'] for num_classes 2"),
    ({"class_names": ["Tumor", "Tumor"]}, "repeat a name"),
    ({"spacing_um_px": 0}, "field 'spacing_um_px': Input should be greater than 0"),
    ({"num_classes": "2"}, "field 'num_classes': Input should be a valid integer"),
    ({"transform": [{"name": "CenterCrop", "arguments": {"size": 64}}]}, "field 'transform.0.name': Input should be"),
    ({"transform": [{"name": "ToTensor", "kwargs": {}}]}, "unknown key 'kwargs' in 'transform.0'"),
    ({"transform": [{"name": "ToTensor"}, {"name": "Normalize", "arguments": {"mean": [0.5], "std": [1, 1, 1]}}]},
     "Normalize mean must be 3 numbers"),
])
def test_bad_wsinfer_config_fails_on_the_named_field(tmp_path, changes, problem):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_wsinfer_config(**changes)))
    (folder / "model.safetensors").write_bytes(b"never read: the config fails first")
    with pytest.raises(ModelLoadError) as err:
        load_model(folder)
    assert str(err.value).startswith(f"{folder / 'config.json'}: ")
    assert problem in str(err.value) and str(err.value).endswith("(WSInfer model config 1.0)")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # nothing written


def test_identity_of_each_source_needs_no_torch(tmp_path, resnet):
    """weights_identity in a fresh interpreter that never imports torch equals load_model's info."""
    model, weights = resnet
    state_dict = tmp_path / "sd" / "weights.pt"
    state_dict.parent.mkdir()
    torch.save(model.state_dict(), state_dict)
    info = load_model(state_dict)[1]
    (state_dict.parent / "card.json").write_text(json.dumps({"arch": "resnet18", "num_classes": 2, "weights_sha256": info.sha256}))
    torchscript = tmp_path / "ts" / "tumor.pt"
    export_model(weights, "torchscript", torchscript)  # with its card: num_classes known without a forward pass
    wsinfer = tmp_path / "wsinfer"
    wsinfer.mkdir()
    (wsinfer / "config.json").write_text(json.dumps(_wsinfer_config()))
    save_file(_model("timm:resnet18", 2).state_dict(), wsinfer / "model.safetensors")
    sources = {"safetensors": weights, "state dict with its card": state_dict, "torchscript with its card": torchscript,
               "WSInfer folder": wsinfer}
    expected = {name: load_model(path)[1] for name, path in sources.items()}
    code = ("import json, sys\nfrom wsipipe.models.identity import weights_identity\n"
            "out = {n: weights_identity(p) for n, p in json.loads(sys.argv[1]).items()}\n"
            "assert 'torch' not in sys.modules, 'identity imported torch'\n"
            "print(json.dumps({n: [i.arch, i.num_classes, i.sha256] for n, i in out.items()}))")
    run = subprocess.run([sys.executable, "-c", code, json.dumps({n: str(p) for n, p in sources.items()})],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, check=True, timeout=60)
    got = json.loads(run.stdout)
    assert got == {n: [i.arch, i.num_classes, i.sha256] for n, i in expected.items()}


@pytest.mark.slow
def test_cli_models_card_and_export(tmp_path, resnet):
    from typer.testing import CliRunner

    from wsipipe.cli import app

    _, weights = resnet
    runner = CliRunner()
    shown = runner.invoke(app, ["models", "card", str(weights)])
    assert shown.exit_code == 0, shown.output
    card = json.loads(shown.stdout)
    assert (card["arch"], card["num_classes"], card["classes"]) == ("resnet18", 2, ["normal", "tumor"])

    out = tmp_path / "ts" / "tumor.pt"
    done = runner.invoke(app, ["models", "export", str(weights), "--format", "torchscript", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads(runner.invoke(app, ["models", "card", str(out)]).stdout)["source"] == "torchscript"

    again = runner.invoke(app, ["models", "export", str(weights), "--format", "torchscript", "--out", str(out)])
    assert again.exit_code == 0, again.output  # replacing its own earlier export is fine
    trained = tmp_path / "trained"  # weights with their card, as `wsipipe train` leaves them
    trained.mkdir()
    (trained / "model.safetensors").write_bytes(weights.read_bytes())
    (trained / "card.json").write_text(json.dumps({"arch": "resnet18", "num_classes": 2, "weights_sha256": card["weights_sha256"]}))
    beside = runner.invoke(app, ["models", "export", str(trained / "model.safetensors"), "--format", "torchscript",
                                 "--out", str(trained / "tumor.pt")])  # would orphan the source's card
    assert beside.exit_code == 2 and "card.json: exists and describes other weights" in beside.stderr
    assert not (trained / "tumor.pt").exists()

    bad = runner.invoke(app, ["models", "export", str(weights), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "torchscript or export" in bad.output
    for command in ("card", "export"):
        assert runner.invoke(app, ["models", command, "--help"]).exit_code == 0
