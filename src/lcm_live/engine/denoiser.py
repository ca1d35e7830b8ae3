"""The model function the sampler calls: the conditionings composed around ONE UNet call per step.

Rows of that call, for B latents (batch members times images per prompt; or a region's windows, engine/regions.py):
``[uncond_0 .. uncond_{B-1}, cond_0 .. cond_{B-1}]`` with classifier-free guidance, else the cond rows alone:
diffusers' own layout (``torch.cat([latents] * 2)``, uncond first), so the arithmetic and the images equal its
pipelines'. Around the call: a full LCM's w-embedding (``timestep_cond``), SDXL's pooled text and size ids
(``added_cond_kwargs``), an IP-Adapter's image embeddings (``added_cond_kwargs["image_embeds"]``, uncond rows the
encoder's negative), the ControlNets' summed residuals (each sees the same rows, in the steps its
``control_guidance_start/end`` give it), a 9-channel inpainting UNet's mask and masked-image latents (concatenated on
the channels). After it, guidance.
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
class ControlSteps:
    """Which ControlNets act at each step: ``keep[i][k]`` for step i and net k (diffusers' ``controlnet_keep``);
    ``step`` is the step running (the loop's callback advances it, engine/generation.py)."""

    keep: list[list[bool]]
    step: int = 0

    @classmethod
    def of(cls, starts: list[float], ends: list[float], num_steps: int) -> ControlSteps:
        # As diffusers' ControlNet pipelines: net k sits out step i when i / n < start_k or (i + 1) / n > end_k.
        return cls([[not (i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends, strict=True)]
                    for i in range(num_steps)])


@dataclass
class Control:
    """ControlNets and their images, one per latent ((B, 3, H, W) in [0, 1]; None: that net sits out), applied at
    ``scales``, in the steps ``steps`` gives each."""

    nets: list[Any]
    images: list[torch.Tensor | None]
    scales: list[float]
    steps: ControlSteps | None = None  # None: every net at every step

    def acting(self) -> list[int]:
        keep = None if self.steps is None else self.steps.keep[min(self.steps.step, len(self.steps.keep) - 1)]
        return [k for k, image in enumerate(self.images) if image is not None and (keep is None or keep[k])]

    def residuals(self, model_input: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                  added_cond_kwargs: dict[str, Any] | None, rows: Any) -> dict[str, Any]:
        """The acting nets' residuals, summed in net order as diffusers' MultiControlNetModel.forward sums them (a
        net that sits out adds nothing, which is what its zero scale adds there)."""
        down = mid = None
        for k in self.acting():
            d, m = self.nets[k](model_input, t, encoder_hidden_states=prompt_embeds,
                                controlnet_cond=rows(self.images[k]), conditioning_scale=self.scales[k],
                                guess_mode=False, added_cond_kwargs=added_cond_kwargs, return_dict=False)
            if down is None:
                down, mid = d, m
            else:
                down, mid = [a + b for a, b in zip(down, d, strict=True)], mid + m
        if down is None:
            return {}
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class Denoiser:
    """``denoiser(latents, t)`` -> the model output (epsilon for SD models) for each of the B latents."""

    def __init__(self, unet: Any, text: TextRows, *, guidance_scale: float = 1.0, do_cfg: bool = False,
                 w_embedding: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                 control: Control | None = None, inpaint_inputs: torch.Tensor | None = None,
                 image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
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
        # The UNet's own: with an IP-Adapter, the image embeddings (cond, uncond), one row per UNet row (the
        # ControlNets take no image embeddings, as in diffusers' pipelines).
        self.unet_added_cond_kwargs = self.added_cond_kwargs
        if image_embeds is not None:
            cond, uncond = image_embeds
            rows = torch.cat([uncond, cond]) if do_cfg else cond
            self.unet_added_cond_kwargs = {**(self.added_cond_kwargs or {}), "image_embeds": [rows]}

    def rows(self, per_latent: torch.Tensor) -> torch.Tensor:
        """Anything with one entry per latent, laid out as the UNet's rows."""
        return torch.cat([per_latent, per_latent]) if self.do_cfg else per_latent

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        latents = latents.to(self.prompt_embeds.dtype)
        model_input = self.rows(latents)
        residuals: dict[str, Any] = {}
        if self.control is not None:
            residuals = self.control.residuals(model_input, t, self.prompt_embeds, self.added_cond_kwargs, self.rows)
        if self.inpaint_inputs is not None:
            model_input = torch.cat([model_input, self.rows(self.inpaint_inputs)], dim=1)
        extra = {} if self.unet_added_cond_kwargs is None else {"added_cond_kwargs": self.unet_added_cond_kwargs}
        output = self.unet(model_input, t, encoder_hidden_states=self.prompt_embeds, timestep_cond=self.timestep_cond,
                           return_dict=False, **extra, **residuals)[0]
        if not self.do_cfg:
            return output
        uncond, cond = output[:b], output[b:]
        return uncond + self.guidance_scale * (cond - uncond)
