"""A style LoRA's slider on the OpenVINO UNet (engine/openvino_lora.py): the step with the style fused against
the step with its branch unfused (scale as an input), and what a slider move costs.

    python -m lcm_live.bench.bench_style_lora [--arch sd15|tiny] [--size 256] [--rank 16] [--runs 5]

Random weights (the UNet of ``bench_unet``: its cached IR is reused), bf16, one UNet call per step, batch 1; a
random LoRA of ``--rank`` on every attention projection (to_q, to_k, to_v, to_out.0: what most style LoRAs train).
Prints median (min-max) seconds per step and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _steps(unet, inputs: dict, runs: int) -> list[float]:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(runs):
            t0 = time.perf_counter()
            unet(**inputs)
            times.append(time.perf_counter() - t0)
    return times


def _text(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})"


def main(argv: list[str] | None = None) -> None:
    import torch

    from lcm_live.bench.bench_engine import quiet_diffusers
    from lcm_live.engine.architectures import build_pipeline, build_text_encoder, build_unet
    from lcm_live.engine.openvino_backend import OpenVINOUNet
    from lcm_live.engine.openvino_lora import OpenVINOStyles
    from lcm_live.engine.tiny import save_tiny_lora

    parser = argparse.ArgumentParser(prog="python -m lcm_live.bench.bench_style_lora")
    parser.add_argument("--arch", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--rank", type=int, default=16, help="the random style LoRA's rank")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    quiet_diffusers()
    dtype = torch.bfloat16
    load_at_start = os.getloadavg()[0]

    # 1. The pipeline OpenVINOStyles loads into: the bench UNet (bench_unet's weights and IR name) and a text encoder.
    if args.arch == "tiny":
        pipe = build_pipeline("tiny")
        hidden, cond = 32, 32
    else:
        from diffusers import LatentConsistencyModelPipeline

        pipe = LatentConsistencyModelPipeline(vae=None, text_encoder=build_text_encoder("sd15", dtype=dtype, seed=2),
                                              tokenizer=None, unet=build_unet("sd15", dtype=torch.float32, seed=0),
                                              scheduler=None, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
        hidden, cond = 768, 256
    unet = pipe.unet.to(dtype).to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        lora = save_tiny_lora(Path(tmp) / "style.safetensors", unet, rank=args.rank, seed=7, std=0.02)
        pipe.unet = OpenVINOUNet(unet, model_name=f"bench:{args.arch}-random-0", precision="bfloat16")
        styles = OpenVINOStyles(pipe, [("style", str(lora), 1.0)], cache_dir=None, model_name=args.arch)
        latent = args.size // 8
        inputs = dict(sample=torch.randn(1, 4, latent, latent, dtype=dtype), timestep=torch.tensor(999),
                      encoder_hidden_states=torch.randn(1, 77, hidden, dtype=dtype),
                      timestep_cond=torch.randn(1, cond, dtype=dtype))

        # 2. The fused IR (the default scale), warm.
        _steps(pipe.unet, inputs, 1)
        # 3. The first move: the styles load, the branch graph converts and compiles (once per shape).
        t0 = time.perf_counter()
        styles.set({"style": 0.5})
        _steps(pipe.unet, inputs, 1)
        first_move = time.perf_counter() - t0
        conversions = pipe.unet.conversions
        # 4. Alternating, so that the load's drift falls on both: the default (fused IR) and a moved scale (the
        #    branch graph), each after a set() that only changes which graph runs and its input.
        fused: list[float] = []
        branch: list[float] = []
        moves: list[float] = []
        for k in range(args.runs):
            for scale, times in ((1.0, fused), (0.6 + 0.1 * k, branch)):
                t0 = time.perf_counter()
                styles.set({"style": scale})
                moves.append(time.perf_counter() - t0)
                times.extend(_steps(pipe.unet, inputs, 1))
    assert pipe.unet.conversions == conversions  # no conversion after the first move
    ratios = [b / f for f, b in zip(fused, branch, strict=True)]
    report = {"arch": args.arch, "size": args.size, "rank": args.rank, "dtype": "bfloat16",
              "fused_step_s": statistics.median(fused), "branch_step_s": statistics.median(branch),
              "branch_over_fused": statistics.median(ratios), "first_move_s": first_move,
              "move_set_s": statistics.median(moves), "conversions": conversions,
              "load": [load_at_start, os.getloadavg()[0]], "cpus": os.cpu_count()}
    print(f"{args.arch} {args.size}x{args.size} bf16, style LoRA rank {args.rank} on attention projections:")
    print(f"  fused (default scale)  {_text(fused)} per step")
    print(f"  branch (scale input)   {_text(branch)} per step (median of paired ratios "
          f"{report['branch_over_fused']:.3f})")
    print(f"  first move: {first_move:.1f} s (load the style, convert and compile the branch graph, one step)")
    print(f"  later moves: set() {1000 * report['move_set_s']:.2f} ms, no conversion or compile")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
