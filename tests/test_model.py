"""Model building and safe loading of local weights (real torch, real files)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from wsipipe.errors import ModelLoadError
from wsipipe.model import build_model, load_model, save_weights


def test_roundtrip_safetensors_and_state_dict(tmp_path):
    model = build_model("resnet18", 1).eval()
    info = save_weights(model, tmp_path / "m.safetensors", "resnet18", 1, {"note": "test"})
    assert len(info.sha256) == 64
    x = torch.randn(2, 3, 64, 64)
    loaded, linfo = load_model(tmp_path / "m.safetensors")
    assert (linfo.arch, linfo.num_classes, linfo.sha256) == ("resnet18", 1, info.sha256)
    torch.testing.assert_close(model(x), loaded(x))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    from_pt, pinfo = load_model(tmp_path / "m.pt")
    assert pinfo.num_classes == 1  # read off the head's shape
    torch.testing.assert_close(model(x), from_pt(x))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "mobilenet_v3_small", "vit_b_16", "convnext_tiny"])
def test_head_replaced_for_common_families(arch):
    model = build_model(arch, 3).eval()
    size = 224 if arch.startswith("vit") else 64
    with torch.inference_mode():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    with evil.open("wb") as fh:
        pickle.dump({"fc.weight": Payload()}, fh)
    with pytest.raises(ModelLoadError) as info:
        load_model(evil)
    assert str(evil) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_bad_weights_name_file_and_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(garbage)
    save_weights(build_model("resnet18", 2), tmp_path / "r2.safetensors", "resnet18", 2)
    with pytest.raises(ModelLoadError, match="do not fit resnet34"):
        load_model(tmp_path / "r2.safetensors", arch="resnet34")
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        load_model(tmp_path / "r2.safetensors", arch="resnet9000")
