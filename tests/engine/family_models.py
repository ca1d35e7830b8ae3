"""Tiny models of each fast family, built in code (test-only builders): the tiny SD1.5 / SDXL shapes of
engine/tiny.py with the scheduler each release ships, saved as diffusers folders named as the release is (the
name is what a preset reads), plus a BK-SDM-shaped UNet (no mid block) with its own tiny LCM-LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def scheduler_from(arch: str) -> Any:
    """The scheduler a shipped config folder holds (engine/configs/<arch>/scheduler), as diffusers builds it."""
    import diffusers

    from lcm_live.engine.architectures import read_config

    config = read_config(arch, "scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)


def save_family(folder: Path, *, sdxl: bool = False, scheduler: Any = None, seed: int = 0,
                unet: Any = None, vae: Any = None) -> Path:
    """A tiny plain (no w-embedding) SD1.5- or SDXL-shaped folder with ``scheduler`` (default: the tiny
    LCMScheduler) and optionally another ``unet`` or ``vae``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lcm_live.engine.tiny import tiny_components, tiny_sdxl_components

    build = folder.parent / (folder.name + "_tok")
    make = tiny_sdxl_components if sdxl else tiny_components
    parts = make(time_cond_proj_dim=None, seed=seed, tokenizer_dir=build)
    if scheduler is not None:
        parts["scheduler"] = scheduler
    if unet is not None:
        parts["unet"] = unet
    if vae is not None:
        parts["vae"] = vae
    if sdxl:
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(build, ignore_errors=True)
    return folder


def bk_sdm_unet(seed: int = 0) -> Any:
    """BK-SDM's block removal on the tiny shape: no mid block (``mid_block_type`` None, as bk-sdm-tiny's config)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4).eval()


def tiny_decoder(seed: int = 0) -> Any:
    """SDXS's own decoder on the tiny shape: an AutoencoderTiny (taesd's layout, scaling factor 1.0) as the
    pipeline's ``vae``, downsampling 2x as the tiny AutoencoderKL does."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    with torch.no_grad():  # random weights decode to a near-flat picture: give it some contrast
        for param in vae.parameters():
            param.mul_(3.0)
    return vae.eval()
