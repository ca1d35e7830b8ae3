"""One generation call for a batch of prepared requests with equal keys: the recipe ``Engine._call`` runs.

1. Text: each latent's prompt embeddings (cached; blended with a second prompt; one row per region prompt).
2. Schedule: LCM's timesteps for the steps and strength, the scheduler scalars on the host.
3. Start latents: seeded noise (slerped with a second seed's), or the init image's latents noised to the first
   timestep.
4. Conditionings around the UNet: w-embedding, SDXL size ids, ControlNet, region weights, inpainting.
5. Sample (engine/sampling.py), calling ``on_step`` after each step.
6. Decode, and composite masked results with their init images.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lcm_live.engine.denoiser import Control, Denoiser, TextRows
from lcm_live.engine.latents import decode, encode_images, encode_mode, noise_for
from lcm_live.engine.masks import composite, latent_mask
from lcm_live.engine.postprocess import to_pil
from lcm_live.engine.sampling import guidance_embedding, lcm_schedule, sample_lcm


def _text_rows(engine: Any, preps: list[Any], n: int) -> tuple[TextRows, int, list[list[str]]]:
    """Step 1: the TextRows for every latent (each prep's rows repeated for its ``n`` images), K and warnings."""
    pipe, cache = engine.pipe, engine.prompts
    cond, pooled, neg, neg_pooled, warnings = [], [], [], [], []
    for p in preps:
        base = cache.get(pipe, p.request.prompt, p.negative, do_cfg=p.do_cfg)[0]
        kw, notes = dict(base.kwargs), list(base.warnings)
        blend = p.request.prompt_blend
        if blend is not None and blend.weight > 0:
            other = cache.get(pipe, blend.prompt, None, do_cfg=False)[0]
            notes += other.warnings
            for name in ("prompt_embeds", "pooled_prompt_embeds"):
                if name in kw:
                    kw[name] = torch.lerp(kw[name], other.kwargs[name], float(blend.weight))
        rows = [kw]
        for region in p.request.regions:
            entry = cache.get(pipe, region.prompt, None, do_cfg=False)[0]
            rows.append(entry.kwargs)
            notes += entry.warnings
        warnings.append(notes + list(p.notes))
        for _ in range(n):
            cond += [r["prompt_embeds"] for r in rows]
            pooled += [r["pooled_prompt_embeds"] for r in rows if "pooled_prompt_embeds" in r]
            if p.do_cfg:
                neg.append(kw["negative_prompt_embeds"])
                if "negative_pooled_prompt_embeds" in kw:
                    neg_pooled.append(kw["negative_pooled_prompt_embeds"])
    cat = (lambda xs: torch.cat(xs) if xs else None)  # noqa: E731
    text = TextRows(prompt_embeds=cat(cond), negative_prompt_embeds=cat(neg), pooled_prompt_embeds=cat(pooled),
                    negative_pooled_prompt_embeds=cat(neg_pooled))
    return text, 1 + len(preps[0].request.regions), warnings


def run_call(engine: Any, preps: list[Any], on_step: Any) -> tuple[Any, list[list[str]], dict[str, float]]:
    """The images (PIL, or latents), each member's warnings and the timings of one call."""
    pipe, device = engine.pipe, engine.device
    first, request = preps[0], preps[0].request
    n = request.num_images_per_prompt
    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in preps]
    generator = generators[0] if len(preps) == 1 else generators  # latent i's draws from generator i
    t0 = time.perf_counter()
    with torch.no_grad():
        # 1. Text.
        text, k, warnings = _text_rows(engine, preps, n)
        dtype = text.prompt_embeds.dtype
        t_text = time.perf_counter()

        # 2. Schedule.
        strength = request.strength if first.img2img else None
        timesteps, scalars = lcm_schedule(pipe.scheduler, request.num_inference_steps, device, strength=strength,
                                          lcm_img2img=engine.lcm_img2img)

        # 3. Start latents.
        vae, scale = pipe.vae, pipe.vae_scale_factor
        shape = (len(preps) * n, vae.config.latent_channels, first.height // scale, first.width // scale)
        blends = [p.request.seed_blend for p in preps for _ in range(n)]
        init_latents = None
        if first.img2img:
            images = pipe.image_processor.preprocess([p.init_image for p in preps]).to(device=device, dtype=dtype)
            init_latents = _per_image(encode_images(vae, images, generator), n)
            noise = noise_for([p.seed for p in preps], blends, tuple(init_latents.shape), generator, device, dtype)
            latents = pipe.scheduler.add_noise(init_latents, noise, timesteps[:1])
        else:
            latents = noise_for([p.seed for p in preps], blends, shape, generator, device, dtype)

        # 4. Conditionings.
        unet = pipe.unet
        rows = latents.shape[0] * (k + (1 if first.do_cfg else 0))
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:
            timestep_cond = guidance_embedding(first.guidance_scale, rows, unet.config.time_cond_proj_dim, device,
                                               latents.dtype)
        time_ids = None
        if text.pooled_prompt_embeds is not None:  # SDXL: (original size, crop top-left, target size)
            size = (first.height, first.width)
            time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=device)
        control = None
        if request.control_image is not None:
            controls = engine.control_processor.preprocess([p.control_image for p in preps], height=first.height,
                                                           width=first.width).to(dtype=torch.float32)
            control = Control(engine.loaded.controlnet, _per_image(controls.to(device, dtype), n),
                              float(request.controlnet_conditioning_scale))
        weights = None
        if k > 1:
            weights = _per_image(torch.stack([p.region_weights for p in preps]), n).to(device, dtype)
        blend, inpaint_inputs = None, None
        if first.mask is not None:
            mask = _per_image(latent_mask([p.mask for p in preps], scale, device, dtype), n)
            if unet.config.in_channels == 9:  # an inpainting UNet: mask and masked image as inputs, no blending
                kept = images * torch.from_numpy(_binary_masks(preps) < 0.5).to(device, dtype)  # diffusers' masked image
                masked = _per_image(encode_mode(vae, kept), n)
                inpaint_inputs = torch.cat([mask, masked], dim=1)
            else:
                def blend(denoised: torch.Tensor) -> torch.Tensor:  # outside the mask: the init image's latents
                    return mask * denoised + (1 - mask) * init_latents
        model = Denoiser(unet, text, rows_per_latent=k, guidance_scale=first.guidance_scale, do_cfg=first.do_cfg,
                         timestep_cond=timestep_cond, time_ids=time_ids, control=control, region_weights=weights,
                         inpaint_inputs=inpaint_inputs)

        # 5. Sample.
        marks = {"last_step": None}

        def callback(event: dict[str, Any]) -> None:
            marks["last_step"] = time.perf_counter()
            on_step(event["i"] + 1, event["total"], event["timestep"], event["denoised"])

        latents = sample_lcm(model, latents, timesteps, scalars, scheduler=pipe.scheduler, generator=generator,
                             callback=callback, blend=blend)

        # 6. Decode and composite.
        if request.output_type == "latent":
            images_out = latents
        else:
            images_out = to_pil(decode(vae, latents.to(dtype), pipe.image_processor))
            if first.mask is not None:
                images_out = [composite(img, preps[i // n].init_image, preps[i // n].mask)
                              for i, img in enumerate(images_out)]
    t_end = time.perf_counter()
    last = marks["last_step"] or t_end
    timings = {
        "text_encoder": t_text - t0,  # ~0 on a prompt-cache hit
        "unet": last - t_text,  # the denoising loop (img2img: includes encoding the init image)
        "decode": t_end - last,
        "total": t_end - t0,
    }
    return images_out, warnings, timings


def _binary_masks(preps: list[Any]) -> Any:
    """The members' binary masks as a (B, 1, H, W) float32 numpy array (1 = redraw)."""
    import numpy as np

    return np.stack([np.asarray(p.mask.binary, dtype=np.float32)[None] / 255.0 for p in preps])


def _per_image(per_prompt: torch.Tensor, n: int) -> torch.Tensor:
    """One row per image from one row per prompt (rows of a prompt's ``n`` images side by side). Left as it is for
    one image: a copy would change the memory layout the VAE's encoder left (channels-last), and with it the
    UNet's convolution arithmetic in the last bits."""
    return per_prompt if n == 1 else per_prompt.repeat_interleave(n, dim=0)
