"""The one typed settings object. Built by the CLI (flags) or from the environment (``LCM_LIVE_*``),
then passed down; nothing deep inside reads the environment or globals.

``Settings.engine`` is what the engine needs to load and run a model; ``Settings.studio`` is what the
server needs. Environment: ``LCM_LIVE_ENGINE__MODEL=...``, ``LCM_LIVE_STUDIO__PORT=...``; the token also
as plain ``LCM_LIVE_TOKEN``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "SimianLuo/LCM_Dreamshaper_v7"


class LoraSpec(BaseModel):
    """A style LoRA stacked on the model: a hub id, a folder or a .safetensors file, and its scale."""

    model_config = ConfigDict(frozen=True)
    source: str
    scale: float = 1.0


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, single .safetensors file, or builtin:NAME
    lcm_lora: str = "auto"  # auto | none | PATH_OR_ID (ignored for full LCMs)
    loras: list[LoraSpec] = Field(default_factory=list)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    decoder: Literal["vae", "taesd"] = "vae"
    taesd: str | None = None  # override the tiny decoder's id/path (default by architecture)
    tiled_vae: Literal["auto", "on", "off"] = "auto"
    backend: Literal["torch", "openvino"] = "torch"
    compile: bool = False  # torch.compile the UNet
    quantize: Literal["none", "int8", "nf4"] = "none"
    cache_dir: str | None = None  # Hugging Face cache; None: HF_HOME / the default
    offline_fallback: bool = True  # the default hub model missing -> builtin:shapes, said loudly
    prompt_cache_size: int = 64


class StudioSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LCM_LIVE_", env_nested_delimiter="__", extra="ignore")

    engine: EngineSettings = Field(default_factory=EngineSettings)
    studio: StudioSettings = Field(default_factory=StudioSettings)
