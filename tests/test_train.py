"""Patch labels from polygons, and a from-scratch fit on an easy toy set (real torch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shapely.geometry import MultiPolygon, Polygon, box

from wsipipe.models.inference import predict_patches
from wsipipe.learn.train import augment, fit_classifier, label_patches


def test_label_patches_on_known_geometry():
    tumor = box(0, 0, 100, 100)
    coords = np.array([
        (10, 10),    # inside                      -> 1
        (50, 50),    # inside, sharing the border  -> 1
        (75, 0),     # half inside (0.5)           -> 1
        (90, 0),     # 20 % inside                 -> ambiguous
        (96, 0),     # 8 % inside                  -> 0
        (100, 0),    # touching only               -> 0
        (300, 300),  # far away                    -> 0
    ])
    assert label_patches(coords, 50, tumor).tolist() == [1, 1, 1, -1, 0, 0, 0]
    strict = label_patches(coords, 50, tumor, min_overlap=0.9, max_normal_overlap=0.0)
    assert strict.tolist() == [1, 1, -1, -1, -1, 0, 0]

    donut = Polygon([(0, 0), (300, 0), (300, 300), (0, 300)], holes=[[(100, 100), (200, 100), (200, 200), (100, 200)]])
    two = MultiPolygon([donut, box(1000, 1000, 1100, 1100)])
    assert label_patches([(120, 120), (10, 10), (1020, 1020)], 50, two).tolist() == [0, 1, 1]
    assert label_patches(coords, 50, MultiPolygon()).tolist() == [0] * len(coords)
    assert label_patches(np.zeros((0, 2)), 50, tumor).shape == (0,)
    with pytest.raises(ValueError):
        label_patches(coords, 50, tumor, min_overlap=0.1, max_normal_overlap=0.2)


def test_label_patches_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
    radius = rng.uniform(200, 400, 40)
    blob = Polygon(np.c_[500 + radius * np.cos(angles), 500 + radius * np.sin(angles)]).buffer(0)
    coords = rng.uniform(0, 1000, (500, 2)).round()
    labels = label_patches(coords, 64, blob, 0.6, 0.05)
    for (x, y), label in zip(coords, labels, strict=True):
        frac = box(x, y, x + 64, y + 64).intersection(blob).area / 64**2
        assert label == (1 if frac >= 0.6 else 0 if frac <= 0.05 else -1)
    assert {-1, 0, 1} <= set(labels.tolist())


def test_augment_gives_dihedral_transforms_of_crops():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 12, 12, 3), dtype=np.uint8)
    out = augment(np.repeat(image, 20, axis=0), 8, rng)
    assert out.shape == (20, 8, 8, 3)
    candidates = [
        t
        for top in range(5)
        for left in range(5)
        for k in range(4)
        for t in (np.rot90(image[0, top : top + 8, left : left + 8], k),)
        for t in (t, t[:, ::-1])
    ]
    for patch in out:
        assert any(np.array_equal(patch, c) for c in candidates)
    assert len({patch.tobytes() for patch in out}) > 10  # and they vary


def toy_patches(n, seed, size=64):
    """Light, finely mottled 'normal' vs darker, coarsely blotched 'tumor' patches."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.int8)
    normal = np.array([225, 170, 205]) + 15 * rng.standard_normal((n, size, size, 1))
    coarse = np.kron(rng.standard_normal((n, size // 8, size // 8, 1)), np.ones((1, 8, 8, 1)))
    tumor = np.array([150, 90, 160]) + 30 * coarse + 10 * rng.standard_normal((n, size, size, 1))
    patches = np.where(labels[:, None, None, None] == 1, tumor, normal)
    return np.clip(patches, 0, 255).astype(np.uint8), labels


def test_fit_separates_an_easy_toy_set():
    patches, labels = toy_patches(68, seed=0)
    labels[:4] = -1  # ambiguous patches are left out
    steps = []
    model = fit_classifier(patches, labels, epochs=3, batch_size=16, lr=2e-3, train_size=32, precision="fp32",
                           device="cpu", progress=lambda d, n: steps.append((d, n)))
    assert steps[-1][0] == steps[-1][1] == len(steps)
    assert not model.training
    cpu = torch.device("cpu")
    train_acc = ((predict_patches(model, patches[4:], cpu) > 0.5) == labels[4:]).mean()
    held_out, truth = toy_patches(64, seed=1)
    test_acc = ((predict_patches(model, held_out, cpu) > 0.5) == truth).mean()
    assert train_acc >= 0.95 and test_acc >= 0.95, (train_acc, test_acc)


def test_fit_is_deterministic_for_a_seed_and_checks_labels():
    patches, labels = toy_patches(12, seed=2, size=32)
    kw = dict(epochs=1, batch_size=6, precision="fp32", device="cpu")
    a = fit_classifier(patches, labels, seed=3, **kw).state_dict()
    b = fit_classifier(patches, labels, seed=3, **kw).state_dict()
    c = fit_classifier(patches, labels, seed=4, **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="two of the classes"):
        fit_classifier(patches, np.zeros(12), **kw)
    with pytest.raises(ValueError, match="two of the classes"):
        fit_classifier(patches, np.arange(12) % 3, **kw)  # class 2 for a one-logit model
    with pytest.raises(ValueError, match="N labels"):
        fit_classifier(patches, labels[:5], **kw)


def test_multiclass_fit_runs():
    patches, labels = toy_patches(12, seed=3, size=32)
    labels[::3] = 2
    model = fit_classifier(patches, labels, num_classes=3, epochs=1, batch_size=6, precision="fp32", device="cpu")
    assert predict_patches(model, patches, torch.device("cpu")).shape == (12, 3)


def test_fit_options_and_keywords_are_one_setting():
    from wsipipe.learn.train import FitHooks, FitOptions, fit_settings

    opts, hooks = fit_settings(FitOptions(epochs=5, device="cpu"), None, epochs=2, lr=0.1)
    assert opts == FitOptions(epochs=2, lr=0.1, device="cpu") and hooks == FitHooks()
    on_step = print
    _, hooks = fit_settings(None, FitHooks(on_step=on_step))
    assert hooks.on_step is on_step and hooks.model is None
    with pytest.raises(TypeError, match="epoch"):
        fit_settings(None, None, epoch=3)  # type: ignore[call-arg]


def test_fit_with_options_equals_fit_with_keywords():
    from wsipipe.learn.train import FitOptions

    patches, labels = toy_patches(12, seed=2, size=32)
    kw = dict(epochs=1, batch_size=6, train_size=24, precision="fp32", device="cpu", seed=5)
    a = fit_classifier(patches, labels, **kw).state_dict()
    b = fit_classifier(patches, labels, FitOptions(**kw)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
