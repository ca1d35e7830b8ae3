"""`lcm-live distill`: latent consistency distillation from any diffusers SD teacher folder."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="distil a diffusion model into a few-step LCM (or an LCM-LoRA)",
        description="Latent consistency distillation (LCM paper, section 4): the output is a "
                    "LatentConsistencyModelPipeline folder (or, with --lora, pytorch_lora_weights.safetensors) "
                    "that generate and serve load like any LCM. Resumable: --resume continues from the "
                    "output's checkpoint.")
    p.add_argument("--teacher", required=True, help="diffusers StableDiffusionPipeline folder (epsilon prediction)")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (the built-in generator) or a folder of NAME.png + NAME.txt caption pairs")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--lora", action="store_true", help="train an LCM-LoRA instead of a full student")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-exclude", action="append", default=[], metavar="MODULE",
                   help="with --lora: a UNet module left without LoRA layers (repeatable; e.g. up_blocks.2)")
    p.add_argument("--max-train-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--w-min", type=float, default=2.0, help="guidance range, w = guidance_scale - 1 (default 2)")
    p.add_argument("--w-max", type=float, default=12.0, help="(default 12)")
    p.add_argument("--time-cond-proj-dim", type=int, default=64, help="w-embedding width (full student)")
    p.add_argument("--pool-size", type=int, default=8192, help="shapes images encoded once (--data shapes)")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    p.add_argument("--no-bf16", action="store_true", help="float32 instead of bfloat16 autocast")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default: cpu)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lcm_live.training.distill import DistillConfig, distill

    out = distill(DistillConfig(
        teacher=args.teacher, output=args.output, data=args.data, lora=args.lora, lora_rank=args.lora_rank,
        lora_exclude=tuple(args.lora_exclude),
        max_train_steps=args.max_train_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        w_min=args.w_min, w_max=args.w_max, time_cond_proj_dim=args.time_cond_proj_dim,
        checkpoint_every=args.checkpoint_every, pool_size=args.pool_size,
        seed=args.seed, resume=args.resume, bf16=not args.no_bf16, device=args.device))
    print(f"saved {'LCM-LoRA' if args.lora else 'LCM'} to {out}")
    return 0
