"""Model building and safe loading of local weights (real torch, real files)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from wsipipe.errors import ModelLoadError
from wsipipe.models.model import available_architectures, build_model, file_sha256, load_model, save_weights


def outputs(model, seed=0, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.eval()(x)


def test_roundtrip_safetensors_and_torch_state_dicts(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 1).eval()
    info = save_weights(model, tmp_path / "m.safetensors", "resnet18", 1, {"note": "test", "arch": "ignored"})
    assert (info.arch, info.num_classes, info.path) == ("resnet18", 1, tmp_path / "m.safetensors")
    assert info.sha256 == file_sha256(tmp_path / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    expected = outputs(model)

    loaded, linfo = load_model(tmp_path / "m.safetensors")
    assert linfo == info  # arch and classes from the metadata, the caller's "arch" didn't override ours
    assert torch.equal(outputs(loaded), expected)

    torch.save(model.state_dict(), tmp_path / "m.pt")
    from_pt, pinfo = load_model(tmp_path / "m.pt")
    assert (pinfo.arch, pinfo.num_classes) == ("resnet18", 1)  # classes read off the fc layer
    assert torch.equal(outputs(from_pt), expected)

    # A training checkpoint wrapper with DataParallel prefixes, under another suffix.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.bin")
    from_ckpt, _ = load_model(tmp_path / "ckpt.bin")
    assert torch.equal(outputs(from_ckpt), expected)


def test_other_family_round_trip_infers_classes_from_its_head(tmp_path):
    model = build_model("mobilenet_v3_small", 3).eval()
    torch.save(model.state_dict(), tmp_path / "mnv3.pth")
    loaded, info = load_model(tmp_path / "mnv3.pth", arch="mobilenet_v3_small")
    assert info.num_classes == 3
    assert torch.equal(outputs(loaded), outputs(model))


@pytest.mark.parametrize(
    "arch, size",
    [("resnet18", 64), ("mobilenet_v3_small", 64), ("densenet121", 64), ("squeezenet1_1", 64), ("vit_b_16", 224),
     ("swin_t", 64)],
)
def test_head_replaced_for_common_families(arch, size):
    assert arch in available_architectures()
    model = build_model(arch, 3).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3)


def test_available_architectures_is_a_fresh_list():
    names = available_architectures()
    assert "resnet18" in names and "vit_b_16" in names and "maskrcnn_resnet50_fpn" not in names
    names.clear()
    assert "resnet18" in available_architectures()


def _payload(marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


def test_payload_is_real(tmp_path):
    # The malicious checkpoints below would run this if anything unpickled them naively.
    marker = tmp_path / "RAN"
    pickle.loads(pickle.dumps(_payload(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("how", ["bare pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    state = {"fc.weight": _payload(marker)}
    if how == "torch.save":
        torch.save(state, evil)
    else:
        evil.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(ModelLoadError) as err:
        load_model(evil)
    assert str(evil) in str(err.value) and "refused" in str(err.value)
    assert "system" in str(err.value)  # names what it refused
    assert not marker.exists()


def test_bad_weights_name_file_and_problem(tmp_path):
    def refused(path, match, **kw):
        with pytest.raises(ModelLoadError, match=match) as err:
            load_model(path, **kw)
        assert str(path) in str(err.value)

    refused(tmp_path / "missing.safetensors", "not found")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    refused(garbage, "not a weights file")
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    refused(text, "not a weights file")

    save_weights(build_model("resnet18", 2), tmp_path / "r2.safetensors", "resnet18", 2)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "r2.safetensors").read_bytes()[:5000])
    refused(truncated, "safetensors")
    refused(tmp_path / "r2.safetensors", r"do not fit resnet34 .*records arch resnet18.*missing keys", arch="resnet34")
    refused(tmp_path / "r2.safetensors", r"shape mismatches \(e.g. fc.weight: file \(2, 512\), model \(5, 512\)",
            num_classes=5)
    refused(tmp_path / "r2.safetensors", "unknown architecture", arch="resnet9000")

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    refused(tmp_path / "tensor.pt", "not a state dict")
