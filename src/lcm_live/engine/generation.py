"""One generation call for a batch of prepared requests with equal keys: the recipe ``Engine._call`` runs.

1. Text: each latent's prompt embeddings (cached; blended with a second prompt), and its regions'.
2. Schedule: the family's sampler (LCM, TCD, Euler: engine/samplers.py) for the steps and strength, its
   scalars on the host.
3. Start latents: seeded noise (slerped with a second seed's), or the init image's latents noised to the first
   timestep.
4. Conditionings around the UNet: w-embedding, SDXL size ids, the ControlNets (each in its steps), the
   IP-Adapter's image embeddings, inpainting; region prompts on their windows (engine/regions.py).
5. Sample (engine/sampling.py, engine/samplers.py), calling ``on_step`` after each step.
6. Decode, and composite masked results with their init images.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lcm_live.engine import modes
from lcm_live.engine.denoiser import Control, ControlSteps, Denoiser, TextRows
from lcm_live.engine.latents import decode, encode_images, encode_mode, noise_for
from lcm_live.engine.masks import composite, latent_mask
from lcm_live.engine.postprocess import to_pil
from lcm_live.engine.regions import RegionDenoiser, crop, windows
from lcm_live.engine.samplers import Plan
from lcm_live.engine.sampling import guidance_embedding


def _embeddings(engine: Any, p: Any) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Step 1 for one request: its prompt's embeddings (blended with a second prompt), its regions' and the
    warnings (a prompt cut by the tokenizer's window, a mask fitted)."""
    pipe, cache, scope = engine.pipe, engine.prompts, p.request.cache_scope
    base = cache.get(pipe, p.request.prompt, p.negative, do_cfg=p.do_cfg, scope=scope)[0]
    kw, notes = dict(base.kwargs), list(base.warnings)
    blend = p.request.prompt_blend
    if blend is not None and blend.weight > 0:
        other = cache.get(pipe, blend.prompt, None, do_cfg=False, scope=scope)[0]
        notes += other.warnings
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            if name in kw:
                kw[name] = torch.lerp(kw[name], other.kwargs[name], float(blend.weight))
    regions = []
    for region in p.request.regions:
        entry = cache.get(pipe, region.prompt, None, do_cfg=False, scope=scope)[0]
        regions.append({**entry.kwargs, **{k: v for k, v in kw.items() if k.startswith("negative")}})
        notes += entry.warnings
    return kw, regions, notes + list(p.notes)


def _rows(per_latent: list[dict[str, Any]]) -> TextRows:
    """The TextRows of latents whose embeddings are ``per_latent`` (one dict per latent, batch 1 each)."""
    def cat(name: str) -> Any:
        parts = [kw[name] for kw in per_latent if name in kw]
        return torch.cat(parts) if parts else None

    return TextRows(prompt_embeds=cat("prompt_embeds"), negative_prompt_embeds=cat("negative_prompt_embeds"),
                    pooled_prompt_embeds=cat("pooled_prompt_embeds"),
                    negative_pooled_prompt_embeds=cat("negative_pooled_prompt_embeds"))


def _denoiser(engine: Any, first: Any, text: TextRows, size: tuple[int, int], *, control: Any = None,
              inpaint_inputs: Any = None, image_embeds: Any = None) -> Denoiser:
    """Step 4: the UNet and its conditionings for latents of pixel ``size`` (height, width)."""
    unet, device, dtype = engine.pipe.unet, engine.device, text.prompt_embeds.dtype
    w_embedding = None
    if unet.config.time_cond_proj_dim is not None:
        w_embedding = guidance_embedding(first.guidance_scale, 1, unet.config.time_cond_proj_dim, device, dtype)
    time_ids = None
    if text.pooled_prompt_embeds is not None:  # SDXL: (original size, crop top-left, target size)
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=dtype, device=device)
    return Denoiser(unet, text, guidance_scale=first.guidance_scale, do_cfg=first.do_cfg, w_embedding=w_embedding,
                    time_ids=time_ids, control=control, inpaint_inputs=inpaint_inputs,
                    image_embeds=_embed_rows(image_embeds, text.prompt_embeds.shape[0]))


def _embed_rows(image_embeds: Any, rows: int) -> Any:
    """The IP-Adapter's (cond, uncond) embeddings for ``rows`` latents: as they are (one per latent), or one
    request's repeated for its region windows' rows."""
    if image_embeds is None or image_embeds[0].shape[0] == rows:
        return image_embeds
    return tuple(e[:1].repeat(rows, *[1] * (e.dim() - 1)) for e in image_embeds)


def _controls(engine: Any, preps: list[Any], n: int, num_steps: int, dtype: Any) -> Any:
    """Step 4's ControlNets: per net its images (one row per latent, in [0, 1]; None: the net sits out), scale
    and steps (control_guidance_start/end over the ``num_steps`` that run), or None without a control image."""
    first, request = preps[0], preps[0].request
    if request.control_image is None:
        return None
    nets = engine.controlnets
    images = []
    for k in range(len(nets)):
        if first.control_image[k] is None:  # equal across a batch (the batch key says which nets have images)
            images.append(None)
            continue
        pixels = engine.control_processor.preprocess([p.control_image[k] for p in preps], height=first.height,
                                                     width=first.width).to(dtype=torch.float32)
        images.append(_per_image(pixels.to(engine.device, dtype), n))
    scales = [float(x) for x in modes.per_net(request.controlnet_conditioning_scale, len(nets))]
    steps = ControlSteps.of(modes.per_net(request.control_guidance_start, len(nets)),
                            modes.per_net(request.control_guidance_end, len(nets)), num_steps)
    return Control(nets, images, scales, steps)


def _image_embeds(engine: Any, preps: list[Any], n: int) -> Any:
    """Step 4's IP-Adapter embeddings (cond, uncond), one row per latent; a request without a reference image
    gets zeros and the call runs at scale 0 (diffusers' processors then skip the adapter); None without one."""
    if engine.ip_embeddings is None:
        return None
    request = preps[0].request
    # One scale per call (the batch key holds it).
    engine.ip_embeddings.set_scale(float(request.ip_adapter_scale) if request.ip_adapter_image is not None else 0.0)
    pairs = [engine.ip_embeddings(p.request.ip_adapter_image, scope=p.request.cache_scope)
             if p.request.ip_adapter_image is not None
             else engine.ip_embeddings.blank() for p in preps]
    return tuple(_per_image(torch.cat([pair[i] for pair in pairs]), n) for i in (0, 1))


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
        embeds = [_embeddings(engine, p) for p in preps]
        warnings = [notes for _, _, notes in embeds]
        text = _rows([kw for kw, _, _ in embeds for _ in range(n)])
        dtype = text.prompt_embeds.dtype
        t_text = time.perf_counter()

        # 2. Schedule.
        strength = request.strength if first.img2img else None
        plan = Plan(engine.sampler, pipe.scheduler, request.num_inference_steps, device, strength=strength,
                    lcm_img2img=engine.lcm_img2img, eta=engine.eta)  # the family's sampler (engine/samplers.py)

        # 3. Start latents.
        vae, scale = pipe.vae, pipe.vae_scale_factor
        shape = (len(preps) * n, vae.config.latent_channels, first.height // scale, first.width // scale)
        blends = [p.request.seed_blend for p in preps for _ in range(n)]
        init_latents = None
        if first.img2img:
            pictures = [p.init_image for p in preps]
            if first.mask is None:  # the picture's encoding, kept for the next call with the same picture
                init_latents = _per_image(engine.init_latents(vae, pipe.image_processor, pictures, generator, device,
                                                              dtype, [p.request.cache_scope for p in preps]), n)
            else:  # inpainting reads the preprocessed picture too
                images = pipe.image_processor.preprocess(pictures).to(device=device, dtype=dtype)
                init_latents = _per_image(encode_images(vae, images, generator), n)
            noise = noise_for([p.seed for p in preps], blends, tuple(init_latents.shape), generator, device, dtype)
            latents = plan.noised(init_latents, noise)
        else:
            latents = plan.start(noise_for([p.seed for p in preps], blends, shape, generator, device, dtype))

        # 4. Conditionings.
        unet = pipe.unet
        controls = _controls(engine, preps, n, len(plan.timesteps), dtype)
        image_embeds = _image_embeds(engine, preps, n)

        def cropped(boxes: list[Any]) -> Any:  # the ControlNets on windows of the picture (their images cropped)
            if controls is None:
                return None
            return Control(controls.nets, [None if i is None else crop(i, boxes, scale) for i in controls.images],
                           controls.scales, controls.steps)
        blend, inpaint_inputs = None, None
        if first.mask is not None:
            mask = _per_image(latent_mask([p.mask for p in preps], scale, device, dtype), n)
            if unet.config.in_channels == 9:  # an inpainting UNet: mask and masked image as inputs, no blending
                kept = images * torch.from_numpy(_binary_masks(preps) < 0.5).to(device, dtype)  # diffusers' masked image
                inpaint_inputs = torch.cat([mask, _per_image(encode_mode(vae, kept), n)], dim=1)
            else:
                def blend(denoised: torch.Tensor) -> torch.Tensor:  # outside the mask: the init image's latents
                    return mask * denoised + (1 - mask) * init_latents
        elif unet.config.in_channels == 9:  # an inpainting UNet without a mask: everything is redrawn
            blank = torch.zeros(1, 3, first.height, first.width, device=device, dtype=dtype)  # the masked image
            full = encode_mode(vae, blank).expand(latents.shape[0], -1, -1, -1)
            inpaint_inputs = torch.cat([torch.ones_like(full[:, :1]), full], dim=1)
        h, w = latents.shape[-2:]
        if first.mask_box is not None and first.mask_box != (0, h, 0, w):  # inpainting: the mask's window only
            boxes = [first.mask_box]
            y0, y1, x0, x1 = boxes[0]
            inner = _denoiser(engine, first, text, ((y1 - y0) * scale, (x1 - x0) * scale), control=cropped(boxes),
                              image_embeds=image_embeds)
            weights = torch.zeros(2, 1, h, w, device=device, dtype=dtype)
            weights[1, :, y0:y1, x0:x1] = 1  # outside the window the blend keeps the init image's latents
            model = RegionDenoiser(inner, None, boxes, weights)
        elif first.region_weights is None:
            model = _denoiser(engine, first, text, (first.height, first.width), control=controls,
                              inpaint_inputs=inpaint_inputs, image_embeds=image_embeds)
        else:  # one request (regions never share a call): its region prompts on their windows (engine/regions.py)
            weights = first.region_weights.to(device, dtype)
            boxes = windows(weights)
            (y0, y1, x0, x1), regions = boxes[0], embeds[0][1]
            window_text = _rows([kw for _ in range(n) for kw in regions])
            base = None
            if weights[0].any():
                base = _denoiser(engine, first, text, (first.height, first.width), control=controls,
                                 inpaint_inputs=inpaint_inputs, image_embeds=image_embeds)
            model = RegionDenoiser(
                _denoiser(engine, first, window_text, ((y1 - y0) * scale, (x1 - x0) * scale), control=cropped(boxes),
                          inpaint_inputs=None if inpaint_inputs is None else crop(inpaint_inputs, boxes),
                          image_embeds=image_embeds),
                base, boxes, weights)

        # 5. Sample.
        marks = {"last_step": None}

        def callback(event: dict[str, Any]) -> None:
            marks["last_step"] = time.perf_counter()
            if controls is not None:  # the ControlNets' next step (control_guidance_start/end)
                controls.steps.step = event["i"] + 1
            on_step(event["i"] + 1, event["total"], event["timestep"], event["denoised"])

        latents = plan.sample(model, latents, generator=generator, callback=callback, blend=blend)

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
