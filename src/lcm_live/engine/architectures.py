"""The real SD1.5 and SDXL architectures, and the fast families' (SD-Turbo, SDXL-Turbo, SDXS-512, BK-SDM tiny and
small), built from the shipped configs with random weights (no download).

Used by `lcm-live bench` (speed on the true shapes) and by the single-file loader (the configs). Building 860M
parameters the ordinary way runs PyTorch's per-layer init for minutes on a 2-core CPU; here the modules are made
with parameters on the meta device (accelerate's ``init_empty_weights``, buffers stay real), then each parameter
is allocated once in the target dtype and filled from one seeded generator: weights uniform with variance
1/fan_in (variance-preserving, so activations stay finite through 4 LCM steps), biases 0, normalisation scales 1,
embeddings std 0.02. Random weights make noise images: this is for timing and parity only.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Arch = str  # "tiny", or a key of FAMILIES

CONFIGS_DIR = Path(__file__).parent / "configs"
CLIP_BPE_DIR = CONFIGS_DIR / "clip_bpe"


@dataclass(frozen=True)
class Family:
    """A model family's shapes and the defaults a bench of it runs (configs/README.md says where each came from).

    ``base``: the folder that holds every component ``arch``'s own folder does not (configs/<arch>/<component>);
    ``pipeline_arch``: "sd15" (StableDiffusion pipelines) or "sdxl"; ``full_lcm``: a w-embedding UNet (LCM
    distilled, guidance as an input) rather than a plain one (turbo, SDXS, an LCM-LoRA fused in)."""

    name: str
    base: str
    pipeline_arch: str
    native_size: int
    num_inference_steps: int
    guidance_scale: float
    full_lcm: bool = False


FAMILIES = {f.name: f for f in (
    Family("sd15", "sd15", "sd15", 512, 4, 1.5, full_lcm=True),  # LCM_Dreamshaper_v7; the seed article's 1.5
    Family("sdxl", "sdxl", "sdxl", 1024, 4, 1.5, full_lcm=True),  # lcm-sdxl
    Family("sd-turbo", "sd-turbo", "sd15", 512, 1, 0.0),  # SD 2.1 shapes; no CFG
    Family("sdxl-turbo", "sdxl", "sdxl", 512, 1, 0.0),  # SDXL shapes at 512x512; no CFG
    Family("sdxs", "sd15", "sd15", 512, 1, 0.0),  # SDXS-512: 1 step, its tiny decoder; no CFG
    Family("bk-sdm-tiny", "sd15", "sd15", 512, 4, 1.0),  # with an LCM-LoRA fused: 4 steps, guidance 1 (no CFG)
    Family("bk-sdm-small", "sd15", "sd15", 512, 4, 1.0),
)}
ARCHES = tuple(FAMILIES)


def family(arch: str) -> Family:
    if arch not in FAMILIES:
        raise ValueError(f"arch {arch!r}: expected one of {', '.join(FAMILIES)} (or tiny)")
    return FAMILIES[arch]


def config_dir(arch: str) -> Path:
    """The shipped diffusers config folder of ``arch`` (its own components; the rest are in its family's base)."""
    return CONFIGS_DIR / family(arch).name


def _component_dir(arch: str, component: str) -> Path:
    own = config_dir(arch) / component
    return own if own.is_dir() else CONFIGS_DIR / family(arch).base / component


def read_config(arch: str, component: str) -> dict[str, Any]:
    folder = _component_dir(arch, component)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text())


def clip_tokenizer(arch: str, component: str = "tokenizer") -> Any:
    """The real CLIP BPE tokenizer (49408 tokens) set up as ``arch``'s ``component`` ("tokenizer"/"tokenizer_2")."""
    from transformers import CLIPTokenizer

    settings = json.loads((_component_dir(arch, component) / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)
    return CLIPTokenizer(str(CLIP_BPE_DIR / "vocab.json"), str(CLIP_BPE_DIR / "merges.txt"), **settings)


def unet_config(arch: str, *, full_lcm: bool | None = None) -> dict[str, Any]:
    """The UNet config; a full LCM adds the w-embedding input (``time_cond_proj_dim=256``, as LCM_Dreamshaper_v7).
    ``full_lcm`` None: the family's own kind (sd15/sdxl full LCMs; the fast families plain)."""
    config = {k: v for k, v in read_config(arch, "unet").items() if not k.startswith("_")}
    full_lcm = family(arch).full_lcm if full_lcm is None else full_lcm
    config["time_cond_proj_dim"] = 256 if full_lcm else None
    return config


def build_unet(arch: str, *, full_lcm: bool | None = True, dtype: Any = None, seed: int = 0,
               meta: bool = False) -> Any:
    """The UNet with random weights; ``meta=True`` leaves it on the meta device (shapes and counts only)."""
    from diffusers import UNet2DConditionModel

    return _build(lambda: UNet2DConditionModel(**unet_config(arch, full_lcm=full_lcm)), dtype, seed, meta)


def build_vae(arch: str, *, dtype: Any = None, seed: int = 0, meta: bool = False) -> Any:
    """The family's VAE: AutoencoderKL, or SDXS's own tiny decoder (AutoencoderTiny) where its config names it."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    raw = read_config(arch, "vae")
    cls = AutoencoderTiny if raw.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    config = {k: v for k, v in raw.items() if not k.startswith("_")}
    return _build(lambda: cls(**config), dtype, seed, meta)


def build_text_encoder(arch: str, component: str = "text_encoder", *, dtype: Any = None, seed: int = 0,
                       meta: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    raw = read_config(arch, component)
    cls = CLIPTextModelWithProjection if raw["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
    config = CLIPTextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    return _build(lambda: cls(config), dtype, seed, meta)


def build_pipeline(arch: Arch, *, full_lcm: bool | None = True, dtype: Any = None, seed: int = 0) -> Any:
    """A diffusers pipeline of the real architecture with random weights, scheduler ``LCMScheduler``.

    sd15: ``LatentConsistencyModelPipeline`` (full_lcm, the LCM_Dreamshaper_v7 shapes) or ``StableDiffusionPipeline``
    (plain SD1.5, as with an LCM-LoRA fused in); sdxl: ``StableDiffusionXLPipeline``; tiny: engine/tiny.py's model.
    The fast families build their pipeline_arch's pipeline with their own shapes (``full_lcm`` None: the family's
    own kind). The scheduler is LCMScheduler from the family's scheduler config (the same betas): the sampler does
    not change a step's FLOPs (the families' own samplers are the engine's).
    """
    import torch
    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    dtype = dtype or torch.float32
    if arch == "tiny":
        from lcm_live.engine.tiny import tiny_components

        with tempfile.TemporaryDirectory() as tmp:
            parts = tiny_components(time_cond_proj_dim=32 if full_lcm else None, seed=seed, tokenizer_dir=tmp)
        cls = LatentConsistencyModelPipeline if full_lcm else StableDiffusionPipeline
        pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return pipe.to(dtype=dtype)
    if full_lcm is None:
        full_lcm = family(arch).full_lcm
    pipeline_arch = family(arch).pipeline_arch

    # Each component gets its own seed so that adding one never changes another's weights.
    scheduler = LCMScheduler.from_config(read_config(arch, "scheduler"))
    parts = dict(
        unet=build_unet(arch, full_lcm=full_lcm, dtype=dtype, seed=seed),
        vae=build_vae(arch, dtype=dtype, seed=seed + 1),
        text_encoder=build_text_encoder(arch, dtype=dtype, seed=seed + 2),
        tokenizer=clip_tokenizer(arch),
        scheduler=scheduler,
    )
    if pipeline_arch == "sdxl":
        parts["text_encoder_2"] = build_text_encoder(arch, "text_encoder_2", dtype=dtype, seed=seed + 3)
        parts["tokenizer_2"] = clip_tokenizer(arch, "tokenizer_2")
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    cls = LatentConsistencyModelPipeline if full_lcm else StableDiffusionPipeline
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


POOL_SIZE = 2**25  # 33.5M unit-variance uniforms (134 MB): a window of it fills each weight tensor


def _build(make, dtype: Any, seed: int, meta: bool) -> Any:
    """Construct with parameters on meta, then allocate and fill each one (see the module docstring)."""
    import torch
    from accelerate import init_empty_weights

    dtype = dtype or torch.float32
    with init_empty_weights(include_buffers=False):
        model = make()
    if meta:
        return model.eval()
    # Drawing ~1e9 random numbers one by one takes ~8 s on 2 cores; instead each tensor is a scaled copy of a
    # window of one seeded pool starting at a seeded offset (a copy runs at memory speed). Values inside a tensor
    # are independent draws; only a tensor larger than the pool (token embeddings) wraps around and repeats.
    generator = torch.Generator("cpu").manual_seed(seed)
    pool = torch.empty(POOL_SIZE).uniform_(-math.sqrt(3.0), math.sqrt(3.0), generator=generator)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None:
                    continue
                data = torch.empty(param.shape, dtype=dtype)
                if name == "bias":
                    data.zero_()
                elif isinstance(module, norm_types):
                    data.fill_(1.0)
                else:
                    if isinstance(module, torch.nn.Embedding) or param.dim() < 2:
                        std = 0.02
                    else:
                        std = 1.0 / math.sqrt(math.prod(param.shape[1:]))  # Linear [out, in]; Conv [out, in, kh, kw]
                    offset = int(torch.randint(POOL_SIZE, (1,), generator=generator))
                    _fill_from_pool(data.view(-1), pool, offset, std)
                module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
        for module in model.modules():  # floating buffers (if any) follow the dtype; integer ones (ids) stay
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_floating_point():
                    module._buffers[name] = buf.to(dtype)
    return model.eval()


def _fill_from_pool(flat: Any, pool: Any, offset: int, std: float) -> None:
    """flat[i] = std * pool[(offset + i) % len(pool)], in at most a few slice copies."""
    import torch

    done = 0
    while done < flat.numel():
        take = min(flat.numel() - done, pool.numel() - offset)
        torch.mul(pool[offset:offset + take], std, out=flat[done:done + take])
        done, offset = done + take, 0
