"""One typed configuration model: the single source of defaults.

YAML files in ``configs/`` override these defaults; command-line options and
flow parameters override the YAML. Invalid values fail before any work starts,
with the field and the value named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wsipipe.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TissueConfig(_Section):
    """Tissue detection on a low-resolution thumbnail. Sizes are physical (µm, µm²)."""

    detect: bool = Field(True, description="False = treat the whole slide as tissue (pre-cropped images).")
    thumb_mpp: float = Field(8.0, gt=1.0, le=128.0, description="Thumbnail resolution, µm/px.")
    max_thumb_px: int = Field(
        2048, ge=256, le=16384,
        description="Longest thumbnail edge: a larger slide's thumbnail (and its tissue detection) is made coarser "
        "than thumb_mpp, so planning costs the same on any slide.",
    )
    min_saturation: float = Field(
        0.07, ge=0.0, le=1.0, description="Floor under the Otsu saturation threshold (glass is below it)."
    )
    max_brightness: float = Field(
        0.94, gt=0.0, le=1.0, description="Pixels brighter than this (0..1 grey value) are background."
    )
    closing_um: float = Field(40.0, ge=0.0, description="Morphological closing radius, µm.")
    min_area_um2: float = Field(
        50_000.0, ge=0.0, description="Tissue pieces smaller than this are dropped, µm² (default 0.05 mm²)."
    )
    max_hole_um2: float = Field(20_000.0, ge=0.0, description="Holes smaller than this are filled, µm².")


class TileConfig(_Section):
    """Patch grid at a target resolution."""

    mpp: float = Field(0.5, gt=0.05, le=64.0, description="Target resolution of patches, µm/px.")
    patch_size: int = Field(224, ge=8, le=4096, description="Patch edge, pixels at the target mpp.")
    stride: int | None = Field(None, ge=1, le=4096, description="Grid step at target mpp; default = patch_size.")
    min_tissue: float = Field(0.5, ge=0.0, le=1.0, description="Keep patches with at least this tissue fraction (0 = every cell).")
    mpp_tolerance: float = Field(
        0.05, ge=0.0, le=0.5, description="Relative mpp difference treated as 'same resolution' (no resize)."
    )
    resample: Literal["area", "lanczos"] = Field(
        "area",
        description="Filter when patches are resampled from a level (no level at the asked mpp): area = mean of "
        "the level pixels each patch pixel covers (exact block means, computed once per tile, at whole factors "
        "such as 0.25 -> 0.5 µm/px), or lanczos (sharper, ~3x the CPU at 2x). BENCHMARKS.md compares them.",
    )
    chunk_patches: int = Field(64, ge=1, le=4096, description="Patches per Zarr chunk and per Dask task.")
    reader: Literal["auto", "openslide"] = Field(
        "auto", description="auto = decode TIFF/SVS tiles directly (same pixels, ~5x faster); openslide = always OpenSlide."
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="Where patches read from the slide during inference (tile.store_patches: false) are decoded: "
        "cpu = libjpeg-turbo; device = batched JPEG decode on the inference device (nvJPEG on CUDA), patches "
        "assembled and area-averaged there (docs/gpu.md); non-JPEG tiles fall back to the CPU decoder.",
    )
    on_corrupt_tile: Literal["fail", "skip"] = Field(
        "fail",
        description="Patches whose tile data cannot be decoded: fail = the slide fails, naming them; "
        "skip = they are left out of the results and listed in the store and summary.json.",
    )

    codec: Literal["zstd", "none", "jpeg"] = Field(
        "zstd",
        description="Stored patches: zstd = lossless (~1.1x on real H&E); none = raw bytes, the least CPU; "
        "jpeg = lossy, ~4x smaller at quality 95.",
    )
    zstd_level: int = Field(
        -3, ge=-7, le=19,
        description="zstd level when codec is zstd. Real H&E barely compresses (1.11x at -3, 1.14x at 1), "
        "and level 1 writes 2.6x and reads 2.4x slower than -3 (bench/bench_storage.py).",
    )
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality when codec is jpeg (4:4:4 chroma).")
    store_patches: bool = Field(
        True,
        description="False = patches are not stored; the infer stage reads them from the slide and streams them "
        "straight into the model; the store still gets coords, grid, tissue fraction, QC measures, corrupt flags "
        "and probabilities.",
    )

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else self.patch_size


# A torchvision name, or timm:<name> with timm's dots and digits (timm:resnet18.a1_in1k).
ARCH_PATTERN = r"^([a-z][a-z0-9_]*|timm:[a-z0-9][a-z0-9_.\-]*)$"


class ModelConfig(_Section):
    """Which classifier. arch / num_classes default to what the weights file records."""

    arch: str | None = Field(
        None, pattern=ARCH_PATTERN,
        description="torchvision name (resnet18) or timm:<name> (timm:vit_tiny_patch16_224, timm:resnet18.a1_in1k); "
        "default: from the model card or weights, else resnet18. TorchScript, export programs and WSInfer folders ignore it.",
    )
    num_classes: int | None = Field(None, ge=1, le=1000, description="1 = binary (one logit, sigmoid); k>1 = softmax.")
    weights: Path | None = Field(None, description="Local model: a weights file (.safetensors, .pt state dict), a TorchScript "
                                 "file, a .pt2 export program, or a WSInfer or card.json folder.")
    # The name is checked against torchvision when the model is built (first thing in a
    # run), not here: importing torchvision costs seconds that `wsipipe tile` doesn't need.

    @property
    def arch_for_training(self) -> str:
        return self.arch or "resnet18"


class InferenceConfig(_Section):
    batch_size: int = Field(64, ge=1, le=4096)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast where the hardware has it (CUDA, AVX512-BF16/AMX CPUs), else fp32."
    )
    prefetch_batches: int = Field(3, ge=1, le=64, description="Batches read ahead of the model.")
    compile: bool = Field(
        False,
        description="torch.compile the model (inductor): 1.25-1.34x ResNet18 bf16 on this CPU, after minutes of "
        "compiling in each new process; worth it for long runs (BENCHMARKS.md).",
    )


class StitchConfig(_Section):
    threshold: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Tumor probability threshold. None (unset) = the threshold in the model's card (chosen on the "
        "validation split by `wsipipe train`), else default_threshold; a value set here wins over the card.",
    )
    default_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Threshold when none is set and the model has no card threshold.")
    min_tumor_area_um2: float = Field(50_000.0, ge=0.0, description="Smaller tumor regions are dropped, µm².")
    top_k: int = Field(
        10, ge=1,
        description="Slide score = mean of the top-k patch probabilities (and max); k is at most this.",
    )
    top_k_fraction: float = Field(
        0.1, gt=0.0, le=1.0,
        description="... and at most this share of the analysed patches: k = clamp(ceil(top_k_fraction x n), 1, "
        "top_k), so a 14-patch slide is scored on its top 2, not on 10 of its 14. The slide is called tumor when "
        "it has a tumor region or when the top-k mean reaches the threshold; QC flags the slide when the two disagree.",
    )
    max_background: float = Field(
        0.7, ge=0.0, le=1.0,
        description="Patches whose QC background (glass) fraction is above this are not analysed: left out of the "
        "heatmap, the slide score, the tumor regions and the counts (1 = analyse every patch; stores without QC "
        "measures analyse every patch).",
    )
    tumor_class: str | None = Field(
        None, min_length=1,
        description="Which probability column is tumor, by the class name the model's card gives it (e.g. 'tumor'). "
        "None = the card's positive class (a class whose name contains 'tumor', else the last); a name that is no "
        "column fails, listing the columns.",
    )
    class_index: int = Field(
        -1, description="Which column is 'tumor' for k-class models whose columns have no names (no model card; -1 = last).",
    )

    @property
    def tumor_threshold(self) -> float:
        """The threshold in force: ``threshold`` when set, else ``default_threshold``."""
        return self.default_threshold if self.threshold is None else self.threshold


class DaskConfig(_Section):
    scheduler_address: str | None = Field(None, description="Existing dask.distributed scheduler; None = local.")
    num_workers: int | None = Field(None, ge=1, description="Local threads; None = number of cores.")
    dashboard_address: str = Field(
        "127.0.0.1:0", min_length=1,
        description="Where a LocalCluster's scheduler and workers serve HTTP (dashboard, /health, /metrics): the "
        "loopback on a free port by default; '127.0.0.1:8787' for a fixed port, ':8787' for every interface.",
    )


class OrchestrationConfig(_Section):
    """How the Prefect flows (flows/) and `wsipipe run` schedule work; no effect on any output."""

    slides_in_flight: int = Field(2, ge=1, le=256, description="Slides an archive run or `wsipipe run` processes at once (their stages overlap).")
    stage_retries: int = Field(2, ge=0, le=20, description="Retries of a stage after a transient I/O error.")
    retry_delay_s: float = Field(10.0, ge=0.0, description="Wait before a stage retry, seconds.")
    stage_timeout_s: float = Field(6 * 3600.0, gt=0.0, description="A stage running longer than this fails, seconds.")
    local_cluster_processes: bool = Field(
        False, description="LocalCluster workers as processes (True) or threads in the flow's process (False: starts "
        "in well under a second; the tile reads and Zarr writes release the GIL).",
    )
    gpu_tag: str = Field(
        "wsipipe-gpu", pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefect tag on the inference stage; `prefect concurrency-limit create TAG 1` = one slide per GPU.",
    )


class AugmentConfig(_Section):
    """Training-time augmentation (wsipipe.learn.augment); a probability or magnitude of 0 turns a transform off."""

    seed: int = Field(0, description="Seed of the augmentation random stream.")
    flip_rot90: bool = Field(True, description="Random flips and 90° rotations (tissue has no orientation).")
    rotate_degrees: float = Field(0.0, ge=0.0, le=180.0, description="Arbitrary rotation range ±deg (reflect-free, edges filled white).")
    scale: tuple[float, float] = Field((1.0, 1.0), description="Random scale range (1, 1 = off).")
    shear_degrees: float = Field(0.0, ge=0.0, le=45.0)
    crop: int | None = Field(None, ge=8, le=4096, description="Random crop edge, px (None = whole patch).")
    brightness: float = Field(0.1, ge=0.0, le=1.0)
    contrast: float = Field(0.1, ge=0.0, le=1.0)
    saturation: float = Field(0.1, ge=0.0, le=1.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)
    hed_sigma: float = Field(0.05, ge=0.0, le=1.0, description="HED stain jitter: per-stain scale ~ U(1±sigma) of concentrations.")
    hed_bias: float = Field(0.01, ge=0.0, le=0.5, description="HED stain jitter: per-stain shift ~ U(±bias) of concentrations.")
    blur_p: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a gaussian blur.")
    blur_sigma: tuple[float, float] = Field((0.1, 1.5))
    noise_std: float = Field(0.0, ge=0.0, le=0.5, description="Gaussian noise std on 0..1 pixels.")
    jpeg_p: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a JPEG re-encode.")
    jpeg_quality: tuple[int, int] = Field((50, 95))
    stain_normalise: Literal["none", "macenko", "reinhard"] = Field(
        "none", description="Stain normalisation fitted to a reference patch set, before augmentation."
    )


class PretrainConfig(_Section):
    """Self-supervised pretraining of an encoder (wsipipe.learn.pretrain)."""

    method: Literal["simclr", "byol", "swav"] = "simclr"
    arch: str = Field("resnet18", pattern=r"^[a-z][a-z0-9_]*$")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=2, le=4096)
    lr: float = Field(1e-3, gt=0.0)
    temperature: float | None = Field(
        None, gt=0.0, le=10.0,
        description="Softmax temperature: NT-Xent (SimCLR, default 0.2), swapped prediction (SwAV, default 0.5); unset = the method's.",
    )
    ema: float = Field(0.99, ge=0.0, lt=1.0, description="Target-network EMA momentum (BYOL).")
    projection_dim: int = Field(128, ge=8, le=8192)
    hidden_dim: int = Field(512, ge=8, le=16384)
    crop: int = Field(96, ge=8, le=4096, description="Views are random crops of this edge.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (resume point).")
    # SwAV's prototypes: a few dozen suit patch-scale data, where a batch holds fewer images
    # than ImageNet's 3000 prototypes could be spread over.
    swav_prototypes: int = Field(64, ge=2, le=65536, description="Number of learnable prototypes (SwAV).")
    swav_epsilon: float = Field(0.05, gt=0.0, le=10.0, description="Sinkhorn-Knopp entropy weight: smaller is sharper (SwAV).")
    swav_sinkhorn_iterations: int = Field(3, ge=1, le=100, description="Sinkhorn-Knopp normalisation rounds (SwAV).")
    swav_freeze_steps: int = Field(20, ge=0, description="Prototypes stay fixed for this many first steps (SwAV).")
    swav_small_crops: int = Field(0, ge=0, le=16, description="Extra small views per patch, multi-crop (SwAV; 0 = two views).")
    swav_small_crop: int = Field(48, ge=8, le=4096, description="Edge of the small views, px, at most `crop` (SwAV).")
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def effective_temperature(self) -> float:
        """``temperature``, or the method's own when unset. SwAV's is higher
        because at 0.2 its codes fell to uniform (every patch on every prototype, a useless
        encoder) in one of three 300-step runs on generated slides, and at 0.5 in none
        (bench/bench_ssl_probe.py). BYOL uses no temperature; its 0.2 keeps checkpoints
        written when 0.2 was everyone's default resumable."""
        if self.temperature is not None:
            return self.temperature
        return 0.5 if self.method == "swav" else 0.2

    def resolved(self) -> PretrainConfig:
        """This config with ``temperature`` set (what a checkpoint records)."""
        return self.model_copy(update={"temperature": self.effective_temperature()})


class TrainConfig(_Section):
    """Supervised (re)training of the patch classifier (wsipipe.learn.train.retrain)."""

    arch: str = Field("resnet18", pattern=ARCH_PATTERN,
                      description="torchvision name (resnet18) or timm:<name> (timm:resnet18, built with pretrained=False).")
    init: Literal["scratch", "encoder", "weights", "production"] = Field(
        "scratch", description="Start from: random init, a pretrained encoder, a local weights file, the registry's production model."
    )
    init_path: Path | None = Field(None, description="Encoder checkpoint or weights file for init=encoder/weights.")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=2, le=4096)
    lr: float = Field(1e-3, gt=0.0)
    train_size: int | None = Field(128, ge=8, le=4096, description="Train on random crops of this edge (None = whole patches).")
    patience: int = Field(3, ge=1, description="Early stopping: epochs without a better validation AUC (ties: lower validation log-loss).")
    min_epochs: int = Field(4, ge=1, description="Early stopping never stops before this many epochs (a validation AUC of 1.0 cannot improve).")
    threshold_metric: Literal["balanced_accuracy", "dice"] = Field(
        "balanced_accuracy", description="The decision threshold stored in the model card maximises this on the validation split.",
    )
    min_overlap: float = Field(0.5, ge=0.0, le=1.0, description="Patch is in a class when this fraction of it lies in the class polygon.")
    max_normal_overlap: float = Field(0.1, ge=0.0, le=1.0, description="... and background when at most this fraction lies in any polygon.")
    split: tuple[float, float, float] = Field(
        (0.6, 0.2, 0.2), description="train/val/test fractions of slides (groups), or of each class's patches when split spatially.",
    )
    split_by: Literal["auto", "slide", "spatial"] = Field(
        "auto", description="slide = whole slides (groups) per split; spatial = contiguous blocks of each slide's patch grid "
        "with a one-patch gap; auto = slide when there are at least as many slides as splits, else spatial.",
    )
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    registry: Path = Field(Path("models"), description="Model registry folder.")
class QCConfig(_Section):
    """Slide quality control: per-patch thresholds and per-slide flag limits (see wsipipe.tiles.qc)."""

    min_focus: float = Field(
        20.0, ge=0.0, description="Patches whose Laplacian variance (grey, 2x downscaled) is below this are blurred."
    )
    relative_focus: float = Field(
        0.15, ge=0.0, le=1.0, description="... and so are patches below this fraction of the slide's 75th-percentile focus."
    )
    max_blur_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Flag the slide above this fraction of blurred tissue patches.")
    pen_patch_fraction: float = Field(0.1, gt=0.0, le=1.0, description="A patch with this fraction of ink-coloured pixels has a pen mark.")
    min_pen_patches: int = Field(2, ge=1, description="Flag pen marks from this many marked patches.")
    max_saturation: float = Field(0.75, gt=0.0, le=1.0, description="Mean tissue saturation above this is a colour outlier.")
    max_colour_outlier_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Flag the slide above this fraction of colour outliers.")
    min_tissue_area_mm2: float = Field(1.0, ge=0.0, description="Flag slides with less tissue than this, mm².")
    mpp_range: tuple[float, float] = Field(
        (0.1, 2.0),
        description="Level-0 µm/px of brightfield scanners: a value the user gives outside it is flagged; one the file "
        "gives outside it is no resolution (the slide stops unless mpp_default or mpp_override gives one).",
    )
    min_slide_extent_mm: float = Field(
        2.0, ge=0.0,
        description="A slide whose resolution the file does not state (override, default, objective power) and whose "
        "image is shorter than this on its long side, mm, gets mpp_suspicious: glass scans are larger.",
    )
    max_upsample: float = Field(
        1.25, ge=1.0,
        description="Patches enlarged from a coarser slide by more than this factor get the review flag upsampled "
        "(info up to it); from 2x the focus check is left to that flag (upsampling blurs every patch).",
    )
    review_margin: float = Field(0.1, ge=0.0, le=0.5, description="Slide scores this close to the threshold need review.")
    ood_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Flag the slide out_of_domain (review) when more than this fraction of its analysed patches lie "
        "beyond the 99th percentile of the model's training patches' feature distance (its card's domain).",
    )
    report_patches: int = Field(12, ge=0, le=200, description="Patches per gallery in the slide report.")


class ExportConfig(_Section):
    """Outputs for other tools, written beside the stitch outputs."""

    ome_zarr: bool = Field(True, description="heatmap.ome.zarr: heatmap + tumor-mask label, OME-NGFF 0.5 (napari, ome-zarr).")
    ome_tiff_mask: bool = Field(False, description="tumor_mask.ome.tif: pyramidal OME-TIFF overlay covering the slide.")
    ome_tiff_mpp: float = Field(2.0, gt=0.05, le=1000.0, description="Pixel size of the OME-TIFF mask's full level, µm.")
    validate_geojson: bool = Field(True, description="Check tumor.geojson against QuPath's schema and its polygons.")


class MilConfig(_Section):
    """Slide-level attention-MIL models from patch features (`wsipipe mil train`, `wsipipe run --mil`)."""

    model: Path | None = Field(None, description="MIL model folder applied after stitching (`run --mil`); None = none.")
    folds: int = Field(5, ge=2, le=50, description="Cross-validation folds (by patient when the labels name them, else by slide).")
    epochs: int = Field(40, ge=1, le=10000, description="Passes over the training slides (one slide per step).")
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    hidden: int = Field(128, ge=4, le=8192, description="Width of the patch embedding inside the MIL model.")
    attention: int = Field(64, ge=4, le=8192, description="Width of the gated attention layer.")
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    max_patches: int = Field(1024, ge=8, description="Training draws at most this many patches of a slide per step.")
    seed: int = 0


class PipelineConfig(_Section):
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tile: TileConfig = Field(default_factory=TileConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    stitch: StitchConfig = Field(default_factory=StitchConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    qc: QCConfig = Field(default_factory=QCConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    mil: MilConfig = Field(default_factory=MilConfig)
    mpp_override: float | None = Field(None, gt=0.01, le=1000.0, description="Force the slide's level-0 mpp.")
    mpp_default: float | None = Field(
        None, gt=0.01, le=1000.0,
        description="Level-0 mpp for slides whose file states none (never replaces a resolution the file states).",
    )

    def section_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections: the identity a stage's outputs depend on."""
        dumped = self.model_dump(mode="json")
        data = {name: dumped[name] for name in (sections or dumped)}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        parts.append(f"{field}={value!r}: {e['msg']}")
    return "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(path, "top level must be a mapping of sections")
    return loaded or {}


def _nested(overrides: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each non-None override (dotted key like ``"tile.mpp"``, or a nested dict) as a nested dict."""
    out = []
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        nested: dict[str, Any] = {}
        cursor = nested
        *parents, leaf = key.split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
        out.append(nested)
    return out


def _validate(data: dict[str, Any], path: Path | None) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(path, f"invalid configuration: {_format_validation_error(err)}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults ← YAML file ← overrides (nested dicts, or dotted keys like ``"tile.mpp"``)."""
    return load_config_sources(path, overrides)[0]


def _leaves(data: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves of nested mappings (a section's whole value counts as set)."""
    if isinstance(data, dict) and data:
        return [leaf for key, value in data.items() for leaf in _leaves(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def load_config_sources(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, override_label: str = "--set",
) -> tuple[PipelineConfig, dict[str, str]]:
    """:func:`load_config`, and where each field that is not a default came from: dotted field
    -> ``"from <file name>"`` or ``"from <override_label>"`` (the last one to set it)."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    path = Path(path) if path is not None else None
    if path is not None:
        data = _read_yaml(path)
        sources.update({leaf: f"from {path.name}" for leaf in _leaves(data)})
    for nested in _nested(overrides):
        data = _deep_merge(data, nested)
        sources.update({leaf: f"from {override_label}" for leaf in _leaves(nested)})
    return _validate(_with_aliases(data, sources), path), sources


# Other names a field answers to: the glass limit is applied when stitching (changing it
# restitches, it never retiles), but it reads as a tiling rule, so ``tile.max_background`` works too.
ALIASES = {("tile", "max_background"): ("stitch", "max_background")}


def _with_aliases(data: dict[str, Any], sources: dict[str, str]) -> dict[str, Any]:
    """``data`` with each alias moved to the field it names (the alias wins: it was written on purpose)."""
    for (section, key), (to_section, to_key) in ALIASES.items():
        part = data.get(section)
        if isinstance(part, dict) and key in part:
            part = dict(part)
            value = part.pop(key)
            data = {**data, section: part, to_section: {**(data.get(to_section) or {}), to_key: value}}
            if f"{section}.{key}" in sources:
                sources[f"{to_section}.{to_key}"] = sources.pop(f"{section}.{key}")
    return data


def value_source(dotted: str, sources: dict[str, str]) -> str:
    """Where a field's value came from, from :func:`load_config_sources`' sources: a value set for
    its whole section (or a whole list) covers it; ``default`` when nothing set it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in sources:
            return sources[".".join(parts[:n])]
    return "default"


def show_config(cfg: PipelineConfig, sources: dict[str, str]) -> str:
    """The effective configuration as YAML, each field followed by a comment saying where its
    value came from (``# default``, ``# from X.yaml``, ``# from --set``); loads back as the same config."""
    lines: list[str] = []

    def walk(data: dict[str, Any], prefix: str, indent: str) -> None:
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                lines.append(f"{indent}{key}:")
                walk(value, f"{dotted}.", indent + "  ")
            else:
                text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
                lines.append(f"{indent}{key}: {text}  # {value_source(dotted, sources)}")

    walk(cfg.model_dump(mode="json"), "", "")
    return "\n".join(lines) + "\n"


def config_fields(cfg: PipelineConfig) -> dict[str, Any]:
    """Every field of ``cfg`` by its dotted name, JSON values."""
    flat: dict[str, Any] = {}

    def walk(data: dict[str, Any], prefix: str) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(cfg.model_dump(mode="json"), "")
    return flat
