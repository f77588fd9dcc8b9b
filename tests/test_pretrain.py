"""Contrastive pretraining on real (CMU-1) and generated patches: SimCLR and BYOL lower
their loss, an interrupted run resumes to the same result, checkpoints are safetensors +
JSON and a pickled checkpoint is refused without running it; the linear probe scores."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from wsipipe.config import PretrainConfig
from wsipipe.errors import ConfigError, ModelLoadError
from wsipipe.learn.patchsets import load_patch_sets, split_by_group
from wsipipe.learn.pretrain import linear_probe, load_encoder, nt_xent, pretrain
from wsipipe.tiles.tiling import tile_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCH = "shufflenet_v2_x0_5"  # 0.3M parameters: CI-sized


@pytest.fixture(scope="module")
def unlabelled(labelled_slides, slides_dir, tmp_path_factory, one_torch_thread):
    """Real H&E patches tiled from CMU-1 (small region) plus one generated slide's."""
    out = tmp_path_factory.mktemp("pretrain") / "cmu.zarr"
    tile_slide(slides_dir / "cmu-1-small-region.svs", out, labelled_slides["cfg"])
    return [out, labelled_slides["stores"][0]]


def _cfg(method, **kw):
    base = dict(method=method, arch=ARCH, steps=14, batch_size=16, crop=48, hidden_dim=128, projection_dim=64,
                checkpoint_every=5, device="cpu", precision="fp32", lr=1e-3)
    return PretrainConfig(**{**base, **kw})


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z, 0.1) < nt_xent(z, torch.randn(8, 16), 0.1)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_short_run_lowers_the_loss(unlabelled, tmp_path, method):
    # In 14 steps SimCLR at lr 1e-3 moves less than its step-to-step noise (0.04 on this data,
    # 0.34 at lr 1e-2), so whether the check passed depended on the CPU's rounding.
    result = pretrain(unlabelled, tmp_path / method, _cfg(method, lr=1e-2 if method == "simclr" else 1e-3))
    losses = np.array(result.losses)
    assert len(losses) == 14 and np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.05, losses.round(3)
    meta = json.loads((tmp_path / method / "checkpoint.json").read_text())
    assert meta["step"] == 14 and meta["method"] == method
    assert [s[1] for s in meta["data"]["stores"]] == ["cmu.zarr", unlabelled[1].name]
    encoder, info = load_encoder(tmp_path / method)
    assert info["arch"] == ARCH and info["method"] == method
    assert encoder(torch.zeros(2, 3, 64, 64)).shape[0] == 2


def test_interrupted_run_resumes_to_the_same_encoder(unlabelled, tmp_path):
    cfg = _cfg("byol", steps=6, checkpoint_every=2)
    whole = pretrain(unlabelled, tmp_path / "whole", cfg)
    first = pretrain(unlabelled, tmp_path / "split", cfg, stop_after=3)  # interrupted after step 3
    rest = pretrain(unlabelled, tmp_path / "split", cfg)
    assert first.steps == 3 and rest.resumed_from == 3 and rest.steps == 6
    np.testing.assert_allclose(rest.losses, whole.losses, rtol=1e-4, atol=1e-5)
    a, _ = load_encoder(tmp_path / "whole")
    b, _ = load_encoder(tmp_path / "split")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    # a different config does not resume from someone else's checkpoint: refused, or restarted when asked
    with pytest.raises(ConfigError, match=r"checkpoint.json: cannot resume.*lr 0.001 in the checkpoint, 0.0005 now"):
        pretrain(unlabelled, tmp_path / "split", _cfg("byol", steps=2, checkpoint_every=2, lr=5e-4))
    other = pretrain(unlabelled, tmp_path / "split", _cfg("byol", steps=2, checkpoint_every=2, lr=5e-4), restart=True)
    assert other.resumed_from == 0 and other.steps == 2


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    from wsipipe.learn.train import initial_model

    _Payload.marker = str(tmp_path / "pwned")
    evil = tmp_path / "encoder.pt"
    evil.write_bytes(pickle.dumps({"conv1.weight": _Payload()}))
    torch.save({"state_dict": {"fc.weight": _Payload()}}, tmp_path / "evil_zip.pt")
    with pytest.raises(ModelLoadError, match="refused to load"):
        load_encoder(evil)
    for path in (evil, tmp_path / "evil_zip.pt"):
        with pytest.raises(ModelLoadError, match="refused to load"):
            initial_model("resnet18", 1, "weights", path)
    with pytest.raises(ModelLoadError, match="refused to load"):
        initial_model("resnet18", 1, "encoder", evil)
    assert not (tmp_path / "pwned").exists()  # the payload never ran


def test_linear_probe_scores_an_encoder(labelled_slides, unlabelled, tmp_path):
    data = load_patch_sets(labelled_slides["stores"])
    splits = split_by_group(data.groups, (2, 0, 1), seed=0)
    rng = np.random.default_rng(0)
    tr = rng.choice(splits["train"], 300, replace=False)
    te = rng.choice(splits["test"], 200, replace=False)
    pretrain(unlabelled, tmp_path / "enc", _cfg("simclr", steps=2))
    encoder, _ = load_encoder(tmp_path / "enc")
    probe = linear_probe(encoder, (data.patches[tr], data.labels[tr]), (data.patches[te], data.labels[te]), epochs=100)
    assert probe["n_test"] == 200 and 0.0 <= probe["accuracy"] <= 1.0
    assert probe["auc"] > 0.8, probe  # tumor vs normal texture is linearly visible even in early features
