"""The fast families' samplers beside LCM's (engine/sampling.py): TCD, Euler ancestral and Euler on trailing
timesteps, each one short loop with ``sample_lcm``'s signature, and :func:`plan`, which gives engine/generation.py
the schedule, the start latents and the loop of whichever the loaded model uses.

Every loop reads its schedule from diffusers' own scheduler object (``set_timesteps`` on the host: timesteps,
sigmas, alphas), works out each step's scalars there once as 0-d float32 tensors, and applies diffusers' step
arithmetic in its order of operations, so that at ``--device cpu --dtype float32`` the images equal diffusers'
pipelines stepping ``TCDScheduler`` / ``EulerAncestralDiscreteScheduler`` / ``EulerDiscreteScheduler``
(tests/engine/test_families.py holds them side by side). Each step hands ``callback`` the clean estimate
(``denoised``) and lets ``blend`` (inpainting) replace part of it first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lcm_live.engine.sampling import ModelFn, SampleCallback, lcm_schedule, sample_lcm
from lcm_live.engine.scheduler import draw_noise

Blend = Callable[[torch.Tensor], torch.Tensor] | None


def sd_start(num_inference_steps: int, strength: float | None) -> int:
    """The schedule index SD's image-to-image pipelines start at (diffusers' ``get_timesteps``): the last
    ``int(steps * strength)`` steps run; text-to-image starts at 0."""
    if strength is None:
        return 0
    return max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)


# ---------------------------------------------------------------------------------------------------- TCD
@dataclass(frozen=True)
class TCDStep:
    """One TCDScheduler.step's scalars (0-d float32 host tensors), for the step at schedule index ``index``."""

    timestep: int
    last: bool  # diffusers' last step: no re-noising
    sqrt_alpha_prod: torch.Tensor
    sqrt_beta_prod: torch.Tensor
    sqrt_alpha_prod_s: torch.Tensor
    sqrt_beta_prod_s: torch.Tensor
    renoise_keep: torch.Tensor  # sqrt(alpha_prev / alpha_s)
    renoise_noise: torch.Tensor  # sqrt(1 - alpha_prev / alpha_s)


def tcd_schedule(scheduler: Any, num_inference_steps: int, device: Any, *, eta: float,
                 strength: float | None = None) -> tuple[torch.Tensor, list[TCDStep]]:
    """Timesteps (device) and host scalars of the TCD steps that run (``eta``: TCD's gamma, in [0, 1])."""
    # Copied from diffusers.schedulers.scheduling_tcd.TCDScheduler.step (the scalars), per schedule index.
    scheduler.set_timesteps(num_inference_steps)
    host = [int(t) for t in scheduler.timesteps.tolist()]
    alphas = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)
    final = scheduler.final_alpha_cumprod.detach().to("cpu", torch.float32)
    steps = []
    for i, t in enumerate(host):
        prev = torch.tensor(host[i + 1] if i + 1 < len(host) else 0)
        timestep_s = torch.floor((1 - eta) * prev).to(dtype=torch.long)
        alpha_t, alpha_s = alphas[t], alphas[timestep_s]
        alpha_prev = alphas[prev] if prev >= 0 else final
        steps.append(TCDStep(t, i == scheduler.num_inference_steps - 1, alpha_t.sqrt(), (1 - alpha_t).sqrt(),
                             alpha_s.sqrt(), (1 - alpha_s).sqrt(), (alpha_prev / alpha_s).sqrt(),
                             (1 - alpha_prev / alpha_s).sqrt()))
    start = sd_start(num_inference_steps, strength)
    return scheduler.timesteps[start:].to(device), steps[start:]


@torch.no_grad()
def sample_tcd(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, steps: list[TCDStep], *, eta: float,
               generator: Any = None, callback: SampleCallback | None = None, blend: Blend = None,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, "Trajectory
    Consistency Distillation"): predict x0, step back along the trajectory to s = (1 - gamma) * t_prev, re-noise
    to t_prev."""
    total = len(steps)
    for i, (t, s) in enumerate(zip(timesteps, steps, strict=True)):
        out = model(x, t)
        # Copied from diffusers.schedulers.scheduling_tcd.TCDScheduler.step (x0 and epsilon per prediction type).
        if prediction_type == "epsilon":
            eps, denoised = out, (x - s.sqrt_beta_prod * out) / s.sqrt_alpha_prod
        elif prediction_type == "sample":
            denoised = out
            eps = (x - s.sqrt_alpha_prod * denoised) / s.sqrt_beta_prod
        elif prediction_type == "v_prediction":
            denoised = s.sqrt_alpha_prod * x - s.sqrt_beta_prod * out
            eps = s.sqrt_alpha_prod * out + s.sqrt_beta_prod * x
        else:
            raise ValueError(f"prediction_type {prediction_type!r}: TCD takes epsilon, sample or v_prediction")
        if blend is not None:
            denoised = blend(denoised)
        noised = s.sqrt_alpha_prod_s * denoised + s.sqrt_beta_prod_s * eps  # x at s = floor((1 - gamma) t_prev)
        if eta > 0 and not s.last:
            noise = draw_noise(eps.shape, generator, eps.device, noised.dtype)
            x = s.renoise_keep * noised + s.renoise_noise * noise
        else:
            x = noised
        if callback is not None:
            callback({"x": x, "i": i, "total": total, "timestep": s.timestep, "denoised": denoised})
    return x


# ---------------------------------------------------------------------------------------------------- Euler
@dataclass(frozen=True)
class EulerStep:
    """One Euler(-ancestral) step's scalars: sigma, the input scale 1/sqrt(sigma^2 + 1) as diffusers divides by
    it, and where the step lands (sigma_down; sigma_up of fresh noise for the ancestral sampler, 0 otherwise)."""

    timestep: int
    sigma: torch.Tensor
    input_scale: torch.Tensor  # (sigma^2 + 1) ** 0.5, divided by
    sigma_down: torch.Tensor  # the next sigma (Euler), or the deterministic part of it (ancestral)
    sigma_up: torch.Tensor | None  # ancestral: std of the noise added after the step


def euler_schedule(scheduler: Any, num_inference_steps: int, device: Any, *, ancestral: bool,
                   strength: float | None = None) -> tuple[torch.Tensor, list[EulerStep], torch.Tensor]:
    """Timesteps (device), host scalars of the steps that run, and the sigma the start latents have (text-to-image:
    ``init_noise_sigma``; image-to-image: the first step's sigma, by which the init latents are noised)."""
    scheduler.set_timesteps(num_inference_steps)  # diffusers keeps sigmas on the host
    sigmas = scheduler.sigmas.detach().to("cpu", torch.float32)
    host = scheduler.timesteps.tolist()
    steps = []
    for i, t in enumerate(host):
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        # Copied from diffusers' EulerDiscreteScheduler.step (s_churn 0: sigma_hat = sigma * (0.0 + 1)) and
        # EulerAncestralDiscreteScheduler.step.
        if ancestral:
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            steps.append(EulerStep(int(t), sigma, (sigma**2 + 1) ** 0.5, sigma_down, sigma_up))
        else:
            steps.append(EulerStep(int(t), sigma * (0.0 + 1), (sigma**2 + 1) ** 0.5, sigma_to, None))
    start = sd_start(num_inference_steps, strength)
    x_sigma = scheduler.init_noise_sigma if strength is None else sigmas[start]
    return scheduler.timesteps[start:].to(device), steps[start:], x_sigma


@torch.no_grad()
def sample_euler(model: ModelFn, x: torch.Tensor, timesteps: torch.Tensor, steps: list[EulerStep], *,
                 generator: Any = None, callback: SampleCallback | None = None, blend: Blend = None,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, "Elucidating the Design
    Space of Diffusion-Based Generative Models", Algorithm 2 without churn); with ``sigma_up`` set, Euler
    ancestral (k-diffusion's ``sample_euler_ancestral``): step to sigma_down, add fresh noise of std sigma_up."""
    total = len(steps)
    for i, (t, s) in enumerate(zip(timesteps, steps, strict=True)):
        eps = model(x / s.input_scale, t)  # the model output (epsilon, x0 or v, by prediction_type)
        sample = x.to(torch.float32)
        if prediction_type == "epsilon":
            denoised = sample - s.sigma * eps
        elif prediction_type == "v_prediction":
            denoised = eps * (-s.sigma / (s.sigma**2 + 1) ** 0.5) + (sample / (s.sigma**2 + 1))
        elif prediction_type in ("sample", "original_sample"):  # x0 (SDXL-Lightning's 1-step UNet)
            denoised = eps
        else:
            raise ValueError(f"prediction_type {prediction_type!r}: Euler takes epsilon, v_prediction or sample")
        if blend is not None:
            denoised = blend(denoised)
        derivative = (sample - denoised) / s.sigma
        x = sample + derivative * (s.sigma_down - s.sigma)
        if s.sigma_up is not None:  # diffusers draws this noise on every step, the last (sigma_up 0) too
            x = x + draw_noise(eps.shape, generator, eps.device, eps.dtype) * s.sigma_up
        x = x.to(eps.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "total": total, "timestep": s.timestep, "denoised": denoised})
    return x


# ---------------------------------------------------------------------------------------------------- plan
class Plan:
    """What one generation call needs of its sampler: ``timesteps`` (device), ``start(noise)`` (text-to-image's
    start latents), ``noised(init_latents, noise)`` (image-to-image's) and ``sample(model, x, ...)``."""

    def __init__(self, sampler: str, scheduler: Any, num_inference_steps: int, device: Any, *,
                 strength: float | None = None, lcm_img2img: bool = False, eta: float | None = None):
        self.sampler, self.scheduler, self.eta = sampler, scheduler, eta
        self.x_sigma = None
        if sampler == "lcm":
            self.timesteps, self._steps = lcm_schedule(scheduler, num_inference_steps, device, strength=strength,
                                                       lcm_img2img=lcm_img2img)
        elif sampler == "tcd":
            self.timesteps, self._steps = tcd_schedule(scheduler, num_inference_steps, device, eta=self._eta(),
                                                       strength=strength)
        elif sampler in ("euler-a", "euler-trailing"):
            self.timesteps, self._steps, self.x_sigma = euler_schedule(
                scheduler, num_inference_steps, device, ancestral=sampler == "euler-a", strength=strength)
        else:
            raise ValueError(f"sampler {sampler!r}: expected lcm, tcd, euler-a or euler-trailing")

    def _eta(self) -> float:
        eta = 0.3 if self.eta is None else float(self.eta)
        if not 0 <= eta <= 1:
            raise ValueError(f"eta={eta}: TCD's gamma must be in [0, 1]")
        return eta

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """Text-to-image: the start latents from unit noise (Euler's are scaled to the first sigma, as
        diffusers' ``prepare_latents`` multiplies by ``init_noise_sigma``)."""
        return noise if self.x_sigma is None else noise * self.x_sigma

    def noised(self, init_latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Image-to-image: the init image's latents noised to the first step (diffusers' ``add_noise``)."""
        if self.x_sigma is None:  # LCM, TCD: alpha-based, at the first timestep
            return self.scheduler.add_noise(init_latents, noise, self.timesteps[:1])
        return init_latents + noise * self.x_sigma.to(init_latents.device, init_latents.dtype)  # Euler: x0 + sigma n

    def sample(self, model: ModelFn, x: torch.Tensor, *, generator: Any = None,
               callback: SampleCallback | None = None, blend: Blend = None) -> torch.Tensor:
        kw = {"generator": generator, "callback": callback, "blend": blend}
        if self.sampler == "lcm":
            return sample_lcm(model, x, self.timesteps, self._steps, scheduler=self.scheduler, **kw)
        kw["prediction_type"] = self.scheduler.config.prediction_type
        if self.sampler == "tcd":
            return sample_tcd(model, x, self.timesteps, self._steps, eta=self._eta(), **kw)
        return sample_euler(model, x, self.timesteps, self._steps, **kw)
