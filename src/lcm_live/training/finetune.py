"""Fine-tuning the teacher in a new style (issue 18): the outlined shapes, as a full fine-tune or as a LoRA.

The same loss as the teacher's training (``teacher.py``: epsilon prediction, SD's noise schedule, min-SNR-5
weighting, 10% empty captions so classifier-free guidance still works), on the outlined variant of the
shapes data set (``shapes.py``: a 2-3 px ring around each shape, captions ending ", outlined"). Only the
UNet learns: the text encoder, tokenizer and VAE stay the base teacher's, as in most Stable Diffusion
fine-tunes, so the fine-tune shares them (and an LCM-LoRA distilled from the base has the same inputs).

- ``lora_rank=None``: every UNet weight trains; the EMA of the weights is saved as a
  ``StableDiffusionPipeline`` folder (``builtin:shapes-outline-teacher``).
- ``lora_rank=r``: peft LoRA adapters of rank r on the base UNet are the only trained weights, saved in
  diffusers' LoRA format (``pytorch_lora_weights.safetensors``, ``builtin:shapes-outline-lora``): the style
  as a difference that stacks with other LoRAs.

The caption's ", outlined" does not fit the 16 text positions whole: the byte-level tokenizer spells it
",", "o", "u", "t", "l", "i" before the end token. The text encoder is causal, so the first nine states are
those of the plain caption and the rest name the style; enough for a model that only ever sees this suffix.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lcm_live.errors import UserError

FROZEN_PARTS = ("text_encoder", "tokenizer", "vae")  # what a fine-tune keeps from its teacher


@dataclass
class FinetuneConfig:
    teacher: str  # a StableDiffusionPipeline folder (epsilon prediction)
    output: str
    data: str = "shapes-outlined"  # any make_pool source: shapes, shapes-outlined, a folder of pairs
    lora_rank: int | None = None  # None: a full UNet fine-tune; r: a LoRA of rank r
    max_train_steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-4
    pool_size: int = 4096  # shapes images encoded once
    ema_decay: float = 0.995  # full fine-tune only: the saved weights are the EMA
    checkpoint_every: int = 250
    seed: int = 0
    resume: bool = True
    device: str = "cpu"


def finetune(cfg: FinetuneConfig, log=print) -> Path:
    """Train (resuming from ``output/checkpoint`` if there and ``resume``); returns the output folder."""
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm import tqdm

    from lcm_live.training.checkpoint import load_checkpoint, save_checkpoint
    from lcm_live.training.data import make_pool
    from lcm_live.training.distill import LORA_TARGETS, check_device, load_teacher
    from lcm_live.training.teacher import CAPTION_DROPOUT, MIN_SNR_GAMMA, ema_update, noise_scheduler
    from lcm_live.training.text import tokenize

    # 1. Check the settings, then load the base teacher; only the UNet (or its adapters) will train.
    check_device(cfg.device)
    if cfg.max_train_steps < 1 or cfg.batch_size < 1 or not cfg.learning_rate > 0:
        raise UserError(f"finetune: steps {cfg.max_train_steps}, batch {cfg.batch_size} and learning rate "
                        f"{cfg.learning_rate} must all be positive", field="max_train_steps")
    out, ckpt = Path(cfg.output), Path(cfg.output) / "checkpoint"
    if out.exists() and any(out.iterdir()) and not (cfg.resume and (ckpt / "state.json").exists()):
        raise UserError(f"finetune: output {out} exists and holds no checkpoint to resume; pick a new folder",
                        field="output")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    pipe = load_teacher(cfg.teacher).to(device)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    ema = None
    if cfg.lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    else:
        unet.requires_grad_(True)
        ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(100, cfg.max_train_steps // 10),
                                            num_training_steps=cfg.max_train_steps)
    modules = {"unet": unet} | ({"ema": ema} if ema is not None else {})
    start = 0
    if cfg.resume and (ckpt / "state.json").exists():
        start = load_checkpoint(ckpt, modules, opt)["step"]
        for _ in range(start):
            sched.step()
        log(f"finetune: resumed at step {start}")

    # 2. The data, encoded once by the (frozen) VAE; the text states of a batch are computed on the fly.
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    pool = make_pool(vae, cfg.data, n_shapes=cfg.pool_size, resolution=resolution, seed=cfg.seed + 3)
    log(f"finetune: {'LoRA rank ' + str(cfg.lora_rank) if cfg.lora_rank else 'full UNet'}, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable params, {len(pool)} latents of {cfg.data}")
    alphas = noise_scheduler().alphas_cumprod.to(device)  # (1000,)
    snr = alphas / (1 - alphas)
    ddpm = noise_scheduler()
    empty_ids = tokenize(tokenizer, [""])
    rng = np.random.default_rng(cfg.seed * 7919 + start)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + start)

    # 3. The teacher's loss: epsilon prediction with min-SNR weighting, captions dropped 10% of the time.
    bar = tqdm(range(start, cfg.max_train_steps), desc="finetune", dynamic_ncols=True, initial=start,
               total=cfg.max_train_steps)
    for step in bar:
        latents, captions = pool.batch(rng, cfg.batch_size, gen)
        ids = tokenize(tokenizer, captions)
        ids[torch.from_numpy(rng.random(len(captions)) < CAPTION_DROPOUT)] = empty_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (len(captions),), generator=gen)
        latents, noise, t, ids = latents.to(device), noise.to(device), t.to(device), ids.to(device)
        with torch.no_grad():
            cond = text_encoder(ids).last_hidden_state
        pred = unet(ddpm.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        weight = torch.clamp(snr[t], max=MIN_SNR_GAMMA) / snr[t]
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.max_train_steps:
            save_checkpoint(ckpt, modules, opt, {"step": done, "config": asdict(cfg)})

    # 4. Save: a pipeline folder (the EMA UNet with the base's other parts) or the LoRA alone.
    pipe.to("cpu")
    if cfg.lora_rank:
        save_lora(out, unet.to("cpu"))
    else:
        from lcm_live.training.teacher import save_pipeline

        save_pipeline(out, ema.to("cpu"), text_encoder.to("cpu"), tokenizer, vae.to("cpu"))
        for part in FROZEN_PARTS:  # untouched: the teacher's own files, byte for byte (so they can be shared)
            shutil.rmtree(out / part)
            shutil.copytree(Path(cfg.teacher) / part, out / part)
    (out / "finetune_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out


def save_lora(folder: Path, unet) -> None:
    """The UNet's peft adapters as ``pytorch_lora_weights.safetensors`` in diffusers' format."""
    from diffusers import StableDiffusionPipeline

    from lcm_live.training.distill import lora_layers

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_layers(unet), safe_serialization=True)
