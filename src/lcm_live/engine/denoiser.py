"""The model function the sampler calls: the conditionings composed around ONE UNet call per step.

Rows of that call, for B latents (batch members times images per prompt; or a region's windows, engine/regions.py):
``[uncond_0 .. uncond_{B-1}, cond_0 .. cond_{B-1}]`` with classifier-free guidance, else the cond rows alone:
diffusers' own layout (``torch.cat([latents] * 2)``, uncond first), so the arithmetic and the images equal its
pipelines'. Around the call: a full LCM's w-embedding (``timestep_cond``), SDXL's pooled text and size ids
(``added_cond_kwargs``), a ControlNet's residuals (the ControlNet sees the same rows), a 9-channel inpainting UNet's
mask and masked-image latents (concatenated on the channels). After it, guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TextRows:
    """Prompt embeddings, one row per latent, and with CFG one uncond row per latent."""

    prompt_embeds: torch.Tensor  # (B, 77, D)
    negative_prompt_embeds: torch.Tensor | None = None  # (B, 77, D) with CFG
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL: (B, P)
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # SDXL with CFG: (B, P)


@dataclass
class Control:
    """A ControlNet and its images, one per latent ((B, 3, H, W) in [0, 1]), applied at ``scale``."""

    controlnet: Any
    images: torch.Tensor
    scale: float


class Denoiser:
    """``denoiser(latents, t)`` -> the model output (epsilon for SD models) for each of the B latents."""

    def __init__(self, unet: Any, text: TextRows, *, guidance_scale: float = 1.0, do_cfg: bool = False,
                 w_embedding: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                 control: Control | None = None, inpaint_inputs: torch.Tensor | None = None):
        self.unet = unet
        self.guidance_scale = guidance_scale
        self.do_cfg = do_cfg
        self.inpaint_inputs = inpaint_inputs  # (B, 5, h, w): mask and masked-image latents, 9-channel UNets
        self.control = control
        embeds, pooled = text.prompt_embeds, text.pooled_prompt_embeds
        if do_cfg:
            embeds = torch.cat([text.negative_prompt_embeds, embeds])
            if pooled is not None:
                pooled = torch.cat([text.negative_pooled_prompt_embeds, pooled])
        self.prompt_embeds = embeds
        # A full LCM's w-embedding (1, time_cond_proj_dim), one row per UNet row (all equal).
        self.timestep_cond = None if w_embedding is None else w_embedding.repeat(embeds.shape[0], 1)
        self.added_cond_kwargs = None
        if pooled is not None:  # SDXL: one row of size ids per UNet row (all equal)
            self.added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids.repeat(embeds.shape[0], 1)}

    def rows(self, per_latent: torch.Tensor) -> torch.Tensor:
        """Anything with one entry per latent, laid out as the UNet's rows."""
        return torch.cat([per_latent, per_latent]) if self.do_cfg else per_latent

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
        if not self.do_cfg:
            return output
        uncond, cond = output[:b], output[b:]
        return uncond + self.guidance_scale * (cond - uncond)
