"""The seed article's code path, as `lcm-live bench` runs it: ``StableDiffusionPipeline`` (SDXL:
``StableDiffusionXLPipeline``) with an ``LCMScheduler``, full VAE, float32 on a CPU and float16 on CUDA, the
prompt encoded on every call.

``seed_run`` is one timed image of it. ``seed_reference`` is the same path once more, untimed, from lcm-live's
own noise, for ``parity_cosine``: the engine draws its noise in float32 and casts it (engine/scheduler.py), and a
torch whose sampler draws half precision differently (2.11) would give the seed article's float16 run another
noise altogether. In float32 the reference is the timed image bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lcm_live.bench.measure import synchronize

if TYPE_CHECKING:
    from lcm_live.bench.bench_engine import BenchConfig


def build_seed_pipeline(config: BenchConfig, device: Any) -> tuple[Any, Any]:
    """The seed article's path: StableDiffusionPipeline (or SDXL's) + LCMScheduler, full VAE, fp32 / fp16."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from lcm_live.engine.architectures import build_pipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    built = build_pipeline(config.arch, full_lcm=None if config.arch != "tiny" else True, dtype=torch.float32,
                           seed=config.model_seed)  # the family's own UNet (a full LCM for sd15, sdxl)
    if type(built).__name__ == "StableDiffusionXLPipeline":
        pipe = built
    else:
        pipe = StableDiffusionPipeline(vae=built.vae, text_encoder=built.text_encoder, tokenizer=built.tokenizer,
                                       unet=built.unet, scheduler=built.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    from lcm_live.bench.bench_engine import engine_family
    from lcm_live.engine.families import make_scheduler

    # The family's own scheduler (LCM for sd15, sdxl and the LCM-LoRA families; Euler for the turbo ones, SDXS).
    pipe.scheduler = make_scheduler(engine_family(config.arch), LCMScheduler.from_config(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), dtype


def seed_run(pipe: Any, config: BenchConfig, device: Any, **noise: Any) -> Any:
    """One image the seed's way; returns the final latents (the last step's output, = its x0 for LCM).
    ``noise``: ``generator`` and ``latents`` to use instead of a fresh seeded generator."""
    import torch

    final = {}

    def keep(p, i, t, tensors):
        final["latents"] = tensors["latents"]
        return {}

    noise.setdefault("generator", torch.Generator("cpu").manual_seed(config.seed))
    pipe(config.prompt, num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
         width=config.width, height=config.height, num_images_per_prompt=config.batch_size,
         callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"], **noise)
    synchronize(device)
    return final["latents"]


def seed_reference(pipe: Any, config: BenchConfig, device: Any) -> Any:
    """The seed path once more, untimed, from lcm-live's own noise: the starting latents and the re-noising drawn
    in float32 as the engine draws them (engine/scheduler.py), so parity compares two computations of one image.
    On a CPU in float32 this is the seed path's own image, bit for bit; in float16 on a torch whose sampler draws
    half precision differently (2.11), the seed article's own draws would be another image altogether."""
    import torch

    from lcm_live.engine.scheduler import HostLCMScheduler, initial_latents

    original = pipe.scheduler
    if type(original).__name__ == "LCMScheduler":  # the engine's host-scalar LCM; other families' as they are
        pipe.scheduler = HostLCMScheduler.from_config(original.config)
    try:
        generator = torch.Generator("cpu").manual_seed(config.seed)
        latents = initial_latents(pipe, config.batch_size, config.width, config.height, generator, device,
                                  pipe.unet.dtype)
        return seed_run(pipe, config, device, generator=generator, latents=latents)
    finally:
        pipe.scheduler = original
