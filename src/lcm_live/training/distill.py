"""Latent consistency distillation (Luo et al. 2023, section 4 / Algorithm 1; notes/lcm.md).

Each step, for a batch of latents z and captions c:
  w ~ U[w_min, w_max]; n ~ U{0..N-1} on the N-step DDIM grid (N = 1000 / k, k = 20: t in 19, 39, ..., 999);
  z_{t_{n+k}} = noise(z, t_{n+k});
  teacher with CFG at w (eps = (1 + w) eps(c) - w eps(""), likewise x0) and one DDIM step to t_n: z_hat_{t_n};
  loss = Huber( f_student(z_{t_{n+k}}, w, c, t_{n+k}),  f_target(z_hat_{t_n}, w, c, t_n) ),
where f = c_skip(t) z_t + c_out(t) x0_pred, with LCMScheduler's boundary conditions (sigma_data 0.5,
timestep scaling 10) so that f is the identity at t = 0. The target is an EMA of the student (no gradient).

Full mode: the student is the teacher's UNet plus a w-embedding (``time_cond_proj_dim``; the new projection
zero-initialised so the student starts exactly as the teacher). ``lora`` mode: peft LoRA adapters on the
teacher's UNet are the only trained weights, no w input (LCM-LoRA; the target is the student itself under
stop-gradient, as in the LCM-LoRA recipe). Any diffusers SD pipeline folder works as the teacher.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lcm_live.errors import UserError

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
HUBER_C = 0.001
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class DistillConfig:
    teacher: str
    output: str
    data: str = "shapes"  # "shapes" or a folder of image + caption pairs
    lora: bool = False
    lora_rank: int = 16
    # UNet modules (whole names) left without LoRA layers, with everything inside them (e.g. "up_blocks.2")
    lora_exclude: tuple[str, ...] = ()
    max_train_steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 2e-4
    w_min: float = 2.0  # w = guidance_scale - 1 (diffusers' convention)
    w_max: float = 12.0
    skip: int = 20  # k: DDIM skipping interval on the 1000 training steps
    ema_decay: float = 0.95
    time_cond_proj_dim: int = 64
    pool_size: int = 8192  # shapes images encoded once
    checkpoint_every: int = 200
    seed: int = 0
    resume: bool = False
    bf16: bool = True
    device: str = "cpu"  # cuda trains the same recipe on a GPU


def guidance_scale_embedding(w, dim: int):
    """Sinusoidal embedding of w (N,) -> (N, dim); the same function LatentConsistencyModelPipeline uses."""
    import torch

    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def boundary_scalings(t):
    """c_skip(t), c_out(t) as LCMScheduler: c_skip(0) = 1, c_out(0) = 0."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def _bcast(x):
    return x[:, None, None, None]


def predicted_x0(eps, z, alpha_bar):
    """x0 from an epsilon prediction at cumulative alpha ``alpha_bar`` (N,)."""
    a = _bcast(alpha_bar)
    return (z - (1 - a).sqrt() * eps) / a.sqrt()


def lcd_loss(student, target, teacher, latents, noise, cond, empty, t_start, w, alphas, *, skip: int,
             w_dim: int | None, bf16: bool = True):
    """The consistency distillation loss for one batch (gradient flows into ``student`` only).

    latents (B, C, h, w) clean, scaled; noise like latents; cond (B, L, D) and empty (1, L, D) text states;
    t_start (B,) = t_{n+k} on the grid; w (B,) guidance; alphas (1000,) cumulative alphas; ``target`` None:
    the student under stop-gradient; ``w_dim`` None: no w-embedding (LoRA).
    """
    import torch

    b = latents.shape[0]
    t_end = (t_start - skip).clamp(min=0)  # t_n; below the first grid point the solver lands on t = 0
    a_start, a_end = alphas[t_start], alphas[t_end]
    z_start = _bcast(a_start).sqrt() * latents + _bcast(1 - a_start).sqrt() * noise
    w_emb = None if w_dim is None else guidance_scale_embedding(w, w_dim)
    skip_s, out_s = boundary_scalings(t_start)
    skip_e, out_e = boundary_scalings(t_end)
    amp = dict(device_type=latents.device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.autocast(**amp):
        eps = student(z_start, t_start, timestep_cond=w_emb, encoder_hidden_states=cond).sample.float()
    pred = _bcast(skip_s) * z_start + _bcast(out_s) * predicted_x0(eps, z_start, a_start)
    with torch.no_grad(), torch.autocast(**amp):
        # teacher: CFG at w on the augmented PF-ODE, then one DDIM step t_{n+k} -> t_n
        both = teacher(torch.cat([z_start, z_start]), torch.cat([t_start, t_start]),
                       encoder_hidden_states=torch.cat([cond, empty.expand(b, -1, -1)])).sample.float()
        eps_c, eps_u = both.chunk(2)
        x0_c, x0_u = predicted_x0(eps_c, z_start, a_start), predicted_x0(eps_u, z_start, a_start)
        x0 = x0_c + _bcast(w) * (x0_c - x0_u)
        eps_g = eps_c + _bcast(w) * (eps_c - eps_u)
        z_end = _bcast(a_end).sqrt() * x0 + _bcast(1 - a_end).sqrt() * eps_g
        net = target if target is not None else student
        eps_t = net(z_end, t_end, timestep_cond=w_emb, encoder_hidden_states=cond).sample.float()
        tgt = _bcast(skip_e) * z_end + _bcast(out_e) * predicted_x0(eps_t, z_end, a_end)
    return (((pred - tgt) ** 2 + HUBER_C**2).sqrt() - HUBER_C).mean()  # pseudo-Huber


def make_student(teacher_unet, time_cond_proj_dim: int):
    """The teacher's UNet plus a zero-initialised w-embedding projection."""
    import torch
    from diffusers import UNet2DConditionModel

    config = dict(teacher_unet.config)
    config["time_cond_proj_dim"] = time_cond_proj_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise RuntimeError(f"student init: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def load_teacher(folder: str):
    import torch
    from diffusers import StableDiffusionPipeline

    path = Path(folder)
    if not (path / "model_index.json").exists():
        raise UserError(f"--teacher {folder}: not a diffusers pipeline folder (no model_index.json)", field="teacher")
    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    if pipe.unet.config.get("time_cond_proj_dim") is not None:
        raise UserError(f"--teacher {folder}: already has a w-embedding (a distilled LCM); give the original "
                        "diffusion model", field="teacher")
    return pipe


def check_device(device: str) -> None:
    """``--device``: cpu, or cuda when torch sees a CUDA device (a clear error otherwise)."""
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: use cpu or cuda", field="device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here (a CPU build of torch, or no GPU); "
                            "use --device cpu", field="device")


def lora_exclusions(unet, cfg: DistillConfig) -> str | None:
    """peft's ``exclude_modules`` (a regular expression matched against whole module names) for
    ``cfg.lora_exclude``: each named module and everything inside it; each must be one of the UNet's modules."""
    import re

    if not cfg.lora_exclude:
        return None
    names = {name for name, _ in unet.named_modules()}
    for module in cfg.lora_exclude:
        if module not in names:
            raise UserError(f"--lora-exclude {module}: the UNet has no module of that name (e.g. up_blocks.2, "
                            "down_blocks.0.attentions.1)", field="lora_exclude")
    return "|".join(rf"{re.escape(module)}(\..*)?" for module in cfg.lora_exclude)


def _validate(cfg: DistillConfig) -> None:
    check_device(cfg.device)
    if cfg.lora_exclude and not cfg.lora:
        raise UserError(f"--lora-exclude {cfg.lora_exclude[0]}: applies to an LCM-LoRA; add --lora", field="lora_exclude")
    if cfg.max_train_steps < 1:
        raise UserError(f"--max-train-steps {cfg.max_train_steps}: must be at least 1", field="max_train_steps")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: must be at least 1", field="batch_size")
    if not cfg.learning_rate > 0:
        raise UserError(f"--learning-rate {cfg.learning_rate}: must be positive", field="learning_rate")
    if not 0 <= cfg.w_min <= cfg.w_max:
        raise UserError(f"--w-min {cfg.w_min} --w-max {cfg.w_max}: need 0 <= w_min <= w_max "
                        "(w = guidance_scale - 1)", field="w_min")
    if not (1 <= cfg.skip <= 500 and 1000 % cfg.skip == 0):
        raise UserError(f"skip {cfg.skip}: must divide 1000 (20 gives the 50-step DDIM grid)", field="skip")


def distill(cfg: DistillConfig, log=print) -> Path:
    """Run distillation; returns the output folder (a LatentConsistencyModelPipeline, or a LoRA folder)."""
    import torch
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from tqdm import tqdm

    from lcm_live.training.checkpoint import load_checkpoint, save_checkpoint
    from lcm_live.training.data import make_pool
    from lcm_live.training.teacher import ema_update
    from lcm_live.training.text import tokenize

    _validate(cfg)
    out = Path(cfg.output)
    ckpt = out / "checkpoint"
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise UserError(f"--output {out}: exists and is not empty; pass --resume to continue it or pick a new folder",
                        field="output")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    pipe = load_teacher(cfg.teacher).to(device)
    teacher, vae, text_encoder, tokenizer = pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer
    for m in (teacher, vae, text_encoder):
        m.requires_grad_(False)
    alphas = pipe.scheduler.alphas_cumprod.float() if hasattr(pipe.scheduler, "alphas_cumprod") else None
    if alphas is None or len(alphas) != 1000:
        from lcm_live.training.teacher import noise_scheduler

        alphas = noise_scheduler().alphas_cumprod.float()
    alphas = alphas.to(device)
    if cfg.lora:
        from peft import LoraConfig

        student = copy.deepcopy(teacher)
        student.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS, exclude_modules=lora_exclusions(student, cfg)))
        target = None  # stop-gradient on the student itself
        trainable = [p for p in student.parameters() if p.requires_grad]
    else:
        student = make_student(teacher, cfg.time_cond_proj_dim).to(device)
        student.requires_grad_(True)
        target = copy.deepcopy(student).eval().requires_grad_(False)
        trainable = list(student.parameters())
    student.train()
    opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(100, cfg.max_train_steps // 10),
                                            num_training_steps=cfg.max_train_steps)
    modules = {"student": student} | ({"target": target} if target is not None else {})
    start = 0
    if cfg.resume and (ckpt / "state.json").exists():
        start = load_checkpoint(ckpt, modules, opt)["step"]
        for _ in range(start):
            sched.step()
        log(f"distill: resumed at step {start}")
    resolution = teacher.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    pool = make_pool(vae, cfg.data, n_shapes=cfg.pool_size, resolution=resolution, seed=cfg.seed + 2)
    log(f"distill: {'LoRA' if cfg.lora else 'full'} student, {sum(p.numel() for p in trainable) / 1e6:.2f}M "
        f"trainable params, {len(pool)} training latents")
    with torch.no_grad():
        empty = text_encoder(tokenize(tokenizer, [""]).to(device)).last_hidden_state  # (1, L, D)
    n_grid = 1000 // cfg.skip
    grid = torch.arange(1, n_grid + 1) * cfg.skip - 1  # 19, 39, ..., 999
    rng = np.random.default_rng(cfg.seed * 104729 + start)
    gen = torch.Generator().manual_seed(cfg.seed * 104729 + start)
    bar = tqdm(range(start, cfg.max_train_steps), desc="distill", dynamic_ncols=True, initial=start,
               total=cfg.max_train_steps)
    for step in bar:
        latents, captions = pool.batch(rng, cfg.batch_size, gen)
        b = latents.shape[0]
        with torch.no_grad():
            cond = text_encoder(tokenize(tokenizer, captions).to(device)).last_hidden_state
        idx = torch.randint(0, n_grid, (b,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=gen)
        latents, noise, w = latents.to(device), noise.to(device), w.to(device)
        loss = lcd_loss(student, target, teacher, latents, noise, cond, empty, grid[idx].to(device), w, alphas,
                        skip=cfg.skip, w_dim=None if cfg.lora else cfg.time_cond_proj_dim, bf16=cfg.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if target is not None:
            ema_update(target, student, cfg.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.max_train_steps:
            save_checkpoint(ckpt, modules, opt, {"step": done, "config": asdict(cfg)})
    pipe.to("cpu")
    _save(out, cfg, pipe, (target if target is not None else student).to("cpu"))
    return out


def lora_layers(unet) -> dict:
    """The UNet's peft adapters, keys in peft's form (``...conv1.lora_A.weight``), as ``save_lora_weights`` takes
    them and ``load_lora_weights`` reads them back whole.

    Not ``convert_state_dict_to_diffusers``: it renames only the attention layers (``to_k.lora.down.weight``)
    and leaves convolutions in peft's form; ``load_lora_weights`` judges the format by the file's first key
    (a convolution's ``lora_A``) and then silently drops every attention layer, which is what happened to
    the first LoRA family (issue 18, docs/builtin-model.md).
    """
    from peft.utils import get_peft_model_state_dict

    return {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def _save(out: Path, cfg: DistillConfig, pipe, unet) -> None:
    """Write the final model next to the checkpoint (which stays, for --resume with more steps)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    unet = unet.eval()
    if cfg.lora:
        LatentConsistencyModelPipeline.save_lora_weights(out, unet_lora_layers=lora_layers(unet),
                                                         safe_serialization=True)
    else:
        scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 timestep_spacing="leading", set_alpha_to_one=False, original_inference_steps=50,
                                 steps_offset=1)
        lcm = LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
        lcm.save_pretrained(out, safe_serialization=True)
    (out / "distill_config.json").write_text(json.dumps(_portable(asdict(cfg)), indent=2))


def _portable(config: dict) -> dict:
    """The run's config as it is saved beside the model: paths under the working folder made relative to it (a
    shipped model must not carry the build machine's folders)."""
    here = Path.cwd().resolve()
    out = {}
    for key, value in config.items():
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(here):
            value = str(Path(value).resolve().relative_to(here))
        out[key] = value
    return out
