"""The real SD1.5 and SDXL architectures, built from the shipped configs with random weights (no download).

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
from pathlib import Path
from typing import Any, Literal

Arch = Literal["sd15", "sdxl", "tiny"]

CONFIGS_DIR = Path(__file__).parent / "configs"
CLIP_BPE_DIR = CONFIGS_DIR / "clip_bpe"
ARCHES = ("sd15", "sdxl")


def config_dir(arch: str) -> Path:
    """The shipped diffusers config folder of ``arch`` ("sd15" or "sdxl")."""
    if arch not in ARCHES:
        raise ValueError(f"no shipped configs for arch {arch!r}; expected one of {ARCHES}")
    return CONFIGS_DIR / arch


def read_config(arch: str, component: str) -> dict[str, Any]:
    folder = config_dir(arch) / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text())


def clip_tokenizer(arch: str, component: str = "tokenizer") -> Any:
    """The real CLIP BPE tokenizer (49408 tokens) set up as ``arch``'s ``component`` ("tokenizer"/"tokenizer_2")."""
    from transformers import CLIPTokenizer

    settings = json.loads((config_dir(arch) / component / "tokenizer_config.json").read_text())
    settings.pop("tokenizer_class", None)
    return CLIPTokenizer(str(CLIP_BPE_DIR / "vocab.json"), str(CLIP_BPE_DIR / "merges.txt"), **settings)


def unet_config(arch: str, *, full_lcm: bool) -> dict[str, Any]:
    """The UNet config; a full LCM adds the w-embedding input (``time_cond_proj_dim=256``, as LCM_Dreamshaper_v7)."""
    config = {k: v for k, v in read_config(arch, "unet").items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = 256 if full_lcm else None
    return config


def build_unet(arch: str, *, full_lcm: bool = True, dtype: Any = None, seed: int = 0, meta: bool = False) -> Any:
    """The UNet with random weights; ``meta=True`` leaves it on the meta device (shapes and counts only)."""
    from diffusers import UNet2DConditionModel

    return _build(lambda: UNet2DConditionModel(**unet_config(arch, full_lcm=full_lcm)), dtype, seed, meta)


def build_vae(arch: str, *, dtype: Any = None, seed: int = 0, meta: bool = False) -> Any:
    from diffusers import AutoencoderKL

    config = {k: v for k, v in read_config(arch, "vae").items() if not k.startswith("_")}
    return _build(lambda: AutoencoderKL(**config), dtype, seed, meta)


def build_text_encoder(arch: str, component: str = "text_encoder", *, dtype: Any = None, seed: int = 0,
                       meta: bool = False) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    raw = read_config(arch, component)
    cls = CLIPTextModelWithProjection if raw["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
    config = CLIPTextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    return _build(lambda: cls(config), dtype, seed, meta)


def build_pipeline(arch: Arch, *, full_lcm: bool = True, dtype: Any = None, seed: int = 0) -> Any:
    """A diffusers pipeline of the real architecture with random weights, scheduler ``LCMScheduler``.

    sd15: ``LatentConsistencyModelPipeline`` (full_lcm, the LCM_Dreamshaper_v7 shapes) or ``StableDiffusionPipeline``
    (plain SD1.5, as with an LCM-LoRA fused in); sdxl: ``StableDiffusionXLPipeline``; tiny: engine/tiny.py's model.
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
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of sd15, sdxl, tiny; got {arch!r}")

    # Each component gets its own seed so that adding one never changes another's weights.
    scheduler = LCMScheduler.from_config(read_config(arch, "scheduler"))
    parts = dict(
        unet=build_unet(arch, full_lcm=full_lcm, dtype=dtype, seed=seed),
        vae=build_vae(arch, dtype=dtype, seed=seed + 1),
        text_encoder=build_text_encoder(arch, dtype=dtype, seed=seed + 2),
        tokenizer=clip_tokenizer(arch),
        scheduler=scheduler,
    )
    if arch == "sdxl":
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
