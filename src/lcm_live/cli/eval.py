"""`lcm-live eval`: colour, shape and background accuracy of a shapes LCM (and its teacher) at 1-8 steps."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score a shapes model with the analytic checker",
        description="Samples a fixed, balanced set of prompt/seed pairs and reads colour, shape, size and "
                    "background back from the pixels. LCM rows at each step count; with --teacher also the "
                    "teacher under DDIM and DPM-Solver++ at the same step counts and guidance.")
    p.add_argument("--task", default="model", choices=["model", "lora", "inpaint", "regions"],
                   help="model: score --model (default); lora: the shipped LCM-LoRA family at each step count "
                        "(base + LCM-LoRA, the outline fine-tune + LCM-LoRA, + outline LoRA, the fine-tune under "
                        "DDIM / DPM-Solver++, the full LCM; docs/builtin-model.md); inpaint, regions: --model "
                        "(default builtin:shapes) with a mask or two region prompts (training/eval_masks.py)")
    p.add_argument("--model", default=None,
                   help="LCM folder, builtin:NAME, or an LCM-LoRA folder (then --teacher is its base); "
                        "required for --task model")
    p.add_argument("--teacher", default=None, help="teacher folder or builtin:NAME (default: none; "
                                                   "builtin:shapes-teacher for builtin:shapes)")
    p.add_argument("--guidance-scale", type=float, default=8.0)
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=96, help="prompt/seed pairs (default 96, balanced)")
    p.add_argument("--seed", type=int, default=0,
                   help="--task model|lora: pair i samples with seed SEED + i (default 0: the fixed pairs; another "
                        "value gives held-out seeds for the same captions, e.g. to choose a recipe on)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--grid", default=None, metavar="FILE", help="--task lora: also save a sample grid (PNG)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to sample (default: cpu)")
    p.add_argument("--feature-reuse", type=int, default=1, metavar="K",
                   help="--task model: the LCM's UNet recomputes its deep blocks every K evaluations (1: off)")
    p.add_argument("--feature-reuse-across-steps", action="store_true",
                   help="with --feature-reuse: reuse between the steps of each generation (DeepCache's own)")
    p.add_argument("--token-merging", type=float, default=0.0, metavar="RATIO",
                   help="--task model: ToMe for SD in the LCM's highest-resolution attention (0: off)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lcm_live.errors import UserError
    from lcm_live.training.eval import resolve_model, run_eval

    try:
        steps = tuple(int(s) for s in args.steps.split(","))
    except ValueError:
        raise UserError(f"--steps {args.steps!r}: give comma-separated integers, e.g. 1,2,4,8",
                        field="num_inference_steps") from None
    if any(s < 1 for s in steps):
        raise UserError(f"--steps {args.steps!r}: each step count must be at least 1", field="num_inference_steps")
    from lcm_live.training.distill import check_device

    check_device(args.device)
    if args.feature_reuse < 1 or not 0 <= args.token_merging <= 0.75:
        raise UserError(f"--feature-reuse {args.feature_reuse} --token-merging {args.token_merging}: K is 1 (off) or "
                        "more, RATIO in [0, 0.75] (0: off)", field="feature_reuse")
    if args.pairs < 1:
        raise UserError(f"--pairs {args.pairs}: must be at least 1", field="pairs")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be 0 or more", field="seed")
    if args.seed and args.task in ("inpaint", "regions"):
        raise UserError(f"--seed {args.seed}: --task {args.task} uses its fixed cases' seeds; leave --seed off",
                        field="seed")
    if args.task == "lora":
        from lcm_live.training.eval_lora import LoraModels, run_lora_eval

        run_lora_eval(LoraModels.builtin(), steps=steps, n=args.pairs, json_path=args.json, grid_path=args.grid,
                      seed=args.seed, device=args.device)
        return 0
    if args.task in ("inpaint", "regions"):
        from lcm_live.training.eval_masks import run_mask_eval

        run_mask_eval(args.task, args.model or "builtin:shapes", steps=steps, n=args.pairs, json_path=args.json,
                      device=args.device)
        return 0
    if args.model is None:
        raise UserError("--model is required (an LCM folder or builtin:NAME), or pass --task lora", field="model")
    teacher = args.teacher
    if teacher is None and args.model == "builtin:shapes":
        teacher = "builtin:shapes-teacher"
    run_eval(resolve_model(args.model), teacher=resolve_model(teacher) if teacher else None,
             guidance=args.guidance_scale, steps=steps, n=args.pairs, json_path=args.json, seed=args.seed,
             device=args.device, feature_reuse=args.feature_reuse, token_merging=args.token_merging,
             feature_reuse_across_steps=args.feature_reuse_across_steps)
    return 0
