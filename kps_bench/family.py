"""The family of a loaded base pipeline (SDXL, or Stable Diffusion 1.x/2.x), read from its class, and the image
resolutions that suit it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SDXL, SD = "SDXL", "Stable Diffusion 1.x/2.x"
SD_MAX_RESOLUTION = 768  # pixels per side; SD 1.x (trained at 512) repeats and deforms subjects above it


@dataclass(frozen=True)
class BaseFamily:
    """``name``: :data:`SDXL`, :data:`SD`, or None for another pipeline class; ``native``: the pixels per side the base
    draws by default (UNet sample size x VAE factor: 1024 for SDXL 1.0, 512 for SD 1.5, 768 for SD 2.1), or None."""

    name: str | None
    pipeline_class: str
    native: int | None

    def resolution_warning(self, resolution: int) -> str | None:
        """Why ``resolution`` (pixels per side) does not suit this base, or None: an SDXL base below its native
        resolution, an SD 1.x/2.x base above 768 px (or above its native resolution, when that is larger)."""
        if self.native is None:
            return None
        if self.name == SDXL and resolution < self.native:
            why = "below it SDXL loses detail and composition"
        elif self.name == SD and resolution > max(SD_MAX_RESOLUTION, self.native):
            why = f"above {max(SD_MAX_RESOLUTION, self.native)} px it repeats and deforms subjects"
        else:
            return None
        return (f"generation.resolution {resolution} px does not suit the base model: it is {self.name} "
                f"({self.pipeline_class}), native resolution {self.native} px, and {why}, which biases every metric. "
                f"Use --set generation.resolution={self.native}, or a protocol made for this base.")


def base_family(pipe) -> BaseFamily:
    """The family of a loaded diffusers pipeline, from its class."""
    name = family_of(type(pipe))
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor if name else None
    return BaseFamily(name, type(pipe).__name__, native)


def family_of(pipeline_class: type) -> str | None:
    """:data:`SDXL`, :data:`SD`, or None, for a diffusers pipeline class (subclasses included)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return (SDXL if issubclass(pipeline_class, StableDiffusionXLPipeline)
            else SD if issubclass(pipeline_class, StableDiffusionPipeline) else None)


def declared_pipeline_class(resolved: str) -> type | None:
    """The diffusers pipeline class that a base model's ``model_index.json`` names (``_class_name``), read without
    loading a weight: from the folder ``resolved``, or for a hub id from the hub cache (nothing is downloaded). None
    when that file is not there, cannot be read, or names a class diffusers does not have: loading the pipeline
    then tells."""
    import diffusers

    index = Path(resolved) / "model_index.json"
    if not Path(resolved).exists():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(resolved, "model_index.json")
        except ValueError:  # not a hub id either
            return None
        if not isinstance(cached, str):
            return None
        index = Path(cached)
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else None
