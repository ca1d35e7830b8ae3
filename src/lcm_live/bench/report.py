"""`lcm-live bench`'s report: the human-readable lines and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_live.bench.roofline import format_roofline


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines; they end with ``roofline_fraction: X``, then ``parity_cosine: X`` and
    ``speedup_vs_seed: X`` when a baseline ran."""
    c = report["config"]
    m = report["machine"]
    batch = int(c.get("batch_size", 1))
    lines = [
        f"arch {c['arch']}  {c['width']}x{c['height']}  {c['num_inference_steps']} steps  "
        f"guidance {c['guidance_scale']}  runs {c['runs']} (+{c['warmup']} warm-up)"
        + (f"  batch {batch} images per call" if batch > 1 else ""),
        f"device {report['device']} ({m.get('gpu') or m['cpu']}, {m['torch_threads']} threads)  "
        f"torch {m['torch']}  diffusers {m['diffusers']}  openvino {m.get('openvino')}",
    ]
    for key, label in (("seed", "seed (StableDiffusionPipeline + LCMScheduler)"), ("lcm_live", "lcm-live")):
        r = report.get(key)
        if r is None:
            continue
        t, s = r["ms_per_image"], r["stages_ms"]
        extra = f"  speedups {','.join(r['speedups'])}  decoder {r['decoder']}" if key == "lcm_live" else \
            f"  decoder {r['decoder']}"
        lines.append(f"{label}: dtype {r['dtype']}{extra}")
        if batch > 1:
            call = r["ms_per_call"]
            lines.append(f"  ms per call ({batch} images): median {call['median']:.0f}  min {call['min']:.0f}  max "
                         f"{call['max']:.0f}  spread {call['spread'] * 100:.1f}%  = {t['median']:.0f} ms per image, "
                         f"{r['images_per_s']:.2f} images/s")
        else:
            lines.append(f"  ms per image: median {t['median']:.0f}  min {t['min']:.0f}  max {t['max']:.0f}  "
                         f"spread {t['spread'] * 100:.1f}%  ({r['images_per_s']:.2f} images/s)")
        lines.append(f"  stages (median ms): text encoder {s['text_encoder']:.1f}  unet/step {s['unet_per_step']:.0f} "
                     f"(x{r['unet_calls_per_call']} calls)  decode {s['decode']:.0f}  other {s['other']:.0f}"
                     + (f"  controlnet/step {s['controlnet_per_step']:.0f}" if "controlnet_per_step" in s else ""))
        mem = f"  peak RSS {r['peak_rss_gb']:.2f} GB"
        if key == "lcm_live":
            mem += f" (alone: {report['lcm_live_alone_peak_rss_gb']:.2f} GB"
            if "lcm_live_warmup_peak_rss_gb" in report:
                mem += f"; during warm-up: {report['lcm_live_warmup_peak_rss_gb']:.2f} GB"
            mem += ")"
        if "peak_cuda_gb" in r:
            mem += f"  peak CUDA {r['peak_cuda_gb']:.2f} GB"
            if key == "lcm_live" and "lcm_live_alone_peak_cuda_gb" in report:
                mem += f" (alone: {report['lcm_live_alone_peak_cuda_gb']:.2f} GB)"
        lines.append(mem)
        if "roofline" in r:
            lines.append(format_roofline("", r["roofline"], batch))
    lines.append(f"lcm-live setup {report['lcm_live_setup_s']:.1f} s, warm-up {report['lcm_live_warmup_s']:.1f} s")
    if "profile" in report:
        from lcm_live.bench.profile import format_profile

        lines += format_profile(report["profile"])
    if "roofline_fraction" in report:
        lines.append(f"roofline_fraction: {report['roofline_fraction']:.2f}")
    if "parity_cosine" in report:
        lines.append(f"parity_cosine: {report['parity_cosine']:.5f}")
        lines.append(f"speedup_vs_seed: {report['speedup_vs_seed']:.2f}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)
