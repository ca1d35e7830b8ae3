"""Stage 1: a small AutoencoderKL for the shapes data set, 64x64x3 pixels <-> 16x16x4 latents.

4x downsampling (not SD's 8x) so a small 20 px shape still spans 5-7 latent pixels. Trained with
L1 + L2 reconstruction and a small KL term; ``scaling_factor`` is set afterwards so that scaled latents
have unit standard deviation (what the diffusion noise schedule assumes).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lcm_live.training.checker import score_images
from lcm_live.training.shapes import sample_batch, to_tensor

VAE_CHANNELS = (16, 32, 64)  # 3 blocks = 2 downsamplings: 64 -> 16
LATENT_CHANNELS = 4
KL_WEIGHT = 1e-6  # per element, as SD's autoencoder: keeps the posterior near N(0, 1) without blurring


def build_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(VAE_CHANNELS)
    return AutoencoderKL(
        block_out_channels=list(VAE_CHANNELS), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=LATENT_CHANNELS, norm_num_groups=16, layers_per_block=1, sample_size=64,
    )


def decode_to_uint8(vae, latents) -> np.ndarray:
    """Scaled latents (N, 4, 16, 16) -> uint8 images (N, 64, 64, 3)."""
    import torch

    with torch.no_grad():
        x = vae.decode(latents / vae.config.scaling_factor).sample
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def reconstruction_scores(vae, seed: int = 999_999, n: int = 192, outline: bool = False) -> dict[str, float]:
    """Checker accuracy of encode -> decode (posterior mean) on ``n`` fresh images (``outline``: outlined ones,
    the outline scored too)."""
    import torch

    images, specs = sample_batch(seed, n, outline=outline)
    with torch.no_grad():
        z = vae.encode(to_tensor(images).to(vae.device)).latent_dist.mean * vae.config.scaling_factor
    return score_images(decode_to_uint8(vae, z), specs, outlined=outline)


def train_vae(
    output: str | Path, *, steps: int = 700, batch_size: int = 32, learning_rate: float = 2e-3,
    seed: int = 0, bf16: bool = True, init: str | Path | None = None, device: str = "cpu", log=print,
) -> Path:
    """Train and save (diffusers folder, safetensors). Batches are drawn fresh each step (seed + step).

    ``init``: continue from a saved VAE (a second phase with its own LR schedule) instead of a fresh one.
    """
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm import tqdm

    output = Path(output)
    if init is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(init).train()
    else:
        vae = build_vae(seed).train()
    device = torch.device(device)
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(50, steps // 10), num_training_steps=steps)
    bar = tqdm(range(steps), desc=f"vae{' (refine)' if init else ''}", dynamic_ncols=True)
    for step in bar:
        images, _ = sample_batch(seed * 1_000_003 + step, batch_size)
        x = to_tensor(images).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        kl = post.kl().mean() / post.mean[0].numel()  # per element
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + KL_WEIGHT * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    # unit-variance latents: std of posterior samples over a fresh batch
    with torch.no_grad():
        images, _ = sample_batch(seed + 777, 256)
        z = vae.encode(to_tensor(images).to(device)).latent_dist.sample()
    std = float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std if math.isfinite(std) and std > 0 else 1.0)
    scores = reconstruction_scores(vae)
    log(f"vae: latent std {std:.3f}, scaling_factor {vae.config.scaling_factor:.4f}, reconstruction {scores}")
    vae.to("cpu").save_pretrained(output, safe_serialization=True)
    return output


def refine_decoder(
    vae_dir: str | Path, output: str | Path, *, steps: int = 600, batch_size: int = 32, learning_rate: float = 5e-4,
    outline_fraction: float = 0.5, seed: int = 5, device: str = "cpu", log=print,
) -> Path:
    """Fine-tune only the decoder on plain and outlined shapes (issue 18) and save the VAE.

    The encoder, and so every latent a model was trained on, stays exactly as it was: the teacher, the LCM and
    the LoRAs keep working, and the decoder learns to draw the 2-3 px rings it never saw (trained on plain
    shapes alone it renders them as a blurred halo). ``scaling_factor`` is kept.
    """
    import torch
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm import tqdm

    device = torch.device(device)
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(50, steps // 10), num_training_steps=steps)
    n_outlined = round(batch_size * outline_fraction)
    bar = tqdm(range(steps), desc="vae decoder", dynamic_ncols=True)
    for step in bar:
        plain, _ = sample_batch(seed * 1_000_003 + step, batch_size - n_outlined)
        outlined, _ = sample_batch(seed * 1_000_003 + step + 500_000, n_outlined, outline=True)
        x = to_tensor(np.concatenate([plain, outlined])).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    log(f"vae decoder: reconstruction {reconstruction_scores(vae)}, outlined {reconstruction_scores(vae, outline=True)}")
    vae.to("cpu").save_pretrained(output, safe_serialization=True)
    return Path(output)
