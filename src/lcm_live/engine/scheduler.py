"""diffusers' ``LCMScheduler`` with its per-step scalars on the host: a denoising loop that never waits for the GPU.

``LCMScheduler.step`` reads its step's scalars from device tensors: it indexes the CPU ``alphas_cumprod`` with the
CUDA timestep (a copy to the host), tests ``prev_timestep >= 0`` on a CUDA tensor, and draws the re-noising on the
CPU generator and copies it over from pageable memory. Each of these makes the host wait until the GPU has
finished everything queued, so the host cannot queue step i+1 while step i runs: on a fast GPU the Python between
two UNet calls becomes GPU idle time. The engine's step callback did the same with ``int(timestep)``.

:class:`HostLCMScheduler` computes the same function: ``set_timesteps`` keeps the schedule on the host as well
and works out every step's scalars there once (in float32, with diffusers' own arithmetic), ``step`` applies them
as Python floats, and the re-noising is drawn on the generator's device in float32, copied through pinned memory
without waiting, and cast on the device. Only the first step of a call still waits once (finding the step index
of the first timestep, as diffusers does). On a CPU the results are bit-identical to ``LCMScheduler``'s
(tests/engine/test_scheduler.py, float32, bfloat16 and float16); on CUDA in half precision ``c_skip``/``c_out``
are applied at float32 instead of rounded to the latents' dtype first, which can change the last bit.

Drawing the noise in float32 and casting it also keeps a seed's noise the same in every dtype (torch 2.11's CPU
sampler gives float16 a different sequence from float32's; torch 2.13's does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import LCMScheduler
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass(frozen=True)
class StepScalars:
    """One step's scalars, exactly as ``LCMScheduler.step`` computes them: 0-d float32 tensors on the host.

    Host tensors rather than Python floats, so that every product rounds as diffusers' does: a CPU kernel
    rounds a 0-d tensor standing *first* in a product to the latents' dtype and uses a Python float at float32,
    and diffusers writes ``c_out * x``. A CUDA kernel reads a host 0-d tensor as a plain argument, no copy."""

    timestep: int
    sqrt_alpha_prod: torch.Tensor
    sqrt_beta_prod: torch.Tensor
    sqrt_alpha_prod_prev: torch.Tensor
    sqrt_beta_prod_prev: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor


class HostLCMScheduler(LCMScheduler):
    """``LCMScheduler`` whose ``step`` synchronizes with the device only once per call (see the module doc).

    Made with ``HostLCMScheduler.from_config(scheduler.config)``; the config, the timesteps and every output are
    ``LCMScheduler``'s."""

    host_timesteps: list[int] = []
    _scalars: list[StepScalars] = []
    _host_alphas: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                      original_inference_steps: int | None = None, timesteps: list[int] | None = None,
                      strength: float = 1.0) -> None:
        # LCMScheduler's signature, which pipelines inspect (e.g. for `timesteps`); computed on the host first.
        super().set_timesteps(num_inference_steps, None, original_inference_steps, timesteps, strength)
        if self._host_alphas is None:  # a copy: add_noise (image-to-image) moves alphas_cumprod to the device
            self._host_alphas = (self.alphas_cumprod.detach().to("cpu", torch.float32).clone(),
                                 self.final_alpha_cumprod.detach().to("cpu", torch.float32).clone())
        self.host_timesteps = [int(t) for t in self.timesteps.tolist()]
        self._scalars = [self._step_scalars(i) for i in range(len(self.host_timesteps))]
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def _step_scalars(self, index: int) -> StepScalars:
        """LCMScheduler.step's steps 1 to 3 for the step at ``index``, in its float32 tensor arithmetic."""
        timestep = self.host_timesteps[index]
        prev_timestep = self.host_timesteps[index + 1] if index + 1 < len(self.host_timesteps) else timestep
        alphas, final_alpha = self._host_alphas
        alpha_prod_t = alphas[timestep]
        alpha_prod_t_prev = alphas[prev_timestep] if prev_timestep >= 0 else final_alpha
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(torch.tensor(timestep))
        return StepScalars(
            timestep=timestep,
            sqrt_alpha_prod=alpha_prod_t.sqrt(),
            sqrt_beta_prod=(1 - alpha_prod_t).sqrt(),
            sqrt_alpha_prod_prev=alpha_prod_t_prev.sqrt(),
            sqrt_beta_prod_prev=(1 - alpha_prod_t_prev).sqrt(),
            c_skip=c_skip,
            c_out=c_out,
        )

    @property
    def last_timestep(self) -> int | None:
        """The timestep of the step that ran last, as an int, without asking the device (None before a step)."""
        if self.step_index is None or self.step_index == 0 or not self.host_timesteps:
            return None
        return self.host_timesteps[self.step_index - 1]

    def denoised(self, s: StepScalars, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The consistency function's estimate of the clean latents, f(z_t) = c_skip z_t + c_out x0_pred, for the
        step whose scalars are ``s`` (LCMScheduler.step's steps 3 to 5, in its order of operations: the engine's
        sampler, engine/sampling.py, and :meth:`step` both use it)."""
        # Copied from diffusers.schedulers.scheduling_lcm.LCMScheduler.step (steps 3-5), scalars from the host.
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            predicted_original_sample = (sample - s.sqrt_beta_prod * model_output) / s.sqrt_alpha_prod
        elif prediction_type == "sample":
            predicted_original_sample = model_output
        elif prediction_type == "v_prediction":
            predicted_original_sample = s.sqrt_alpha_prod * sample - s.sqrt_beta_prod * model_output
        else:
            raise ValueError(f"`prediction_type` given as {prediction_type} must be one of `epsilon`, `sample` or "
                             "`v_prediction` for `LCMScheduler`.")

        if self.config.thresholding:
            predicted_original_sample = self._threshold_sample(predicted_original_sample)
        elif self.config.clip_sample:
            predicted_original_sample = predicted_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range)

        return s.c_out * predicted_original_sample + s.c_skip * sample

    def run_schedule(self, start: int = 0) -> tuple[torch.Tensor, list[StepScalars]]:
        """The timesteps (on the device given to set_timesteps) and host scalars of the steps that run, from
        schedule index ``start`` (SD's image-to-image starts part-way, diffusers' ``set_begin_index``)."""
        return self.timesteps[start:], self._scalars[start:]

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             return_dict: bool = True) -> LCMSchedulerOutput | tuple:
        """``LCMScheduler.step`` for the schedule's step at ``step_index`` (``timestep`` is only read to find the
        first step's index, as diffusers does)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)  # the one wait: which schedule entry is this timestep?
        s = self._scalars[self.step_index]
        denoised = self.denoised(s, model_output, sample)

        # No noise on the schedule's last step (nor for one-step sampling).
        if self.step_index != self.num_inference_steps - 1:
            noise = draw_noise(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = s.sqrt_alpha_prod_prev * denoised + s.sqrt_beta_prod_prev * noise
        else:
            prev_sample = denoised

        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)


def draw_noise(shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape`` in ``dtype`` on ``device``, drawn in float32 from ``generator`` (one, a
    list of one per batch member, as ``randn_tensor`` takes them, or None for the global RNG).

    Drawn where the generator lives; a host draw reaches a CUDA device through pinned memory without the host
    waiting for the device (``randn_tensor`` copies from pageable memory, which waits)."""
    if generator is None:
        return randn_tensor(shape, generator=None, device=device, dtype=dtype)
    first = generator[0] if isinstance(generator, list) else generator
    noise = randn_tensor(shape, generator=generator, device=first.device, dtype=torch.float32)
    if noise.device != torch.device(device):
        if torch.device(device).type == "cuda" and noise.device.type == "cpu":
            noise = noise.pin_memory().to(device, non_blocking=True)
        else:
            noise = noise.to(device)
    return noise.to(dtype)


def use_host_scheduler(pipe: Any) -> bool:
    """Give ``pipe`` a :class:`HostLCMScheduler` in place of its ``LCMScheduler`` (same config); whether it did.
    Any other scheduler (a subclass, a different sampler) is left as it is."""
    if type(pipe.scheduler) is not LCMScheduler:
        return isinstance(pipe.scheduler, HostLCMScheduler)
    pipe.scheduler = HostLCMScheduler.from_config(pipe.scheduler.config)
    return True


def initial_latents(pipe: Any, batch_size: int, width: int, height: int, generator: Any, device: Any,
                    dtype: torch.dtype) -> torch.Tensor:
    """Text-to-image's starting noise, as the pipeline's ``prepare_latents`` would draw it from ``generator``
    (one, or one per batch member), but drawn in float32 and cast (:func:`draw_noise`): the same seed starts
    from the same noise in every dtype. Passed to the pipeline as ``latents=``."""
    shape = (batch_size, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return draw_noise(shape, generator, torch.device(device), dtype)


def diffusers_class_name(component: Any) -> str:
    """The name of the diffusers class ``component`` is or extends (HostLCMScheduler -> "LCMScheduler"): the
    name a diffusers user would load it with, as recorded in images' metadata."""
    for cls in type(component).__mro__:
        if cls.__module__.startswith("diffusers."):
            return cls.__name__
    return type(component).__name__
