"""Augmentation pipeline (shape/dtype, seeded reproducibility, HED jitter measured in HED
space), stain normalisation, and the augmented-copy writer with its preview grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2hed, rgb2lab

from wsipipe.tiles import store
from wsipipe.learn.augment import Augmenter, hed_jitter, augment_store, named_transforms
from wsipipe.config import AugmentConfig
from wsipipe.learn.patchsets import load_patch_sets
from wsipipe.models.stain import fit_stain_normaliser, StainNormaliser

EVERYTHING = AugmentConfig(rotate_degrees=30, scale=(0.8, 1.2), shear_degrees=10, crop=48, blur_p=0.7,
                           noise_std=0.03, jpeg_p=0.7, hed_sigma=0.1, hed_bias=0.02)


@pytest.fixture(scope="module")
def patches(labelled_slides):
    ps = load_patch_sets(labelled_slides["stores"][:1])
    return ps.patches[np.random.default_rng(0).choice(len(ps.patches), 16, replace=False)]


def test_every_transform_keeps_shape_dtype_and_is_seeded(patches):
    names = list(named_transforms(EVERYTHING))
    assert names == ["flip_rot90", "affine", "crop", "color_jitter", "hed_jitter", "blur", "noise", "jpeg"]
    for name in names + [None]:
        aug = Augmenter(EVERYTHING, [name] if name else None)
        out = aug(patches, seed=7)
        edge = 48 if name in ("crop", None) else 64
        assert out.shape == (16, edge, edge, 3) and out.dtype == np.uint8, name
        np.testing.assert_array_equal(out, aug(patches, seed=7), err_msg=name)
        assert not np.array_equal(out, aug(patches, seed=8)), name
        if name not in ("crop", None):
            assert not np.array_equal(out, patches), name
    before = torch.rand(3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    Augmenter(EVERYTHING)(patches, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    with pytest.raises(ValueError, match="not enabled"):
        Augmenter(AugmentConfig(), ["jpeg"])
    assert before.shape == (3,)


def test_hed_jitter_moves_stain_concentrations_by_the_configured_amount(patches):
    img = torch.from_numpy(patches[0]).permute(2, 0, 1)
    alpha, beta = torch.tensor([1.3, 0.8, 1.0]), torch.tensor([0.01, -0.005, 0.0])
    out = hed_jitter(img, alpha, beta).permute(1, 2, 0).numpy()
    hed_in, hed_out = rgb2hed(patches[0]), rgb2hed(out)
    for k in (0, 1):
        # stained pixels that did not clip (values strictly inside 0..255), in skimage's HED space
        ok = ((out > 2) & (out < 253)).all(-1) & (hed_in[..., k] > 0.005)
        assert ok.sum() >= 200, k
        expect = hed_in[ok, k] * float(alpha[k]) + float(beta[k])
        assert np.median(np.abs(hed_out[ok, k] - expect)) < 0.001, k
        slope, intercept = np.polyfit(hed_in[ok, k], hed_out[ok, k], 1)
        assert slope == pytest.approx(float(alpha[k]), abs=0.02) and intercept == pytest.approx(float(beta[k]), abs=0.002)
    # random jitter: measured haematoxylin scale stays within 1 ± sigma and uses the range
    sigma = 0.2
    aug = Augmenter(AugmentConfig(flip_rot90=False, brightness=0, contrast=0, saturation=0, hue=0,
                                  hed_sigma=sigma, hed_bias=0.0), ["hed_jitter"])
    ratios = []
    for seed in range(12):
        out = aug(patches[:1], seed)[0]
        h_in, h_out = rgb2hed(patches[0])[..., 0], rgb2hed(out)[..., 0]
        sel = h_in > 0.01
        ratios.append(np.median(h_out[sel] / h_in[sel]))
    ratios = np.array(ratios)
    assert (ratios > 1 - sigma - 0.03).all() and (ratios < 1 + sigma + 0.03).all(), ratios
    assert ratios.max() - ratios.min() > sigma, ratios


def _lab_distance(a, b):
    la, lb = rgb2lab(a).reshape(-1, 3), rgb2lab(b).reshape(-1, 3)
    return float(np.abs(la.mean(0) - lb.mean(0)).sum() + np.abs(la.std(0) - lb.std(0)).sum())


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_stain_normalisation_undoes_a_stain_shift(patches, method):
    reference = patches[:8]
    norm = fit_stain_normaliser(method, reference)
    norm = StainNormaliser.from_dict(norm.to_dict())  # JSON-able parameters round-trip
    shifted = np.stack([hed_jitter(torch.from_numpy(p).permute(2, 0, 1), torch.tensor([1.5, 0.6, 1.0]),
                                   torch.zeros(3)).permute(1, 2, 0).numpy() for p in patches[8:]])
    fixed = norm.apply(shifted)
    assert fixed.shape == shifted.shape and fixed.dtype == np.uint8
    target = patches[8:]
    assert _lab_distance(fixed, target) < 0.5 * _lab_distance(shifted, target)


def test_augmented_copy_and_preview_grid(labelled_slides, tmp_path):
    full = store.open_store(labelled_slides["stores"][0])
    src = tmp_path / "small.zarr"  # a 40-patch excerpt keeps this quick
    small = store.open_store(src, "w")
    for name in ("patches", "coords", "labels", "groups"):
        small.create_array(name, data=full[name][:40], chunks=(16, *full[name].shape[1:]))
    store.update_meta(small, **{k: store.meta(full)[k] for k in ("slide", "tile", "labels")})
    stats = augment_store(src, tmp_path / "aug.zarr", EVERYTHING, copies=2, preview=tmp_path / "grid.png", n_preview=4)
    g, o = store.open_store(src), store.open_store(tmp_path / "aug.zarr")
    n = g["patches"].shape[0]
    assert o["patches"].shape == (2 * n, 48, 48, 3) and stats["n_patches"] == 2 * n
    np.testing.assert_array_equal(o["labels"][:], np.concatenate([g["labels"][:]] * 2))
    assert store.meta(o)["labels"]["classes"] == ["Normal", "Tumor"]
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] == (len(stats["transforms"]) + 1) * (64 + 2)  # a row per transform + 'all'
    augment_store(src, tmp_path / "aug2.zarr", EVERYTHING, copies=2)
    np.testing.assert_array_equal(store.open_store(tmp_path / "aug2.zarr")["patches"][:], o["patches"][:])
