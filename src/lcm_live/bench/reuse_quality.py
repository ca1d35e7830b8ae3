"""The quality cost of feature reuse and token merging on a real architecture with random weights: the cosine of
the final latents against the exact path, same seeds, same inputs (issue 17; the builtin:shapes side is
``lcm-live eval --feature-reuse K`` / ``--token-merging R``).

``python -m lcm_live.bench.reuse_quality [--arch sd15 | --model builtin:shapes] [--size 256] [--json FILE]``:

1. The engine as ``bench`` builds it (bench_engine.build_fast_engine; or a trained model, ``--model``, loaded
   as ``generate`` loads it), on the torch backend in float32 so that the exact path and each variant differ only
   by the speed-up; the UNet wrapped for feature reuse, whose policy is swapped per variant (K = 1: exact).
2. Text-to-image, 4 steps (reuse between steps): each K, and token merging R, against the exact path.
3. Live sketch: 8 consecutive image-to-image frames of a growing stroke (bench_live's canvases, 1 step at strength
   0.5, one UNet evaluation a frame, the studio's live mode): reuse between frames, each frame against the exact
   path's frame; the mean and the worst.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

FRAMES = 8


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _latents(engine: Any, **request: Any) -> torch.Tensor:
    from lcm_live.engine.request import GenerationRequest

    return engine.generate(GenerationRequest(output_type="latent", **request)).images[0]


def run_quality(arch: str = "sd15", size: int = 256, ks: tuple[int, ...] = (2, 3, 4),
                ratios: tuple[float, ...] = (0.3, 0.5), model: str | None = None, log=print) -> dict[str, Any]:
    import io

    import tomesd
    from PIL import Image
    from tqdm import tqdm

    from lcm_live.bench.bench_engine import BenchConfig, build_fast_engine, quiet_diffusers
    from lcm_live.bench.bench_live import stroke_canvas, stroke_point
    from lcm_live.bench.measure import current_load
    from lcm_live.engine.feature_reuse import FeatureReuse
    from lcm_live.engine.tome import apply_token_merging

    # 1. The engine, its UNet wrapped (feature_reuse=2 here; the policy is replaced per variant below).
    quiet_diffusers()
    config = BenchConfig(arch=arch, width=size, height=size, backend="torch", dtype="float32", device="cpu",
                         baseline=None, feature_reuse=2)
    prompt, guidance = config.prompt, config.guidance_scale
    if model is None:
        engine, _ = build_fast_engine(config, torch.device("cpu"), torch.float32)
    else:
        from lcm_live.config import EngineSettings
        from lcm_live.engine.pipeline import Engine

        engine = Engine.from_settings(EngineSettings(model=model, device="cpu", dtype="float32", backend="torch",
                                                     feature_reuse=2), progress=False)
        prompt, guidance, arch = "a red circle on a blue background", None, model
    wrapper = engine.pipe.unet
    txt = {"prompt": prompt, "num_inference_steps": 4, "guidance_scale": guidance, "seed": 0,
           "width": size, "height": size}
    points = [stroke_point(i, size, size) for i in range(FRAMES + 1)]
    canvases = [Image.open(io.BytesIO(stroke_canvas(size, size, points[:i + 2]))).convert("RGB")
                for i in range(FRAMES)]
    live = {"prompt": prompt, "num_inference_steps": 1, "guidance_scale": 8.0, "strength": 0.5, "seed": 1,
            "width": size, "height": size}

    def variant(reuse_k: int, ratio: float = 0.0, across_steps: bool = False) -> dict[str, Any]:
        tomesd.remove_patch(wrapper.unet)
        if ratio:
            apply_token_merging(wrapper.unet, ratio)
        wrapper.reuse = FeatureReuse(reuse_k, across_steps=across_steps)
        out = {"txt2img": _latents(engine, **txt)}
        wrapper.reuse = FeatureReuse(reuse_k, across_steps=across_steps)  # the live sequence starts afresh
        out["frames"] = [_latents(engine, image=c, **live) for c in canvases]
        out["stats"] = wrapper.reuse.stats()
        return out

    # 2-3. The exact path, then each variant against it.
    t0 = time.perf_counter()
    names = [("exact", 1, 0.0, False)] + [(f"feature_reuse {k}", k, 0.0, False) for k in ks] + \
            [(f"feature_reuse {k} across steps", k, 0.0, True) for k in ks[:1]] + \
            [(f"token_merging {r:g}", 1, r, False) for r in ratios]
    results: dict[str, Any] = {}
    exact = None
    for name, k, r, across in tqdm(names, desc="variants"):
        out = variant(k, r, across)
        if exact is None:
            exact = out
            continue
        frames = [_cos(a, b) for a, b in zip(out["frames"], exact["frames"], strict=True)]
        results[name] = {"txt2img_4_steps_cosine": _cos(out["txt2img"], exact["txt2img"]),
                         "live_frames_cosine_mean": sum(frames) / len(frames),
                         "live_frames_cosine_min": min(frames), "live_reuse": out["stats"]}
    report = {"arch": arch, "size": size, "backend": "torch", "dtype": "float32", "frames": FRAMES,
              "load_average_1m_end": current_load(), "seconds": time.perf_counter() - t0, "variants": results}
    log(format_quality(report))
    return report


def format_quality(report: dict[str, Any]) -> str:
    weights = "trained weights" if ":" in report["arch"] or "/" in report["arch"] else "random weights"
    lines = [f"cosine of final latents against the exact path: {report['arch']} {report['size']}x{report['size']}, "
             f"{weights}, torch float32; live: {report['frames']} sketch frames, 1 step x strength 0.5",
             "| variant | txt2img 4 steps | live frames mean | live frames worst | live full / reused |",
             "|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        s = r["live_reuse"]
        lines.append(f"| {name} | {r['txt2img_4_steps_cosine']:.4f} | {r['live_frames_cosine_mean']:.4f} | "
                     f"{r['live_frames_cosine_min']:.4f} | {s['full_evaluations']} / {s['reused_evaluations']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", default=None, help="a trained model instead (e.g. builtin:shapes, at --size 64)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = run_quality(args.arch, args.size, model=args.model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
