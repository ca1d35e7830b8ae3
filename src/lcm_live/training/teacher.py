"""Stage 2: the teacher, a small latent diffusion model (epsilon prediction) on 16x16x4 latents.

UNet2DConditionModel with attention at 8x8 and 4x4 only (attention over 256 tokens at 16x16 was a third
of the step time on CPU, and position needs no attention: convolutions place the shape), plus ``addition_embed_type="text"``: an
attention-pooled text vector added to the time embedding, so global attributes (the colours) reach every
ResNet block directly instead of only through cross-attention (the first try learned colour words slowly
through cross-attention alone). Trained jointly with a small CLIP text encoder; SD's noise schedule
(scaled_linear 0.00085..0.012, 1000 steps); 10% empty captions so classifier-free guidance works;
min-SNR loss weighting (gamma 5) to spend the few steps we have where they help; AdamW, warmup + cosine LR,
EMA weights (what is saved). Saved as a StableDiffusionPipeline folder (safetensors) under ``pipeline/``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

CAPTION_DROPOUT = 0.1
CHANNELS = (32, 64, 64)  # UNet widths at 16x16, 8x8, 4x4 latents
MIN_SNR_GAMMA = 5.0


def build_unet(seed: int = 0, cross_attention_dim: int = 64, time_cond_proj_dim: int | None = None):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=16,
        addition_embed_type="text", addition_embed_type_num_heads=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)


def ema_update(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():  # one fused call: a per-tensor loop is hundreds of tiny kernels on a GPU
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def save_pipeline(folder: Path, unet, text_encoder, tokenizer, vae) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def train_teacher(
    output: str | Path, *, vae_dir: str | Path, steps: int = 3000, batch_size: int = 64,
    learning_rate: float = 6e-4, pool_size: int = 16384, seed: int = 0, check_every: int = 500,
    checkpoint_every: int = 250, bf16: bool = True, device: str = "cpu", log=print,
) -> Path:
    """Train (resuming from ``output/checkpoint`` if there) and save ``output/pipeline``."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm import tqdm

    from lcm_live.training.checkpoint import load_checkpoint, save_checkpoint
    from lcm_live.training.data import shapes_pool
    from lcm_live.training.text import build_text_encoder, build_tokenizer, tokenize

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(device)
    tokenizer = build_tokenizer(output / "tokenizer")
    text_encoder = build_text_encoder(tokenizer, seed=seed).train().to(device)
    unet = build_unet(seed, cross_attention_dim=text_encoder.config.hidden_size).train().to(device)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(200, steps // 10), num_training_steps=steps)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text}
    start = 0
    if (output / "checkpoint" / "state.json").exists():
        start = load_checkpoint(output / "checkpoint", modules, opt)["step"]
        for _ in range(start):
            sched.step()
        log(f"teacher: resumed at step {start}")
    log(f"teacher: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M; encoding {pool_size} images")
    pool = shapes_pool(vae, pool_size, seed=seed + 1)
    ddpm = noise_scheduler()
    alphas = ddpm.alphas_cumprod.to(device)  # (1000,)
    snr = alphas / (1 - alphas)
    empty_ids = tokenize(tokenizer, [""])
    rng = np.random.default_rng(seed * 7919 + start)  # a resumed run draws new batches, reproducibly
    gen = torch.Generator().manual_seed(seed * 7919 + start)
    bar = tqdm(range(start, steps), desc="teacher", dynamic_ncols=True, initial=start, total=steps)
    for step in bar:
        latents, captions = pool.batch(rng, batch_size, gen)
        ids = tokenize(tokenizer, captions)
        drop = torch.from_numpy(rng.random(batch_size) < CAPTION_DROPOUT)
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        latents, noise, t, ids = latents.to(device), noise.to(device), t.to(device), ids.to(device)
        noisy = ddpm.add_noise(latents, noise, t)  # moves its schedule to the latents' device itself
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            cond = text_encoder(ids).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=cond).sample.float()
        weight = torch.clamp(snr[t], max=MIN_SNR_GAMMA) / snr[t]  # min-SNR-gamma for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(output / "checkpoint", modules, opt, {"step": done})
        if check_every and (done % check_every == 0 or done == steps):
            scores = quick_check(ema_unet, ema_text, tokenizer, vae)
            log(f"teacher step {done}: DDIM 25 steps, guidance 8: {json.dumps(scores)}")
    save_pipeline(output / "pipeline", ema_unet.to("cpu"), ema_text.to("cpu"), tokenizer, vae.to("cpu"))
    return output / "pipeline"


def quick_check(unet, text_encoder, tokenizer, vae, *, n: int = 24, steps: int = 25, guidance: float = 8.0):
    """Checker accuracy of a DDIM sample on the first ``n`` eval specs (measured, not the loss)."""
    from lcm_live.training.eval import sample_sd
    from lcm_live.training.shapes import eval_specs

    every = eval_specs()
    stride = max(1, len(every) // n)  # a shifted stride so all colours appear in small subsets
    specs = [every[(i * stride + (i // stride) % stride) % len(every)] for i in range(min(n, len(every)))]
    images = sample_sd(unet, text_encoder, tokenizer, vae, [s.caption for s in specs],
                       steps=steps, guidance=guidance, solver="ddim", seed=0)
    from lcm_live.training.checker import score_images

    return score_images(images, specs)
