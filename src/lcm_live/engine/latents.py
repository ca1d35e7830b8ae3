"""Latents in and out: the starting noise (and seed blends), the init image's latents, and decoding.

Every draw comes from the caller's generator(s) in the order diffusers' pipelines draw (the init image's VAE sample,
then the noise), so a seed gives diffusers' image. Scaled latents throughout: the VAE's latents times its
``scaling_factor`` (TAESD's is 1.0).
"""

from __future__ import annotations

from typing import Any

import torch

from lcm_live.engine.scheduler import draw_noise


def noise_for(seeds: list[int], blends: list[Any], shape: tuple[int, ...], generator: Any, device: Any,
              dtype: torch.dtype) -> torch.Tensor:
    """The starting noise of shape (B, C, h, w) from ``generator`` (one, or one per latent), then, for latent b with
    a seed blend, slerped toward the noise of ``blends[b].seed`` by ``blends[b].weight``."""
    noise = draw_noise(shape, generator, torch.device(device), dtype)
    if not any(blends):
        return noise
    rows = []
    for b, blend in enumerate(blends):
        row = noise[b : b + 1]
        if blend is not None and blend.weight > 0:
            other = draw_noise((1, *shape[1:]), torch.Generator("cpu").manual_seed(blend.seed), torch.device(device),
                               dtype)
            row = slerp(row, other, float(blend.weight))
        rows.append(row)
    return torch.cat(rows)


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between two noises (of one latent each), computed in float32: weight 0 gives ``a``,
    1 gives ``b``; in between the norm stays that of a Gaussian draw (a plain mix would shrink it)."""
    if weight >= 1:
        return b
    a32, b32 = a.float().flatten(), b.float().flatten()
    cos = torch.dot(a32, b32) / (a32.norm() * b32.norm())
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if omega.abs() < 1e-4:  # nearly parallel: a linear mix is exact enough
        mixed = (1 - weight) * a32 + weight * b32
    else:
        mixed = (torch.sin((1 - weight) * omega) * a32 + torch.sin(weight * omega) * b32) / torch.sin(omega)
    return mixed.view_as(a).to(a.dtype)


def encode_images(vae: Any, images: torch.Tensor, generator: Any) -> torch.Tensor:
    """Init images ((N, 3, H, W) in [-1, 1]) -> scaled latents, sampled from the VAE's posterior with
    ``generator`` (a list: image i with generator i), as diffusers' image-to-image pipelines do."""
    return sample_latents(vae, encoder_outputs(vae, images, generator), generator)


def encoder_outputs(vae: Any, images: torch.Tensor, generator: Any) -> list[Any]:
    """The VAE encoder's outputs for init images: one call for them all, or one an image where each has its own
    generator (``generator`` a list)."""
    if isinstance(generator, list):
        return [vae.encode(images[i : i + 1]) for i in range(images.shape[0])]
    return [vae.encode(images)]


def sample_latents(vae: Any, outputs: list[Any], generator: Any) -> torch.Tensor:
    """Scaled latents from :func:`encoder_outputs`' outputs: output i sampled with generator i (a list), or the one
    output with the one generator."""
    if isinstance(generator, list):
        latents = torch.cat([_retrieve_latents(output, g) for output, g in zip(outputs, generator, strict=True)])
    else:
        (output,) = outputs
        latents = _retrieve_latents(output, generator)
    return vae.config.scaling_factor * latents


# Copied from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img.retrieve_latents ("sample")
def _retrieve_latents(encoder_output: Any, generator: Any) -> torch.Tensor:
    if hasattr(encoder_output, "latent_dist"):
        return encoder_output.latent_dist.sample(generator)
    return encoder_output.latents  # AutoencoderTiny (TAESD): a deterministic encoder


def encode_mode(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents of ``images`` without sampling (the posterior's mode): a 9-channel UNet's masked image."""
    out = vae.encode(images)
    latents = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
    return vae.config.scaling_factor * latents


def decode(vae: Any, latents: torch.Tensor, image_processor: Any) -> torch.Tensor:
    """Scaled latents -> images (B, 3, H, W) in [0, 1], as diffusers' pipelines decode (SDXL's float16 VAE is
    upcast to float32 for the decode where its config asks, ``force_upcast``, and cast back after)."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        if upcast:
            latents = latents.float()
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return image_processor.postprocess(image, output_type="pt")
