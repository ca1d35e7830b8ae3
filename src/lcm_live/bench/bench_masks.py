"""`lcm-live bench --mask` / `--regions N`: what a mask, or N region prompts, cost against the same frame without,
on lcm-live's engine around a real architecture with random weights (bench_engine.build_fast_engine).

- mask: image-to-image frames (the studio's sketch mode) without a mask, with a mask over the whole picture (the
  latent blend and the pixel composite alone: the UNet call is the same) and with a mask over the left half (the
  redraw runs in the mask's window, engine/masks.py ``mask_window``). Overhead = frame time / plain frame time - 1.
- regions: text-to-image with N region prompts on N vertical stripes against a plain frame; the UNet time per
  step against N plain UNet evaluations (the issue's bound: at most N evaluations plus 5%).

Each case warms up (first-call costs, a new shape's kernels), then runs ``runs`` times; the device is synchronised
around every timed call and the median is reported. Writes JSON with ``--json``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from lcm_live.bench.measure import describe_machine, synchronize


class UnetClock:
    """Wall time inside the UNet's forward (synchronised on CUDA), and how many calls, since the last reset."""

    def __init__(self, unet: Any, device: Any):
        self.seconds, self.calls, self.device = 0.0, 0, device
        original = unet.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        unet.forward = forward

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def _stripes(n: int, width: int, height: int) -> list[Any]:
    from PIL import Image

    masks = []
    for k in range(n):
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (k * width // n, 0, (k + 1) * width // n, height))
        masks.append(mask)
    return masks


def _time(engine: Any, request: Any, clock: UnetClock, device: Any, warmup: int, runs: int) -> dict[str, float]:
    for _ in range(warmup):
        engine.generate(request)
    totals, unet, calls = [], [], 0
    for _ in range(runs):
        clock.reset()
        synchronize(device)
        t0 = time.perf_counter()
        engine.generate(request)
        synchronize(device)
        totals.append(time.perf_counter() - t0)
        unet.append(clock.seconds)
        calls = clock.calls
    return {"frame_s": statistics.median(totals), "unet_s": statistics.median(unet), "unet_calls": calls}


def run_masks_bench(config: Any, *, mask: bool, regions: int) -> dict[str, Any]:
    """``config``: a bench_engine.BenchConfig (arch, size, steps, guidance, backend, dtype, device, runs)."""
    from PIL import Image

    from lcm_live.bench.bench_engine import build_fast_engine, quiet_diffusers, resolve_device_dtype
    from lcm_live.bench.random_parts import control_lines
    from lcm_live.engine.request import GenerationRequest, Region

    quiet_diffusers()
    device, dtype = resolve_device_dtype(config)
    engine, speedups = build_fast_engine(config, device, dtype)
    clock = UnetClock(engine.pipe.unet, device)
    w, h = config.width, config.height
    base = dict(prompt=config.prompt, num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale, seed=config.seed, width=w, height=h)
    report: dict[str, Any] = {"machine": describe_machine(device), "arch": config.arch, "width": w, "height": h,
                              "num_inference_steps": config.num_inference_steps, "speedups": speedups, "runs": config.runs}
    cases: dict[str, Any] = {}
    if mask:
        image = control_lines(w, h)
        whole = Image.new("L", (w, h), 255)
        left = Image.new("L", (w, h), 0)
        left.paste(255, (0, 0, w // 2, h))
        img2img = dict(base, image=image, strength=1.0)
        cases["img2img"] = GenerationRequest(**img2img)
        cases["mask_whole"] = GenerationRequest(**img2img, mask_image=whole)
        cases["mask_left_half"] = GenerationRequest(**img2img, mask_image=left)
    if regions:
        cases["txt2img"] = GenerationRequest(**base)
        cases[f"regions_{regions}"] = GenerationRequest(**dict(base, prompt=""), regions=[
            Region(f"{config.prompt}, part {k + 1}", m) for k, m in enumerate(_stripes(regions, w, h))])
    timed = {name: _time(engine, request, clock, device, config.warmup, config.runs)
             for name, request in cases.items()}
    report["cases"] = timed
    if mask:
        plain = timed["img2img"]["frame_s"]
        report["mask_overhead"] = {k: timed[k]["frame_s"] / plain - 1 for k in ("mask_whole", "mask_left_half")}
    if regions:
        steps = config.num_inference_steps
        one_eval = timed["txt2img"]["unet_s"] / max(timed["txt2img"]["unet_calls"], 1)
        per_step = timed[f"regions_{regions}"]["unet_s"] / steps
        report["regions_unet_per_step_vs_n_evaluations"] = per_step / (regions * one_eval)
        report["regions_frame_vs_plain"] = timed[f"regions_{regions}"]["frame_s"] / timed["txt2img"]["frame_s"]
    return report


def format_masks_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"{report['arch']} {report['width']}x{report['height']}, {report['num_inference_steps']} steps, "
             f"{m.get('cpu')} ({m.get('cpu_cores')} cores, {m.get('torch_threads')} threads){', ' + m['gpu'] if m.get('gpu') else ''}; "
             f"{', '.join(report['speedups'])}"]
    for name, t in report["cases"].items():
        lines.append(f"  {name:16s} frame {t['frame_s'] * 1000:8.1f} ms   unet {t['unet_s'] * 1000:8.1f} ms "
                     f"in {t['unet_calls']} calls")
    for name, value in report.get("mask_overhead", {}).items():
        lines.append(f"mask_overhead_{name.removeprefix('mask_')}: {value:+.3f}")
    if "regions_unet_per_step_vs_n_evaluations" in report:
        lines.append(f"regions_unet_per_step_vs_n_evaluations: {report['regions_unet_per_step_vs_n_evaluations']:.3f}")
        lines.append(f"regions_frame_vs_plain: {report['regions_frame_vs_plain']:.3f}")
    return "\n".join(lines)
