"""SwAV pretraining on generated slides: Sinkhorn-Knopp codes meet their marginals, the
swapped-prediction loss falls, an interrupted run (multi-crop, prototypes frozen across the
interruption) resumes to the same result, and the command line trains, probes and leaves an
encoder that ``load_encoder`` reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from wsipipe.cli import app
from wsipipe.config import PretrainConfig
from wsipipe.errors import ConfigError
from wsipipe.learn.pretrain import load_encoder, pretrain, sinkhorn

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCH = "shufflenet_v2_x0_5"  # 0.3M parameters: CI-sized


def _cfg(**kw):
    base = dict(method="swav", arch=ARCH, steps=6, batch_size=16, crop=48, hidden_dim=128, projection_dim=64,
                swav_prototypes=32, swav_freeze_steps=3, checkpoint_every=5, device="cpu", precision="fp32", lr=1e-3)
    return PretrainConfig(**{**base, **kw})


def _prototypes(folder):
    return load_file(folder / "state.safetensors")["net.prototypes.weight"]


@pytest.mark.parametrize("batch, k", [(24, 40), (64, 16)])
def test_sinkhorn_codes_are_doubly_stochastic(batch, k):
    torch.manual_seed(0)
    # Cosines between unit features and unit prototypes, as SwAV scores them.
    scores = F.normalize(torch.randn(batch, 16), dim=1) @ F.normalize(torch.randn(k, 16), dim=1).T
    scores.requires_grad_(True)
    share = batch / k  # each prototype's part of the batch

    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.shape == (batch, k) and not codes.requires_grad and (codes >= 0).all()
    # The last scaling is per image: every row is a distribution over the prototypes.
    torch.testing.assert_close(codes.sum(1), torch.ones(batch), rtol=0, atol=1e-5)
    # Each round brings the prototype sums closer to the share than a plain softmax's are.
    def off(q):
        return float((q.sum(0) - share).abs().max())

    plain = torch.softmax(scores.detach() / 0.05, dim=1)
    assert off(plain) > off(codes) > off(sinkhorn(scores, 0.05, 10)) > off(sinkhorn(scores, 0.05, 30))

    # Run to convergence, both marginals hold: rows sum to 1 and columns to B / K.
    converged = sinkhorn(scores, epsilon=0.05, iterations=300)
    torch.testing.assert_close(converged.sum(1), torch.ones(batch), rtol=0, atol=1e-4)
    torch.testing.assert_close(converged.sum(0), torch.full((k,), share), rtol=0, atol=1e-4)
    # ... and the codes are exp(scores / epsilon) scaled per row and per column, nothing else:
    # log(codes) - scores / epsilon is a row term plus a column term.
    resid = converged.log() - scores.detach() / 0.05
    resid = resid - resid.mean(1, keepdim=True) - resid.mean(0, keepdim=True) + resid.mean()
    assert resid.abs().max() < 1e-3


@pytest.mark.slow
def test_swav_loss_falls(labelled_slides, tmp_path):
    # Default temperature (SwAV's 0.5). Over seeds 0-2 the mean of the last 10 of 100 steps
    # was 0.13-0.32 below that of the first 10 (step-to-step noise about 0.05).
    result = pretrain(labelled_slides["stores"], tmp_path / "swav", _cfg(steps=100, checkpoint_every=100, lr=3e-3))
    losses = np.array(result.losses)
    assert len(losses) == 100 and np.isfinite(losses).all()
    assert losses[-10:].mean() < losses[:10].mean() - 0.05, losses.round(3)
    # Cross entropy is at least the entropy of the codes, ln K for uniform codes: below it, the
    # patches are not all spread evenly over every prototype (SwAV's trivial solution).
    assert losses[-10:].mean() < np.log(32) - 0.05, losses.round(3)
    assert json.loads((tmp_path / "swav" / "checkpoint.json").read_text())["config"]["temperature"] == 0.5
    # the prototypes leave every step on the unit sphere
    torch.testing.assert_close(_prototypes(tmp_path / "swav").norm(dim=1), torch.ones(32))


@pytest.mark.slow
def test_interrupted_swav_run_resumes_to_the_same_encoder(labelled_slides, tmp_path):
    # Two small crops (multi-crop) and prototypes frozen for 3 steps: the run stops after
    # step 2, inside the frozen stretch, and resumes across its end.
    stores = labelled_slides["stores"][:2]
    cfg = _cfg(steps=6, checkpoint_every=2, swav_small_crops=2, swav_small_crop=24)
    whole = pretrain(stores, tmp_path / "whole", cfg)
    first = pretrain(stores, tmp_path / "split", cfg, stop_after=2)
    frozen = _prototypes(tmp_path / "split")
    assert first.steps == 2
    pretrain(stores, tmp_path / "early", cfg, stop_after=1)
    torch.testing.assert_close(_prototypes(tmp_path / "early"), frozen, rtol=0, atol=0)  # no update while frozen
    rest = pretrain(stores, tmp_path / "split", cfg)
    assert rest.resumed_from == 2 and rest.steps == 6
    assert not torch.allclose(_prototypes(tmp_path / "split"), frozen)  # ... and updates after
    np.testing.assert_allclose(rest.losses, whole.losses, rtol=1e-4, atol=1e-5)
    for name in ("whole", "split"):
        assert json.loads((tmp_path / name / "checkpoint.json").read_text())["method"] == "swav"
    torch.testing.assert_close(_prototypes(tmp_path / "split"), _prototypes(tmp_path / "whole"), rtol=1e-4, atol=1e-5)
    a, _ = load_encoder(tmp_path / "whole")
    b, _ = load_encoder(tmp_path / "split")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    # SwAV settings are part of the run: another number of prototypes does not resume
    with pytest.raises(ConfigError, match=r"cannot resume.*swav_prototypes 32 in the checkpoint, 16 now"):
        pretrain(stores, tmp_path / "split", _cfg(steps=6, checkpoint_every=2, swav_small_crops=2,
                                                  swav_small_crop=24, swav_prototypes=16))
    with pytest.raises(ConfigError, match="swav_small_crop 64 is larger than pretrain.crop 48"):
        pretrain(stores, tmp_path / "bad", _cfg(swav_small_crops=1, swav_small_crop=64))


@pytest.mark.slow
def test_checkpoint_written_before_the_swav_settings_still_resumes(labelled_slides, tmp_path):
    cfg = PretrainConfig(method="byol", arch=ARCH, steps=2, batch_size=16, crop=48, hidden_dim=128, projection_dim=64,
                         checkpoint_every=1, device="cpu", precision="fp32")  # SwAV settings at their defaults
    pretrain(labelled_slides["stores"][:1], tmp_path / "byol", cfg, stop_after=1)
    meta_path = tmp_path / "byol" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["config"] = {k: v for k, v in meta["config"].items() if not k.startswith("swav_")}
    meta_path.write_text(json.dumps(meta))
    # resumes: its config lacks only settings that are at their defaults now ...
    assert pretrain(labelled_slides["stores"][:1], tmp_path / "byol", cfg).resumed_from == 1
    # ... and is refused when one of them is not
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="swav_prototypes not in the checkpoint, 32 now"):
        pretrain(labelled_slides["stores"][:1], tmp_path / "byol", cfg.model_copy(update={"swav_prototypes": 32}))


@pytest.mark.slow
def test_swav_through_the_command_line(labelled_slides, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("pretrain: {arch: shufflenet_v2_x0_5, batch_size: 8, crop: 32, hidden_dim: 32, projection_dim: 16,"
                      " swav_prototypes: 16, swav_freeze_steps: 1, swav_small_crops: 1, swav_small_crop: 16,"
                      " checkpoint_every: 50, device: cpu, precision: fp32}\n")
    stores, out = labelled_slides["stores"], tmp_path / "enc"
    probes = [arg for s in stores for arg in ("--probe", str(s))]
    res = CliRunner().invoke(app, ["pretrain", str(stores[0]), "--out", str(out), "--method", "swav", "--steps", "3",
                                   *probes, "--config", str(config)], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "after 3 steps (resumed from 0)" in res.stdout and "linear probe: accuracy" in res.stdout, res.stdout
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["method"] == "swav" and meta["step"] == 3 and meta["config"]["swav_small_crops"] == 1
    probe = json.loads((out / "probe.json").read_text())
    assert probe["split"].startswith("by slide") and 0.0 <= probe["auc"] <= 1.0
    encoder, info = load_encoder(out)
    assert info["method"] == "swav" and info["arch"] == ARCH and info["step"] == 3
    assert encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 1024)  # ShuffleNetV2-0.5 features
