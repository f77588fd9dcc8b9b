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
    chunk_patches: int = Field(64, ge=1, le=4096, description="Patches per Zarr chunk and per Dask task.")
    reader: Literal["auto", "openslide"] = Field(
        "auto", description="auto = decode TIFF/SVS tiles directly (same pixels, ~5x faster); openslide = always OpenSlide."
    )

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else self.patch_size


class ModelConfig(_Section):
    """Which classifier. arch / num_classes default to what the weights file records."""

    arch: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_]*$", description="torchvision architecture (default: from the weights, else resnet18)."
    )
    num_classes: int | None = Field(None, ge=1, le=1000, description="1 = binary (one logit, sigmoid); k>1 = softmax.")
    weights: Path | None = Field(None, description="Local weights file (.safetensors or .pt state dict).")
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


class StitchConfig(_Section):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Tumor probability threshold.")
    min_tumor_area_um2: float = Field(50_000.0, ge=0.0, description="Smaller tumor regions are dropped, µm².")
    top_k: int = Field(10, ge=1, description="Slide score = mean of the top-k patch probabilities (and max).")
    class_index: int = Field(-1, description="Which class is 'tumor' for k-class models (-1 = last).")


class DaskConfig(_Section):
    scheduler_address: str | None = Field(None, description="Existing dask.distributed scheduler; None = local.")
    num_workers: int | None = Field(None, ge=1, description="Local threads; None = number of cores.")


class ExportConfig(_Section):
    """Outputs for other tools, written beside the stitch outputs."""

    ome_zarr: bool = Field(True, description="heatmap.ome.zarr: heatmap + tumor-mask label, OME-NGFF 0.5 (napari, ome-zarr).")
    ome_tiff_mask: bool = Field(False, description="tumor_mask.ome.tif: pyramidal OME-TIFF overlay covering the slide.")
    ome_tiff_mpp: float = Field(2.0, gt=0.05, le=1000.0, description="Pixel size of the OME-TIFF mask's full level, µm.")
    validate_geojson: bool = Field(True, description="Check tumor.geojson against QuPath's schema and its polygons.")


class PipelineConfig(_Section):
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tile: TileConfig = Field(default_factory=TileConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    stitch: StitchConfig = Field(default_factory=StitchConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    mpp_override: float | None = Field(None, gt=0.01, le=1000.0, description="Force the slide's level-0 mpp.")

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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Defaults ← YAML file ← overrides (nested dicts, or dotted keys like ``"tile.mpp"``)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(path, "config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(path, f"not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(path, "top level must be a mapping of sections")
        data = loaded or {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        nested: dict[str, Any] = {}
        cursor = nested
        *parents, leaf = key.split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
        data = _deep_merge(data, nested)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(path, f"invalid configuration: {_format_validation_error(err)}") from None
