"""The model function the sampler calls: the conditionings composed around ONE UNet call per step.

Rows of that call, for B latents (batch members times images per prompt) and K text conditions per latent (1, or
the base prompt plus R region prompts)::

    [uncond_0 .. uncond_{B-1}]  (with classifier-free guidance: the negative prompt, one row per latent)
    [cond_0_0 .. cond_0_{K-1}, cond_1_0, ...]  (latent-major: latent b's K prompts in a row)

This is diffusers' own layout when K = 1 (``torch.cat([latents] * 2)``, uncond first), so the arithmetic and the
images equal its pipelines'. Around the call: a full LCM's w-embedding (``timestep_cond``), SDXL's pooled text and
size ids (``added_cond_kwargs``), a ControlNet's residuals (the ControlNet sees the same rows), a 9-channel
inpainting UNet's mask and masked-image latents (concatenated on the channels). After it: the K predictions of a
latent are combined through the region weights (MultiDiffusion), then guidance is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TextRows:
    """Prompt embeddings, one row per UNet cond row (B * K) and, with CFG, one uncond row per latent (B)."""

    prompt_embeds: torch.Tensor  # (B * K, 77, D)
    negative_prompt_embeds: torch.Tensor | None = None  # (B, 77, D) with CFG
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL: (B * K, P)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # SDXL with CFG: (B, P)


@dataclass
class Control:
    """A ControlNet and its images, one per latent ((B, 3, H, W) in [0, 1]), applied at ``scale``."""

    controlnet: Any
    images: torch.Tensor
    scale: float


class Denoiser:
    """``denoiser(latents, t)`` -> the model output (epsilon for SD models) for each of the B latents."""

    def __init__(self, unet: Any, text: TextRows, *, rows_per_latent: int = 1, guidance_scale: float = 1.0,
                 do_cfg: bool = False, timestep_cond: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None, control: Control | None = None,
                 region_weights: torch.Tensor | None = None, inpaint_inputs: torch.Tensor | None = None):
        self.unet = unet
        self.k = rows_per_latent
        self.guidance_scale = guidance_scale
        self.do_cfg = do_cfg
        self.region_weights = region_weights  # (B, K, 1, h, w), summing to 1 over K; None when K = 1
        self.inpaint_inputs = inpaint_inputs  # (B, 5, h, w): mask and masked-image latents, 9-channel UNets
        self.control = control
        self.timestep_cond = timestep_cond  # (rows, time_cond_proj_dim): full LCMs
        embeds, pooled = text.prompt_embeds, text.pooled_prompt_embeds
        if do_cfg:
            embeds = torch.cat([text.negative_prompt_embeds, embeds])
            if pooled is not None:
                pooled = torch.cat([text.negative_pooled_prompt_embeds, pooled])
        self.prompt_embeds = embeds
        self.added_cond_kwargs = None
        if pooled is not None:  # SDXL: one row of size ids per UNet row (all equal)
            self.added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.repeat(embeds.shape[0], 1)}

    def rows(self, per_latent: torch.Tensor) -> torch.Tensor:
        """Anything with one entry per latent, laid out as the UNet's rows."""
        cond = per_latent if self.k == 1 else per_latent.repeat_interleave(self.k, dim=0)
        return torch.cat([per_latent, cond]) if self.do_cfg else cond

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        latents = latents.to(self.prompt_embeds.dtype)
        model_input = self.rows(latents)
        residuals: dict[str, Any] = {}
        if self.control is not None:
            down, mid = self.control.controlnet(
                model_input, t, encoder_hidden_states=self.prompt_embeds, controlnet_cond=self.rows(self.control.images),
                conditioning_scale=self.control.scale, guess_mode=False, added_cond_kwargs=self.added_cond_kwargs,
                return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if self.inpaint_inputs is not None:
            model_input = torch.cat([model_input, self.rows(self.inpaint_inputs)], dim=1)
        extra = {"added_cond_kwargs": self.added_cond_kwargs} if self.added_cond_kwargs is not None else {}
        output = self.unet(model_input, t, encoder_hidden_states=self.prompt_embeds, timestep_cond=self.timestep_cond,
                           return_dict=False, **extra, **residuals)[0]
        uncond, cond = (output[:b], output[b:]) if self.do_cfg else (None, output)
        if self.k > 1:  # (B * K, C, h, w) -> (B, C, h, w): each prompt where its region is
            cond = (cond.unflatten(0, (b, self.k)) * self.region_weights).sum(dim=1)
        if uncond is None:
            return cond
        return uncond + self.guidance_scale * (cond - uncond)
