"""The LCM sampler: multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models",
Algorithm 1), one short loop in the manner of k-diffusion's samplers.

``model(x, t)`` is the model function (engine/denoiser.py: the UNet with its conditionings composed around it);
the loop computes the consistency function's clean estimate with diffusers' ``LCMScheduler`` arithmetic (the
scalars kept on the host by ``HostLCMScheduler``, engine/scheduler.py), lets ``blend`` (inpainting) replace part
of it, hands it to ``callback`` (previews, progress, cancellation by raising) and re-noises it to the next
timestep with fresh noise from ``generator``. At ``--device cpu --dtype float32`` each step is bit-identical to
diffusers' pipelines stepping their ``LCMScheduler`` (tests/engine/test_pipeline*.py hold them side by side).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lcm_live.engine.scheduler import HostLCMScheduler, StepScalars, draw_noise

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents (B, C, h, w), timestep) -> model output
SampleCallback = Callable[[dict[str, Any]], None]  # {"x", "i", "total", "timestep", "denoised"}


def lcm_schedule(scheduler: Any, num_inference_steps: int, device: Any, *, strength: float | None = None,
                 lcm_img2img: bool = False) -> tuple[torch.Tensor, list[StepScalars]]:
    """The timesteps (device tensors, as diffusers feeds them to the UNet) and host scalars of the steps to run.

    Text-to-image: ``num_inference_steps`` points of LCM's skipping schedule. Image-to-image as LCM's own
    pipeline (``lcm_img2img``): all steps, on the schedule LCMScheduler shortens by ``strength``. As SD's
    pipelines (LCM-LoRA models): the last ``int(steps * strength)`` of the full schedule (diffusers' get_timesteps).
    """
    if not isinstance(scheduler, HostLCMScheduler):  # e.g. swapped in by hand: the same config, host scalars
        scheduler = HostLCMScheduler.from_config(scheduler.config)
    if strength is not None and lcm_img2img:
        scheduler.set_timesteps(num_inference_steps, device, strength=strength)
        return scheduler.run_schedule()
    scheduler.set_timesteps(num_inference_steps, device)
    start = 0
    if strength is not None:
        start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
    return scheduler.run_schedule(start)


@torch.no_grad()
def sample_lcm(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, scalars: list[StepScalars], *,
               scheduler: HostLCMScheduler, generator: Any = None, callback: SampleCallback | None = None,
               blend: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Multistep consistency sampling from ``x`` (noise, or the noised init image) over ``timesteps``; returns the
    last clean estimate (scaled latents). ``callback`` sees each step's ``denoised`` (the preview) and may raise to
    stop; ``blend(denoised)`` may replace part of the estimate before it is re-noised (inpainting)."""
    total = len(scalars)
    for i, (t, s) in enumerate(zip(timesteps, scalars, strict=True)):
        model_output = model(x, t)
        denoised = scheduler.denoised(s, model_output, x)  # f(z_t) = c_skip z_t + c_out x0_pred
        if blend is not None:
            denoised = blend(denoised)
        if i < total - 1:  # re-noise to the next timestep (none after the last step)
            noise = draw_noise(model_output.shape, generator, model_output.device, denoised.dtype)
            x = s.sqrt_alpha_prod_prev * denoised + s.sqrt_beta_prod_prev * noise
        else:
            x = denoised
        if callback is not None:
            callback({"x": x, "i": i, "total": total, "timestep": s.timestep, "denoised": denoised})
    return x


def guidance_embedding(guidance_scale: float, rows: int, embedding_dim: int, device: Any, dtype: Any) -> torch.Tensor:
    """A full LCM's w-embedding (``timestep_cond``) for ``rows`` UNet rows: diffusers feeds w = guidance_scale - 1."""
    w = torch.tensor(guidance_scale - 1).repeat(rows)
    return _guidance_scale_embedding(w, embedding_dim).to(device=device, dtype=dtype)


# Copied from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img
# .LatentConsistencyModelPipeline.get_guidance_scale_embedding
def _guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(w), embedding_dim) sinusoidal embedding of the guidance scale (VDM's, as LCM uses it)."""
    assert len(w.shape) == 1
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:  # zero pad
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
