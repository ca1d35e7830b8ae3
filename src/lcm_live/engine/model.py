"""What loading a model yields: the diffusers pipeline plus what the engine must know about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class LoadedModel:
    pipe: Any  # LatentConsistencyModelPipeline (full LCM, SD1.5), StableDiffusionPipeline or
    # StableDiffusionXLPipeline with an LCMScheduler (full LCM-SDXL, or LCM-LoRA fused in)
    kind: Literal["lcm", "lcm-lora"]  # full LCM (w-embedding, no CFG) or plain model + LCM-LoRA (CFG when guidance > 1)
    arch: Literal["sd15", "sdxl"]
    name: str  # what the user asked for, as shown in metadata ("builtin:shapes", a hub id, a file name)
    native_width: int
    native_height: int
    loras: list[tuple[str, float]] = field(default_factory=list)  # (LCM-LoRA or style LoRA, scale), in load order
    notice: str | None = None  # said loudly to the user (e.g. "offline: using builtin:shapes instead of ...")
    # a diffusers ControlNetModel (--controlnet), or a MultiControlNetModel of several, on the pipeline's device and
    # dtype (engine/controlnet.py: controlnet_nets lists them)
    controlnet: Any = None
    controlnet_name: str | None = None  # as the user gave it (several: joined by " + ")
    controlnet_names: list[str] = field(default_factory=list)  # one per net, in load order
    ip_adapter_name: str | None = None  # --ip-adapter as given: loaded into the pipeline (engine/ip_adapter.py)
    # The model family (engine/families.py): its sampler, defaults and guidance semantics; None: the kind's LCM one.
    family: Any = None
