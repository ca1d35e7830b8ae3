"""`lcm-live bench`: lcm-live's fast path against the seed article's code, on the real architectures with random
weights (no download); `--live` measures the studio's sustained frame rate over its WebSocket."""

from __future__ import annotations

import argparse
import sys

from lcm_live.config import COMPILE_MODES
from lcm_live.engine.architectures import ARCHES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use a whole number >= 1")
    return value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark lcm-live against the seed article's code path (random-weight architectures)",
        description="Builds the real SD1.5 (LCM_Dreamshaper_v7 shapes), SDXL or a fast family's architecture with "
                    "random weights and times the seed article's StableDiffusionPipeline + LCMScheduler path against "
                    "lcm-live's fast path, alternating in one process, then measures this machine's GEMM peak in "
                    "each path's backend and dtype. Ends with 'roofline_fraction: X', 'parity_cosine: X' and "
                    "'speedup_vs_seed: X' (with --live: 'roofline_fraction: X', 'live_fps: X').",
    )
    parser.add_argument("--arch", default="sd15", choices=[*ARCHES, "tiny"],
                        help="sd15, sdxl: full LCMs; sd-turbo, sdxl-turbo, sdxs, bk-sdm-tiny, bk-sdm-small: the fast "
                             "families' shapes (configs/README.md), their own steps and guidance; tiny: the test model")
    parser.add_argument("--width", type=int, default=None,
                        help="default: the family's native size (512; sdxl 1024; tiny 64); with --live 256 (sdxl 512)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--num-inference-steps", type=_positive_int, default=None,
                        help="default: the family's (sd15 4, sd-turbo/sdxl-turbo/sdxs 1, bk-sdm 4); with --live: one UNet "
                             "evaluation a frame (a full LCM's img2img runs every step: 1; a plain UNet's "
                             "int(steps x strength): 2 at strength 0.5)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="default: the family's (sd15/sdxl: the seed article's 1.5, with --live 8; turbo and "
                             "sdxs 0, bk-sdm 1: no CFG)")
    parser.add_argument("--baseline", default="seed", choices=["seed", "none"])
    parser.add_argument("--runs", type=_positive_int, default=3, help="timed runs of each path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each path first")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per call on both paths (num_images_per_prompt, one seed; default 1); reports "
                             "ms per call and images/s. With --live: the studio's max_batch_size (frames of several "
                             "sessions in one engine call; default: 1 on a CPU, --sessions on a GPU)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                        help="lcm-live's UNet backend (auto: openvino when installed, on a CPU)")
    parser.add_argument("--decoder", default="taesd", choices=["vae", "taesd"], help="lcm-live's decoder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="lcm-live's dtype (the seed path is float32 on CPU, float16 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile lcm-live's UNet")
    parser.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                        help="with --compile: torch.compile's mode (auto: reduce-overhead on CUDA, default on a CPU)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"])
    parser.add_argument("--quantize-vae", default="none", choices=["none", "int8"],
                        help="int8 for the tiny autoencoder on OpenVINO (see lcm-live generate --help)")
    parser.add_argument("--feature-reuse", type=_positive_int, default=1, metavar="K",
                        help="lcm-live's UNet recomputes its deep blocks every K evaluations (1: off)")
    parser.add_argument("--token-merging", type=float, default=0.0, metavar="RATIO",
                        help="ToMe for SD on lcm-live's UNet: merge this fraction of the top-resolution tokens")
    parser.add_argument("--controlnet", action="append", nargs="?", const="controlnet", default=None,
                        metavar="NAME",
                        help="lcm-live's path with a ControlNet of the architecture's shape (random weights), a line "
                             "drawing as its image (with --baseline none; with --live: the studio's lines mode); "
                             "twice or more (--controlnet A --controlnet B): several nets' cost per step against a "
                             "plain step (bench/bench_conditioning.py)")
    parser.add_argument("--ip-adapter", action="store_true",
                        help="an IP-Adapter of the real shapes (ViT-H image encoder, random weights) and a reference "
                             "image: its cost per step against a plain step (bench/bench_conditioning.py)")
    parser.add_argument("--mask", action="store_true",
                        help="lcm-live alone: img2img frames without a mask, with one over the whole picture and with "
                             "one over the left half; reports each mask's overhead (bench/bench_masks.py)")
    parser.add_argument("--regions", type=_positive_int, default=None, metavar="N",
                        help="lcm-live alone: N region prompts on N vertical stripes against a plain frame; reports "
                             "the UNet time per step against N plain evaluations (bench/bench_masks.py)")
    parser.add_argument("--seed", type=int, default=0, help="the image seed (same noise on both paths)")
    parser.add_argument("--openvino-cache-dir", default=None)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the full report as JSON")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="after the timed runs, one more lcm-live call under torch.profiler: its trace to FILE "
                             "(Chrome trace JSON, for ui.perfetto.dev), top operators and host waits in the report")
    parser.add_argument("--no-progress", action="store_true")
    live = parser.add_argument_group("live (the studio over its WebSocket)")
    live.add_argument("--live", action="store_true", help="measure the studio's sustained fps instead")
    live.add_argument("--seconds", type=float, default=20.0, help="how long to draw (with --live)")
    live.add_argument("--strength", type=float, default=0.5, help="img2img strength of the sketch (with --live)")
    live.add_argument("--broadcast-viewers", type=int, default=0, metavar="N",
                      help="with --live: the first client turns Broadcast on and N MJPEG clients watch it (as OBS)")
    live.add_argument("--typing", action="store_true",
                      help="with --live: the sketch stays and the prompt grows a letter a frame (typing over a sketch)")
    live.add_argument("--sessions", type=_positive_int, default=1,
                      help="WebSocket clients drawing at once (with --live); reports total and per-client fps")
    from lcm_live.bench.bench_scaling import add_arguments as add_scaling_arguments

    add_scaling_arguments(live)  # --workers R / --ray --replicas R: serve's scaling (bench/bench_scaling.py)
    parser.set_defaults(run=run)


def _size(args: argparse.Namespace) -> tuple[int, int]:
    from lcm_live.bench.bench_engine import bench_family

    default = bench_family(args.arch).native_size
    if args.live:
        default = min(default, 256) if args.arch != "sdxl" else 512
    return args.width or default, args.height or default


def _check_output_path(flag: str, value: str | None) -> None:
    """A file the report can be written to: its folder exists or can be made, and it is not a folder."""
    from pathlib import Path

    from lcm_live.errors import UserError

    if not value:
        return
    path = Path(value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {value}: cannot make its folder {path.parent} ({exc.strerror}); pass a file in a "
                        "writable folder", field=flag[2:]) from None
    if path.is_dir():
        raise UserError(f"{flag} {value}: that is a folder; pass a file name, e.g. {path / 'report.json'}",
                        field=flag[2:])


def run(args: argparse.Namespace) -> int:
    from lcm_live.bench import bench_scaling
    from lcm_live.errors import UserError

    scaling = bench_scaling.requested(args)
    if scaling:
        bench_scaling.check(args)

    width, height = _size(args)
    controlnets = args.controlnet or []
    args.controlnet = bool(controlnets)  # one net: the engine bench's ControlNet path
    for name, value in (("--width", width), ("--height", height)):
        if value % 8 or not 64 <= value <= 2048:
            raise UserError(f"{name} {value}: use a multiple of 8 from 64 to 2048", field=name[2:])
    for flag, value in (("--json", args.json), ("--profile", args.profile)):
        _check_output_path(flag, value)  # before minutes of benchmarking, not after
    if args.profile and args.live:
        raise UserError("--profile times one engine call; it does not apply to --live", field="profile")
    if args.sessions != 1 and not args.live:
        raise UserError(f"--sessions {args.sessions}: it counts WebSocket clients of --live; add --live, or use "
                        "--batch-size for several images per call", field="sessions")
    if (args.mask or args.regions) and args.live:
        raise UserError("--mask and --regions time engine calls; they do not apply to --live", field="mask")
    if (args.ip_adapter or len(controlnets) > 1) and args.live:
        raise UserError("--ip-adapter and several --controlnet time engine calls; they do not apply to --live",
                        field="ip_adapter")
    if args.ip_adapter or len(controlnets) > 1:
        from lcm_live.bench.bench_conditioning import (
            ConditioningConfig,
            format_conditioning,
            run_conditioning_bench,
        )

        report = run_conditioning_bench(ConditioningConfig(
            arch=args.arch, width=width, height=height, num_inference_steps=args.num_inference_steps or 4,
            guidance_scale=args.guidance_scale, runs=args.runs, warmup=args.warmup, ip_adapter=args.ip_adapter,
            controlnets=controlnets if len(controlnets) > 1 else [], dtype=args.dtype, device=args.device,
            seed=args.seed, progress=not args.no_progress))
        text = format_conditioning(report)
    elif args.mask or args.regions:
        from lcm_live.bench.bench_engine import BenchConfig
        from lcm_live.bench.bench_masks import format_masks_report, run_masks_bench

        report = run_masks_bench(BenchConfig(
            arch=args.arch, width=width, height=height, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, runs=args.runs, warmup=args.warmup, baseline=None,
            backend=args.backend, decoder=args.decoder, dtype=args.dtype, device=args.device, compile=args.compile,
            compile_mode=args.compile_mode, quantize=args.quantize, quantize_vae=args.quantize_vae, seed=args.seed,
            openvino_cache_dir=args.openvino_cache_dir, progress=False), mask=args.mask, regions=args.regions or 0)
        text = format_masks_report(report)
    elif scaling:
        report = bench_scaling.run_scaling(args)
        text = bench_scaling.format_scaling(report)
    elif args.live:
        from lcm_live.bench.bench_live import LiveConfig, format_live, run_live

        report = run_live(LiveConfig(
            arch=args.arch, width=width, height=height, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, seconds=args.seconds, strength=args.strength, backend=args.backend, decoder=args.decoder,
            dtype=args.dtype, device=args.device, compile=args.compile, compile_mode=args.compile_mode,
            quantize=args.quantize, quantize_vae=args.quantize_vae, openvino_cache_dir=args.openvino_cache_dir, sessions=args.sessions,
            max_batch_size=args.batch_size, controlnet=args.controlnet, feature_reuse=args.feature_reuse,
            token_merging=args.token_merging, typing=args.typing, broadcast_viewers=args.broadcast_viewers))
        text = format_live(report)
    else:
        from lcm_live.bench.bench_engine import BenchConfig, format_report, run_bench

        report = run_bench(BenchConfig(
            arch=args.arch, width=width, height=height, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, runs=args.runs, warmup=args.warmup, batch_size=args.batch_size or 1,
            baseline=None if args.baseline == "none" else args.baseline, backend=args.backend,
            decoder=args.decoder, dtype=args.dtype, device=args.device, compile=args.compile,
            compile_mode=args.compile_mode, quantize=args.quantize, quantize_vae=args.quantize_vae, seed=args.seed, openvino_cache_dir=args.openvino_cache_dir,
            progress=not args.no_progress, profile=args.profile, controlnet=args.controlnet,
            feature_reuse=args.feature_reuse, token_merging=args.token_merging))
        text = format_report(report)
    if args.json:
        from lcm_live.bench.bench_engine import write_json

        write_json(report, args.json)
    print(text)
    sys.stdout.flush()
    return 0
