"""The out-of-domain check: the feature reference (pure numpy), the feature tap, per-patch
distances stored by inference in a real Zarr store, the summary block and QC flag, and the
demo model flagging real slides it never saw (the slow acceptance test)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr

from wsipipe.config import InferenceConfig
from wsipipe.models.card import ModelCard
from wsipipe.models.domain import (
    FeatureTap, domain_distances, feature_layer, fit_domain, reference, slide_domain, unpacked, view_widths,
)
from wsipipe.models.inference import forward_with_backoff, BatchLimit, infer_store, predict_patches
from wsipipe.models.model import build_model, save_weights
from wsipipe.outputs.summary import DomainSection, domain_section
from wsipipe.tiles import store

CPU = torch.device("cpu")
FP32 = InferenceConfig(batch_size=5, precision="fp32", device="cpu", prefetch_batches=2)


def gaussian(n, dim=48, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.2, dim)  # an anisotropic cloud: the principal directions matter
    return (rng.normal(size=(n, dim)) * scales + shift).astype(np.float32)


def test_fit_domain_is_compact_json_with_held_out_quantiles():
    train = gaussian(2000)
    domain = fit_domain(train, views=[("head", 40), ("early", 8)], components=8, seed=1)
    assert [v["name"] for v in domain["views"]] == ["head", "early"]
    text = json.dumps(domain)
    assert len(text) < 20_000 and json.loads(text) == domain
    assert domain["n_fit"] + domain["n_held_out"] == 2000 and domain["n_held_out"] == 400
    q = domain["quantiles"]
    assert q["p50"] < q["p90"] < q["p95"] < q["p99"] <= q["max"]
    assert 0.8 < q["p50"] < 1.2  # a training patch lies near 1
    fresh = domain_distances(gaussian(4000, seed=2), domain)  # new patches from the same cloud
    assert fresh.dtype == np.float32 and fresh.shape == (4000,)
    assert 0.003 < float(np.mean(fresh > q["p99"])) < 0.03  # held-out p99 is not optimistic
    far = domain_distances(gaussian(500, shift=2.0, seed=3), domain)
    assert float(np.mean(far > q["p99"])) > 0.95
    # a patch and its augmented copy (one group) fall on the same side of the held-out split
    paired = fit_domain(np.concatenate([train[:500], train[:500] + 0.01]), groups=np.tile(np.arange(500), 2), seed=1)
    assert paired["n_held_out"] == 200 and paired["n_fit"] == 800
    # decoded once or every call: the same distances
    np.testing.assert_array_equal(domain_distances(train[:50], unpacked(domain)), domain_distances(train[:50], domain))


def test_fit_domain_with_few_patches_keeps_a_residual():
    """Fewer patches than feature dimensions (a small training slide): distances stay finite and
    held-out patches near 1, not blown up by a residual variance fitted to zero."""
    domain = fit_domain(gaussian(60, dim=512), seed=0)
    assert domain["views"][0]["eigenvalues"]["shape"][0] <= 12
    assert domain["quantiles"]["p50"] < 3.0


def test_slide_domain_counts_beyond_p99_and_the_flag_fraction():
    domain = {"quantiles": {"p50": 1.0, "p99": 2.0}}
    d = np.array([0.5, 1.0, 2.5, 3.0, np.nan, 4.0], dtype=np.float32)
    out = slide_domain(d, domain, fraction=0.5)
    assert (out["n_patches"], out["n_beyond"]) == (5, 3) and out["fraction_beyond"] == pytest.approx(0.6)
    assert out["out_of_domain"] and out["median_distance"] == pytest.approx(2.5)
    assert not slide_domain(d, domain, fraction=0.6)["out_of_domain"]  # more than the fraction, not equal
    assert not slide_domain(np.array([]), domain, 0.5)["out_of_domain"]


def test_domain_section_and_flag():
    entry = {"checked": True, **reference({"quantiles": {"p50": 1.0, "p99": 2.0}})}
    section, flag = domain_section(entry, np.array([3.0, 3.0, 3.0, 1.0]), 0.5)
    assert section.checked and section.out_of_domain and section.fraction_beyond == 0.75
    assert flag is not None and flag.code == "out_of_domain" and flag.severity == "review"
    assert "75% of patches" in flag.message and "training domain" in flag.message
    section, flag = domain_section(entry, np.array([1.0, 1.0, 3.0]), 0.5)
    assert section.checked and not section.out_of_domain and flag is None
    section, flag = domain_section({"checked": False, "reason": "the model has no card"}, None, 0.5)
    assert not section.checked and section.reason == "the model has no card" and flag is None
    assert DomainSection().reason is None and domain_section(None, None, 0.5)[0].reason  # older stores say why


def test_feature_tap_is_the_classifier_input_of_the_same_pass():
    torch.manual_seed(0)
    model = build_model("resnet18", 1).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad(), FeatureTap.attach(model) as tap:
        logits = tap.wrap(model)(x)
        feats = tap.take()
        # the classifier's input, then layer1's 64 channel means and deviations
        assert tap.views == ["head", "early"] and tap.early is model.layer1
        assert feats is not None and feats.shape == (6, 512 + 128) and feats.dtype == torch.float32
        torch.testing.assert_close(model.fc(feats[:, :512]), logits)
        early = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        torch.testing.assert_close(feats[:, 512:576], early.mean(dim=(2, 3)))
        assert tap.take() is None  # taken once
    assert not model.fc._forward_pre_hooks and not model.layer1._forward_hooks  # closed: the caller's model carries no hook


def test_feature_tap_keeps_nothing_of_a_failed_pass():
    """An out-of-memory slice that is retried smaller leaves no features behind: the features
    stay aligned with the probabilities."""
    torch.manual_seed(0)
    model = build_model("resnet18", 1).eval()
    calls = []

    def flaky(x):
        calls.append(len(x))
        out = model(x)  # the hook fires, then the "allocation" fails
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated")
        return out

    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), FeatureTap.attach(model) as tap:
        probs = forward_with_backoff(tap.wrap(flaky), x, BatchLimit(8))
        feats = tap.take()
    assert calls == [8, 4, 4] and probs.shape == (8,) and feats is not None and feats.shape == (8, 640)
    torch.testing.assert_close(torch.sigmoid(model.fc(feats[:, :512])[:, 0]), probs)


def test_feature_layer_of_timm_torchvision_and_torchscript():
    import timm

    vit = build_model("vit_b_16", 2)
    assert feature_layer(vit) is vit.heads.head and view_widths(vit) == [("head", 768)]  # no convolutions to read early
    effnet = build_model("efficientnet_b0", 1)
    assert view_widths(effnet) is not None and view_widths(effnet)[0] == ("head", 1280)
    t = timm.create_model("resnet18", pretrained=False, num_classes=1)
    assert feature_layer(t) is t.get_classifier() and view_widths(t) == [("head", 512), ("early", 128)]
    headless = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert feature_layer(headless) is None  # an Identity head: nothing to tap
    scripted = torch.jit.script(build_model("resnet18", 1).eval())
    assert feature_layer(scripted) is None and FeatureTap.attach(scripted) is None


def _store(path, n=23, chunk=8, seed=0, size=32):
    rng = np.random.default_rng(seed)
    group = zarr.open_group(str(path), mode="w")
    group.create_array("patches", data=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), chunks=(chunk, size, size, 3))
    group.create_array("coords", data=np.zeros((n, 2), dtype=np.int64), chunks=(n, 2))
    store.set_stage(group, "tile", {"slide": "hand-built", "config": str(seed)}, True, n_patches=n)
    return path


def _model_with_domain(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 1).eval()
    info = save_weights(model, tmp_path / "m.safetensors", "resnet18", 1)
    patches = np.random.default_rng(5).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    from wsipipe.learn.train import training_domain

    domain = training_domain(model, patches, device="cpu")
    card = ModelCard(arch="resnet18", num_classes=1, classes=["normal", "tumor"], weights_sha256=info.sha256,
                     training_data="noise patches", domain=domain)
    return model, replace(info, card=card)


def test_inference_stores_distances_beside_probabilities_and_resumes(tmp_path):
    path = _store(tmp_path / "s.zarr")
    model, info = _model_with_domain(tmp_path)
    infer_store(path, model, info, FP32)
    group = store.open_store(path, mode="r+")
    dist, probs = group["ood_distance"], group["probabilities"]
    assert dist.shape == (23,) and dist.dtype == np.float32 and dist.chunks == probs.chunks
    patches = group["patches"][:]
    np.testing.assert_allclose(probs[:], predict_patches(model, patches, CPU), atol=1e-6)  # the same pass, unchanged
    with torch.no_grad(), FeatureTap.attach(model) as tap:
        tap.wrap(model)(torch.from_numpy(((patches / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
                                         .astype(np.float32)).permute(0, 3, 1, 2))
        feats = tap.take()
    assert feats is not None
    np.testing.assert_allclose(dist[:], domain_distances(feats.numpy(), info.card.domain), rtol=1e-4)
    entry = store.stage_entry(group, "infer")
    assert entry["domain"]["checked"] and entry["domain"]["quantiles"]["p99"] == info.card.domain["quantiles"]["p99"]
    assert entry["model"]["training_data"] == "noise patches"
    assert not model.fc._forward_pre_hooks

    # An interrupted run: chunks 1 and 2 lost (flags cleared, values wiped); only they are recomputed.
    before = dist[:].copy()
    flags = group["_progress/infer"]
    flags[1:3] = False
    dist[8:24] = np.nan
    store.set_stage(group, "infer", entry["identity"], False)
    stats = infer_store(path, model, info, FP32)
    assert stats["computed"] == 15
    np.testing.assert_allclose(store.open_store(path)["ood_distance"][:], before, rtol=1e-5)

    # A model without a card: no distances, and the stage says why.
    infer_store(_store(tmp_path / "t.zarr"), model, replace(info, card=None), FP32)
    group = store.open_store(tmp_path / "t.zarr")
    assert "ood_distance" not in group
    assert store.stage_entry(group, "infer")["domain"] == {"checked": False, "reason": "the model has no card describing its training data"}


def test_report_domain_note_says_when_no_check_was_possible():
    from wsipipe.outputs.report import domain_note

    note = domain_note(DomainSection(reason="the model has no card describing its training data"), None)
    assert not note["warn"] and note["text"] == (
        "no out-of-domain check was possible: the model has no card describing its training data")
    assert note["trained"].startswith("trained on: not recorded")
    flagged = DomainSection(checked=True, fraction_beyond=0.87, out_of_domain=True)
    note = domain_note(flagged, "generated slides: a.svs")
    assert note["warn"] and note["text"] == (
        "outside the model's training domain: 87% of patches beyond its training range — review")
    assert note["trained"] == "trained on: generated slides: a.svs"


@pytest.mark.slow
def test_demo_model_flags_real_slides_and_not_a_held_out_generated_one(tmp_path, slides_dir, one_torch_thread):
    """A demo-style model (fitted on one generated slide, as `make demo` does, at 1 µm/px and
    64-px patches to stay small) calls real skin and a TCGA scan tumor-or-not with confidence;
    the out-of-domain check flags both, and not a generated slide with another seed. The
    report shows it next to the decision, with what the model was trained on."""
    from test_report import probe

    from wsipipe.config import load_config
    from wsipipe.models.card import read_card
    from wsipipe.run.pipeline import run_slide, train_demo_model
    from wsipipe.slides.synth import write_synthetic_slide

    cfg = load_config(None, {"tile.mpp": 1.0, "tile.patch_size": 64, "inference.device": "cpu",
                             "inference.precision": "fp32", "export.ome_zarr": False})
    train = write_synthetic_slide(tmp_path / "train.svs", 6000, 4500, mpp=0.5, seed=1)
    held = write_synthetic_slide(tmp_path / "held.svs", 4000, 3000, mpp=0.5, seed=7)
    weights = train_demo_model(train.path, train.geojson_path, tmp_path / "model", cfg, epochs=3)
    card = read_card(tmp_path / "model" / "card.json")
    assert card.training_data == "generated slides: train.svs (synthetic H&E-like, wsipipe.slides.synth)"
    assert (card.mpp, card.patch_size, card.classes, card.num_classes) == (1.0, 64, ["normal", "tumor"], 1)
    assert card.domain is not None and [v["name"] for v in card.domain["views"]] == ["head", "early"]

    summaries = {}
    for name, path, override in (("held", held.path, None), ("cmu", slides_dir / "cmu-1-small-region.svs", None),
                                 ("tcga", slides_dir / "tcga-cr-7395-01a-01-ts1.svs", 0.25)):
        run_cfg = cfg.model_copy(update={"mpp_override": override}) if override else cfg
        summaries[name] = run_slide(path, tmp_path / "out", run_cfg, weights)
    domains = {k: r.summary["domain"] for k, r in summaries.items()}
    print({k: (d["fraction_beyond"], d["median_distance"]) for k, d in domains.items()})
    assert all(d["checked"] for d in domains.values())
    for name in ("cmu", "tcga"):
        assert domains[name]["out_of_domain"] and domains[name]["fraction_beyond"] > 0.9, (name, domains[name])
        flags = {f["code"]: f for f in summaries[name].summary["qc"]["flags"]}
        assert flags["out_of_domain"]["severity"] == "review" and summaries[name].summary["qc"]["needs_review"]
    assert not domains["held"]["out_of_domain"] and domains["held"]["fraction_beyond"] < 0.3
    assert "out_of_domain" not in {f["code"] for f in summaries["held"].summary["qc"]["flags"]}
    assert summaries["cmu"].summary["provenance"]["model"]["training_data"] == card.training_data

    shown = probe(summaries["cmu"].out_dir / "report.html", tmp_path, """
        return {note: document.getElementById("domain-note").textContent,
                trained: document.getElementById("domain-trained").textContent,
                warn: document.getElementById("domain-card").classList.contains("warn"),
                beside: (document.getElementById("decision-domain") || {}).textContent,
                flag: !!document.querySelector('#qc-flags li[data-code="out_of_domain"]'),
                provenance: document.getElementById("model-trained-on").textContent};""")
    share = round(100 * domains["cmu"]["fraction_beyond"])
    assert shown["note"] == f"outside the model's training domain: {share}% of patches beyond its training range — review"
    assert shown["trained"] == f"trained on: {card.training_data}" and shown["provenance"] == card.training_data
    assert shown["warn"] and shown["flag"] and shown["beside"] == "⚠ outside the model's training domain — review"
    held = probe(summaries["held"].out_dir / "report.html", tmp_path, """
        return {note: document.getElementById("domain-note").textContent,
                beside: !!document.getElementById("decision-domain")};""")
    assert held["note"].startswith("within the model's training domain") and not held["beside"]
