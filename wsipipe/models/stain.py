"""Stain normalisation fitted to a reference patch set: Macenko and Reinhard (pure numpy).

    norm = fit_stain_normaliser("macenko", reference_patches)
    same_look = norm.apply(patches)                     # (N, H, W, 3) uint8 -> uint8
    json.dumps(norm.to_dict()); StainNormaliser.from_dict(d)

Macenko (2009): optical densities of stained pixels span a plane; the two stain vectors
are the extreme angles (1st / 99th percentile) of the pixels projected on it. A patch is
unmixed with its own vectors and rebuilt with the reference's, concentrations scaled so
their 99th percentiles match. Reinhard (2001): match the per-channel mean and standard
deviation in CIELAB.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from wsipipe.errors import StainError

_IO = 255.0  # transmitted light intensity
_OD_MIN = 0.15  # optical density below which a pixel is background (glass)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)


def macenko_stains(rgb: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """(3, 2) unit stain vectors (haematoxylin, eosin) in OD space from stained pixels of ``rgb``."""
    od = _od(rgb)
    od = od[(od > _OD_MIN).all(axis=1)]
    if len(od) < 10:
        raise StainError(None, f"too few stained pixels ({len(od)} of {len(rgb.reshape(-1, 3))}) to estimate stain vectors (is this glass?)")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]  # the two largest eigenvalues
    plane = plane * np.sign(plane[0:1, :] + 1e-12)  # point into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin absorbs more red than eosin does: it is the vector with the larger first component.
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    return stains / np.linalg.norm(stains, axis=0, keepdims=True)


def _concentrations(rgb: np.ndarray, stains: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(stains, _od(rgb).T, rcond=None)[0]  # (2, pixels)


@dataclass
class StainNormaliser:
    method: str
    params: dict = field(default_factory=dict)

    def apply(self, patches: np.ndarray) -> np.ndarray:
        patches = np.asarray(patches)
        single = patches.ndim == 3
        batch = patches[None] if single else patches
        out = np.stack([_APPLY[self.method](p, self.params) for p in batch])
        return out[0] if single else out

    def to_dict(self) -> dict:
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict) -> StainNormaliser:
        if d.get("method") not in _APPLY:
            raise StainError(None, f"unknown stain normaliser {d.get('method')!r} (use macenko or reinhard)")
        return cls(d["method"], dict(d.get("params", {})))


def _apply_macenko(rgb: np.ndarray, params: dict) -> np.ndarray:
    ref_stains, ref_max = np.asarray(params["stains"]), np.asarray(params["max_concentration"])
    try:
        stains = macenko_stains(rgb)
    except ValueError:
        return rgb  # nothing stained to normalise
    conc = _concentrations(rgb, stains)
    scale = ref_max / np.maximum(np.percentile(conc, 99, axis=1), 1e-6)
    od = ref_stains @ (conc * scale[:, None])
    out = _IO * np.exp(-od.T) - 1.0
    return np.clip(out, 0, 255).round().astype(np.uint8).reshape(rgb.shape)


def _apply_reinhard(rgb: np.ndarray, params: dict) -> np.ndarray:
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(rgb)
    mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0)
    out = (lab - mean) / np.maximum(std, 1e-6) * np.asarray(params["std"]) + np.asarray(params["mean"])
    with warnings.catch_warnings():
        # Matched statistics push a few pixels outside the RGB gamut; they are clipped just below,
        # and skimage's per-patch warning about it would repeat for every patch of a slide.
        warnings.filterwarnings("ignore", message=".*negative Z values.*")
        rgb_out = lab2rgb(out)
    return (np.clip(rgb_out, 0, 1) * 255).round().astype(np.uint8)


_APPLY = {"macenko": _apply_macenko, "reinhard": _apply_reinhard}


def fit_stain_normaliser(method: str, reference: np.ndarray) -> StainNormaliser:
    """Fit ``method`` ('macenko' or 'reinhard') to reference patches (N, H, W, 3) uint8, pooled."""
    reference = np.asarray(reference).reshape(-1, 1, 3)
    if method == "macenko":
        stains = macenko_stains(reference)
        conc = _concentrations(reference, stains)
        return StainNormaliser(method, {"stains": stains.tolist(),
                                        "max_concentration": np.percentile(conc, 99, axis=1).tolist()})
    if method == "reinhard":
        from skimage.color import rgb2lab

        lab = rgb2lab(reference).reshape(-1, 3)
        return StainNormaliser(method, {"mean": lab.mean(0).tolist(), "std": lab.std(0).tolist()})
    raise StainError(None, f"unknown stain normaliser {method!r} (use macenko or reinhard)")
