"""A WSInfer model folder runs end to end through ``wsipipe run`` on a real slide, at its own
spacing, patch size, transform and class names; a bad field stops the run before anything is
written. Real OpenSlide, a real Zarr store, the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from wsipipe.cli import app
from wsipipe.models.model import build_model
from wsipipe.tiles import store

CMU = "cmu-1-small-region.svs"
MEAN, STD = (0.7, 0.6, 0.7), (0.15, 0.2, 0.15)
RUN = ["--set", "dask.num_workers=1", "--set", "inference.device=cpu", "--set", "inference.precision=fp32",
       "--set", "qc.report_patches=2", "--set", "export.ome_zarr=false"]


def _config(**changes) -> dict:
    config = {
        "spec_version": "1.0", "architecture": "resnet18", "num_classes": 2, "class_names": ["Tumor", "Other"],
        "patch_size_pixels": 350, "spacing_um_px": 1.0,
        "transform": [{"name": "Resize", "arguments": {"size": 96}}, {"name": "ToTensor"},
                      {"name": "Normalize", "arguments": {"mean": list(MEAN), "std": list(STD)}}],
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(3)
    return build_model("timm:resnet18", 2).eval()


def _folder(root: Path, net: nn.Module, variant: str, **changes) -> Path:
    folder = root / f"tumor-{variant}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_config(**changes)))
    if variant == "torchscript":
        torch.jit.save(torch.jit.script(net), folder / "torchscript_model.pt")
    else:  # as WSInfer publishes them: bare tensors
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    return folder


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _expected(net: nn.Module, patches: np.ndarray) -> np.ndarray:
    """What the folder's transform and WSInfer's softmax make of the patches, written out by hand."""
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(96, 96), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        return torch.softmax(net(x), dim=1).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["torchscript", "safetensors"])
def test_wsinfer_folder_runs_at_its_own_spacing_on_a_real_slide(tmp_path, slides_dir, net, variant):
    folder = _folder(tmp_path, net, variant)
    res = _run("run", slides_dir / CMU, "--model", folder, "--out", tmp_path / "out", *RUN)
    assert res.exit_code == 0, res.output
    (slide_dir,) = (tmp_path / "out").iterdir()
    group = store.open_store(slide_dir / "patches.zarr")
    tile = store.meta(group)["tile"]
    assert tile["mpp"] == pytest.approx(1.0) and tile["patch_size"] == 350  # the folder's spacing and patch size, not the defaults
    probs = group["probabilities"]
    assert probs.attrs["classes"] == ["Tumor", "Other"] and probs.attrs["positive_class"] == "Tumor"
    patches = np.asarray(group["patches"][:])
    assert patches.shape[1:] == (350, 350, 3) and len(patches) > 4
    np.testing.assert_allclose(np.asarray(probs[:]), _expected(net, patches), atol=2e-5)

    summary = json.loads((slide_dir / "summary.json").read_text())
    assert summary["tumor_class"] == "Tumor" and summary["classes"] == ["Tumor", "Other"]
    assert summary["slide_score"]["max"] == pytest.approx(float(np.asarray(probs[:])[:, 0].max()), abs=1e-5)


@pytest.mark.slow
def test_wsinfer_folder_with_a_bad_field_stops_before_writing(tmp_path, slides_dir, net):
    folder = _folder(tmp_path, net, "torchscript", spacing_um_px=None)
    out = tmp_path / "out"
    res = _run("run", slides_dir / CMU, "--model", folder, "--out", out, *RUN)
    assert res.exit_code == 2
    assert f"{folder / 'config.json'}: missing field 'spacing_um_px'" in res.output
    assert not out.exists() or not any(out.iterdir())

    # A card at another spacing than the one asked: one line naming both, unless --force.
    (tmp_path / "good").mkdir()
    good = _folder(tmp_path / "good", net, "torchscript")
    res = _run("run", slides_dir / CMU, "--model", good, "--out", out, "--mpp", "0.5", *RUN)
    assert res.exit_code == 2, res.output
    assert "the model card says tile.mpp 1 (this run sets 0.5)" in res.output
    assert not out.exists() or not any(out.iterdir())
