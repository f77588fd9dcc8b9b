"""One composable, seeded augmentation pipeline on ``torchvision.transforms.v2``.

    aug = Augmenter(cfg.augment)                  # from the YAML `augment:` section
    out = aug(patches, seed=step)                 # (N, H, W, 3) uint8 in, same dtype out

Every transform keeps uint8 RGB; the output shape changes only through ``crop``. A call is
reproducible from its ``seed`` (torch's generator is forked and seeded inside the call, so
the caller's random state is untouched). H&E stain jitter works in HED optical-density
space (Ruifrok & Johnston's stain matrix, as ``skimage.color.rgb2hed`` uses): each stain's
concentration c becomes ``c * alpha + beta``, alpha ~ U(1 ± hed_sigma), beta ~ U(± hed_bias).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms import v2

from wsipipe.config import AugmentConfig
from wsipipe.errors import TrainingDataError

_LOG_FLOOR = float(np.log(1e-6))  # skimage's rgb2hed clamps intensities at 1e-6 before the log
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) float RGB in 0..1 -> (..., 3) stain concentrations (H, E, DAB), skimage's scale."""
    return (torch.log(rgb.clamp_min(1e-6)) / _LOG_FLOOR) @ _HED_FROM_RGB


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    return torch.exp(-(hed * -_LOG_FLOOR) @ _RGB_FROM_HED).clamp(0.0, 1.0)


def hed_jitter(image: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 -> uint8 with stain concentrations ``c * alpha + beta`` (per stain, shape (3,))."""
    rgb = image.permute(1, 2, 0).float() / 255.0
    hed = rgb_to_hed(rgb) * alpha + beta
    return (hed_to_rgb(hed) * 255.0).round().to(torch.uint8).permute(2, 0, 1)


class HEDJitter:
    """Random H&E stain jitter (the DAB channel is left alone: H&E slides carry none)."""

    def __init__(self, sigma: float, bias: float):
        self.sigma, self.bias = sigma, bias

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        alpha = 1.0 + (torch.rand(3) * 2 - 1) * self.sigma
        beta = (torch.rand(3) * 2 - 1) * self.bias
        alpha[2], beta[2] = 1.0, 0.0
        return hed_jitter(image, alpha, beta)


class FlipRot90:
    """One of the 8 symmetries of the square, uniformly (tissue has no orientation)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()))
        out = torch.rot90(image, k, dims=(1, 2))
        return out.flip(2) if bool(torch.rand(()) < 0.5) else out


class GaussianNoiseU8:
    """Additive gaussian noise of ``std`` (on 0..1 pixels), back to uint8."""

    def __init__(self, std: float):
        self.std = std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        noisy = image.float() + torch.randn(image.shape) * (self.std * 255.0)
        return noisy.round().clamp(0, 255).to(torch.uint8)


class JPEGArtefacts:
    """Re-encode as JPEG at a random quality in ``quality`` (inclusive), via Pillow's libjpeg."""

    def __init__(self, quality: tuple[int, int]):
        self.lo, self.hi = int(quality[0]), int(quality[1])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import io

        from PIL import Image

        q = int(torch.randint(self.lo, self.hi + 1, ()))
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=q)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return torch.from_numpy(decoded.copy()).permute(2, 0, 1)


def named_transforms(cfg: AugmentConfig) -> OrderedDict[str, Callable]:
    """The enabled transforms by name, in pipeline order (geometry, colour, stain, degradations)."""
    t: OrderedDict[str, Callable] = OrderedDict()
    if cfg.flip_rot90:
        t["flip_rot90"] = FlipRot90()
    if cfg.rotate_degrees or cfg.scale != (1.0, 1.0) or cfg.shear_degrees:
        t["affine"] = v2.RandomAffine(cfg.rotate_degrees, scale=cfg.scale, shear=cfg.shear_degrees or None,
                                      interpolation=v2.InterpolationMode.BILINEAR, fill=255)
    if cfg.crop:
        t["crop"] = v2.RandomCrop(cfg.crop)
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        t["color_jitter"] = v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    if cfg.hed_sigma or cfg.hed_bias:
        t["hed_jitter"] = HEDJitter(cfg.hed_sigma, cfg.hed_bias)
    if cfg.blur_p:
        t["blur"] = v2.RandomApply([v2.GaussianBlur(5, sigma=cfg.blur_sigma)], p=cfg.blur_p)
    if cfg.noise_std:
        t["noise"] = GaussianNoiseU8(cfg.noise_std)
    if cfg.jpeg_p:
        t["jpeg"] = v2.RandomApply([JPEGArtefacts(cfg.jpeg_quality)], p=cfg.jpeg_p)
    return t


class Augmenter:
    """The configured pipeline over (N, H, W, 3) uint8 batches (one draw of parameters per patch)."""

    def __init__(self, cfg: AugmentConfig, only: list[str] | None = None):
        transforms = named_transforms(cfg)
        unknown = set(only or []) - set(transforms)
        if unknown:
            raise ValueError(f"transforms {sorted(unknown)} are not enabled in the config (enabled: {list(transforms)})")
        self.cfg = cfg
        self.names = [n for n in transforms if only is None or n in only]
        self.pipeline = v2.Compose([transforms[n] for n in self.names])

    def __call__(self, patches: np.ndarray, seed: int) -> np.ndarray:
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise TrainingDataError(None, f"need (N, H, W, 3) uint8 patches, got {patches.shape} {patches.dtype}")
        # One thread: ops on one small patch are far too small to split, and splitting them
        # anyway costs 10-100x on a busy machine (measured: HED jitter of 40 patches 3.6 s -> 0.03 s).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                images = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)
                out = [self.pipeline(img) for img in images]
        finally:
            torch.set_num_threads(threads)
        return torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()


def preview_grid(patches: np.ndarray, cfg: AugmentConfig, n_samples: int = 6, seed: int = 0) -> np.ndarray:
    """An RGB image: one row per enabled transform (plus 'all'), the original then ``n_samples``
    draws of that transform alone, on the first patch of ``patches``."""
    from PIL import Image, ImageDraw

    src = patches[:1]
    names = list(named_transforms(cfg)) + ["all"]
    h, w = src.shape[1:3]
    label_w, pad = 90, 2
    grid = Image.new("RGB", (label_w + (n_samples + 1) * (w + pad), len(names) * (h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, name in enumerate(names):
        aug = Augmenter(cfg, None if name == "all" else [name])
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 6), name, fill="black")
        grid.paste(Image.fromarray(src[0]), (label_w, y))
        for s in range(n_samples):
            sample = aug(src, seed + s)[0]
            tile = Image.fromarray(sample).resize((w, h)) if sample.shape[:2] != (h, w) else Image.fromarray(sample)
            grid.paste(tile, (label_w + (s + 1) * (w + pad), y))
    return np.asarray(grid)


def augment_store(src: str | Path, out: str | Path, cfg: AugmentConfig, copies: int = 1,
                  preview: str | Path | None = None, n_preview: int = 6, progress=None) -> dict:
    """An augmented copy of a patch store (``copies`` draws per patch) for inspection, with
    its ``coords`` / ``labels`` / ``groups`` carried over, and optionally a PNG preview grid."""
    from PIL import Image

    from wsipipe.tiles import store
    from wsipipe.files import write_atomic
    from wsipipe.tiles.tiling import stored_patches

    g = store.open_store(src)
    patches = stored_patches(g, src)
    n = int(patches.shape[0])
    aug = Augmenter(cfg)
    chunk = int(patches.chunks[0])
    first = aug(np.asarray(patches[:1]), 0)
    o = store.open_store(out, "w")
    dst = o.create_array(store.PATCHES, shape=(n * copies, *first.shape[1:]), chunks=(chunk, *first.shape[1:]),
                         dtype="uint8")
    total = copies * len(store.chunk_slices(n, chunk))
    done = 0
    for c in range(copies):
        for sl in store.chunk_slices(n, chunk):
            # seed per (copy, chunk): reproducible, and independent of how the work is split
            dst[c * n + sl.start : c * n + sl.stop] = aug(np.asarray(patches[sl]), cfg.seed * 1_000_003 + c * n + sl.start)
            done += 1
            if progress:
                progress(done, total)
    for name in (store.COORDS, store.LABELS, store.GROUPS):
        arr = store.optional_array(g, name)
        if arr is not None:
            o.create_array(name, data=np.concatenate([np.asarray(arr[:])] * copies), overwrite=True)
    info = store.meta(g)
    sections = (store.META_SLIDE, store.META_TILE, store.META_LABELS)
    store.update_meta(o, **{k: v for k, v in info.items() if k in sections},
                      augment={"source": str(src), "copies": copies, "config": cfg.model_dump(mode="json")})
    if preview is not None:
        import io

        buf = io.BytesIO()
        Image.fromarray(preview_grid(np.asarray(patches[:1]), cfg, n_preview, cfg.seed)).save(buf, format="PNG")
        write_atomic(preview, buf.getvalue())
    return {"n_patches": n * copies, "transforms": aug.names}
