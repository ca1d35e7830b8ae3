"""One UNet step, torch against OpenVINO, alternating in one process; and the machine's GEMM throughput.

    python -m lcm_live.bench.bench_unet [--arch sd15] [--sizes 512 256] [--runs 3] [--gemm]

The sd15 UNet (random weights, bf16, channels_last) is called directly with fixed inputs; the OpenVINO module is
built from the same weights (its IR read from the disk cache when `lcm-live bench` made one). Prints median
(min-max) seconds per call. ``--gemm`` first measures the machine's GEMM peak (bench/roofline.py) in torch
float32/bfloat16 and OpenVINO bfloat16/int8: the ceiling a UNet step can approach on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    import torch

    from lcm_live.bench.bench_engine import quiet_diffusers
    from lcm_live.engine.architectures import build_unet
    from lcm_live.engine.openvino_backend import OpenVINOUNet

    parser = argparse.ArgumentParser(prog="python -m lcm_live.bench.bench_unet")
    parser.add_argument("--arch", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="image sizes in pixels")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gemm", action="store_true")
    args = parser.parse_args(argv)
    quiet_diffusers()
    if args.gemm:
        from lcm_live.bench.roofline import measure_peak

        for backend, dtype in (("torch", "float32"), ("torch", "bfloat16"), ("openvino", "bfloat16"),
                               ("openvino", "int8")):
            peak = measure_peak(backend, dtype)
            print(f"gemm {peak.n}x{peak.n} {backend} {dtype}: {peak.tflops:.3f} TFLOP/s "
                  f"(median of rounds {peak.median_tflops:.3f})")

    dtype = torch.bfloat16
    if args.arch == "tiny":
        from lcm_live.engine.architectures import build_pipeline

        unet, hidden, cond = build_pipeline("tiny").unet, 32, 32
    else:
        unet, hidden, cond = build_unet("sd15", dtype=torch.float32, seed=0), 768, 256
    unet = unet.to(dtype).to(memory_format=torch.channels_last)
    # The same name and weights as `lcm-live bench` uses, so its cached IR is found.
    ov = OpenVINOUNet(unet, model_name=f"bench:{args.arch}-random-0", precision="bfloat16", offload_torch_unet=False)
    for size in args.sizes:
        latent = size // 8
        x = torch.randn(1, 4, latent, latent, dtype=dtype).to(memory_format=torch.channels_last)
        text = torch.randn(1, 77, hidden, dtype=dtype)
        w = torch.randn(1, cond, dtype=dtype)
        t = torch.tensor(999)
        times: dict[str, list[float]] = {"torch": [], "openvino": []}
        with torch.no_grad():
            for module in (unet, ov):  # warm-up (OpenVINO: convert or read the cache, compile)
                module(x, t, encoder_hidden_states=text, timestep_cond=w)
            for _ in range(args.runs):
                for name, module in (("torch", unet), ("openvino", ov)):
                    t0 = time.perf_counter()
                    module(x, t, encoder_hidden_states=text, timestep_cond=w)
                    times[name].append(time.perf_counter() - t0)
        summary = "  ".join(f"{k} {statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})" for k, v in times.items())
        print(f"{args.arch} UNet step at {size}x{size}, bf16: {summary}  (OpenVINO conversions: {ov.conversions})")


if __name__ == "__main__":
    main()
