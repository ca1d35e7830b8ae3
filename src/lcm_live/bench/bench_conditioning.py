"""`lcm-live bench --ip-adapter` / `bench --controlnet A --controlnet B`: what a reference image or several
ControlNets cost a denoising step, on the real architecture with random weights (no download).

1. Build the architecture (sd15: LCM_Dreamshaper_v7's shapes) in float32, cast to the engine's dtype, TAESD as
   decoder, the torch backend (an IP-Adapter runs there: engine/pipeline.py) with the engine's speed-ups
   (``apply_speedups``: channels_last, ...). With ``--ip-adapter``: an IP-Adapter
   of the real shapes (CLIP ViT-H/14's image encoder, the base adapter's projection and ``to_k_ip``/``to_v_ip``
   layers) attached through the engine's own path (engine/ip_adapter.py). With ``--controlnet A --controlnet B``:
   one random ControlNet of the architecture's shape per name (the names only label them).
2. Warm up each variant once (the reference image's embedding is computed there and cached: the timed runs see
   what a live session sees after its first frame).
3. Alternate timed runs: each variant once per round, ``runs`` rounds, the order rotated each round, so that drift
   on a shared machine and whatever the previous call left (caches, the adapter's scale) hit all alike. With
   ``--ip-adapter`` the baseline ``no_adapter`` runs the same UNet with the adapter detached for the call (its
   attention processors swapped for plain ones, no ``encoder_hid_proj``), and ``no_reference`` is a request
   without a reference image with the adapter loaded (scale 0): the two must cost the same.
   A step's cost is the UNet loop's time (the engine's ``timings["unet"]``) over the steps, and, read from the
   step callbacks, this process's CPU time per step after the first (``time.process_time``: all its threads; on a
   machine shared with other work it moves far less than wall time, which waits for the cores).
4. Report medians, each variant's extra cost per step against plain (ms and ratio), the image encoder's one-time
   cost, the machine and the load before and after.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from lcm_live.bench.measure import current_load, describe_machine, summarize, synchronize

# CLIP ViT-H/14 (laion/CLIP-ViT-H-14, the image encoder of h94/IP-Adapter's SD1.5 adapters): the encoder's shape.
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu"}
# A tiny one for the tests (and --arch tiny).
TINY_ENCODER = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                "patch_size": 4, "image_size": 32, "projection_dim": 32}


def random_ip_adapter(unet: Any, encoder_config: dict[str, Any], *, seed: int = 0, std: float = 0.2,
                      dtype: Any = None) -> tuple[Any, dict[str, Any]]:
    """A base IP-Adapter for ``unet`` with random weights: (CLIPVisionModelWithProjection, flat state dict in
    diffusers' format: ``image_proj.proj/norm``, ``ip_adapter.{1,3,...}.to_k_ip/to_v_ip.weight``)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lcm_live.engine.ip_adapter import cross_attention_widths

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection._from_config(CLIPVisionConfig(**encoder_config),
                                                         dtype=dtype or torch.float32).eval()
    width, clip = unet.config.cross_attention_dim, encoder_config["projection_dim"]
    generator = torch.Generator().manual_seed(seed + 1)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype or torch.float32)

    state = {"image_proj.proj.weight": normal(4 * width, clip), "image_proj.proj.bias": normal(4 * width),
             "image_proj.norm.weight": 1 + normal(width), "image_proj.norm.bias": normal(width)}
    for i, hidden in enumerate(cross_attention_widths(unet)):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = normal(hidden, width)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = normal(hidden, width)
    return encoder, state


def save_ip_adapter(folder: Any, encoder: Any, state: dict[str, Any], name: str = "ip-adapter.safetensors") -> Any:
    """h94/IP-Adapter's layout: ``FOLDER/NAME`` and ``FOLDER/image_encoder/``; returns the adapter file's path."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    return folder / name


def reference_image(size: int = 224) -> Any:
    """A fixed reference picture (colours and shapes, so that the encoder sees something)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (200, 120, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size // 5, size // 5, 4 * size // 5, 4 * size // 5], fill=(30, 60, 190))
    draw.rectangle([0, 3 * size // 4, size, size], fill=(20, 160, 70))
    return image


@dataclass
class ConditioningConfig:
    arch: str = "sd15"
    width: int = 256
    height: int = 256
    num_inference_steps: int = 4
    guidance_scale: float | None = None  # None: the full LCM's 8 (w-embedding, one UNet row per image)
    runs: int = 3
    warmup: int = 1
    ip_adapter: bool = False
    controlnets: list[str] = field(default_factory=list)  # labels: one random ControlNet each
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    model_seed: int = 0
    progress: bool = True


def _engine(config: ConditioningConfig, device: Any, dtype: Any) -> tuple[Any, dict[str, float]]:
    """The real Engine on the random architecture, with the variants' extras loaded; setup times (s)."""
    import torch

    from lcm_live.bench.bench_engine import random_controlnet, random_taesd
    from lcm_live.config import EngineSettings
    from lcm_live.engine.architectures import build_pipeline
    from lcm_live.engine.controlnet import combine
    from lcm_live.engine.ip_adapter import attach_ip_adapter
    from lcm_live.engine.memory import release_freed_memory
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.speedups import apply_speedups

    setup = {}
    t0 = time.perf_counter()
    pipe = build_pipeline(config.arch, full_lcm=True, dtype=torch.float32, seed=config.model_seed)
    pipe.to(dtype=dtype)
    pipe.vae = random_taesd(config.arch, dtype, config.model_seed + 10)
    pipe.to(device)
    release_freed_memory()
    setup["pipeline_s"] = time.perf_counter() - t0
    nets = []
    for k, _ in enumerate(config.controlnets):
        nets.append(random_controlnet(pipe.unet, pipe.vae_scale_factor, dtype, device, config.model_seed + 20 + k))
    name = None
    if config.ip_adapter:
        t0 = time.perf_counter()
        encoder_config = TINY_ENCODER if config.arch == "tiny" else VIT_H
        encoder, state = random_ip_adapter(pipe.unet, encoder_config, seed=config.model_seed + 30, dtype=dtype)
        attach_ip_adapter(pipe, encoder, state, dtype=dtype, device=device)
        release_freed_memory()
        setup["ip_adapter_s"] = time.perf_counter() - t0
        name = "bench:random-ip-adapter"
    settings = EngineSettings(model=f"bench:{config.arch}-random-{config.model_seed}", device=device.type,
                              dtype=str(dtype).removeprefix("torch."), decoder="taesd", backend="torch",
                              ip_adapter=name, controlnet=list(config.controlnets) or None)
    size = 64 if config.arch == "tiny" else 512
    loaded = LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name=settings.model, native_width=size,
                         native_height=size, controlnet=combine(nets) if nets else None,
                         controlnet_name=" + ".join(config.controlnets) or None,
                         controlnet_names=list(config.controlnets), ip_adapter_name=name)
    applied = apply_speedups(pipe, settings, device, dtype)  # channels_last etc., as generate/serve apply them
    return Engine(loaded, settings, device, dtype, speedups=applied), setup


@contextmanager
def adapter_detached(engine: Any) -> Iterator[None]:
    """The engine's UNet as without the IP-Adapter for the duration: plain attention processors, no image
    projection (the engine still passes image embeddings, which such a UNet ignores)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = engine.pipe.unet
    processors, projection = dict(unet.attn_processors), unet.encoder_hid_proj
    kind = unet.config.encoder_hid_dim_type
    unet.set_attn_processor({name: AttnProcessor2_0() for name in processors})
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    try:
        yield
    finally:
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projection
        unet.register_to_config(encoder_hid_dim_type=kind)
        engine.ip_embeddings.scale = None  # what was set meanwhile went to the plain processors


def _variants(config: ConditioningConfig) -> dict[str, dict[str, Any]]:
    """Request extras per variant: plain, and what the flags asked for (``no_adapter`` is plain with the
    IP-Adapter detached, see ``adapter_detached``)."""
    from lcm_live.bench.bench_engine import control_lines

    out: dict[str, dict[str, Any]] = {"plain": {}}
    n = len(config.controlnets)
    if config.ip_adapter:
        out = {"no_adapter": {}, "no_reference": {}, "ip_adapter": {"ip_adapter_image": reference_image()}}
    if n:
        lines = control_lines(config.width, config.height)
        out[f"controlnet_x{n}"] = {"control_image": [lines] * n if n > 1 else lines}
        if n > 1:  # the second and later nets only in the first half of the steps: what start/end saves
            out[f"controlnet_x{n}_end_0.5"] = {"control_image": [lines] * n,
                                               "control_guidance_end": [1.0] + [0.5] * (n - 1)}
    return out


def run_conditioning_bench(config: ConditioningConfig) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from lcm_live.engine.devices import resolve_device, resolve_dtype
    from lcm_live.engine.request import GenerationRequest

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device).dtype
    machine = describe_machine(device)
    engine, setup = _engine(config, device, dtype)
    variants = _variants(config)

    def request(extra: dict[str, Any]) -> GenerationRequest:
        return GenerationRequest(prompt="a lighthouse on a cliff at dusk", seed=config.seed, width=config.width,
                                 height=config.height, num_inference_steps=config.num_inference_steps,
                                 guidance_scale=config.guidance_scale, **extra)

    encoder_s = None
    if config.ip_adapter:  # the reference image's embedding, once (then cached by its pixels)
        t0 = time.perf_counter()
        engine.ip_embeddings(reference_image())
        synchronize(device)
        encoder_s = time.perf_counter() - t0
    def generate(name: str, **kwargs: Any) -> Any:
        with adapter_detached(engine) if name == "no_adapter" else nullcontext():
            return engine.generate(request(variants[name]), **kwargs)

    for name in variants:
        for _ in range(config.warmup):
            generate(name)
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    cpu_per_step: dict[str, list[float]] = {name: [] for name in variants}
    totals: dict[str, list[float]] = {name: [] for name in variants}
    with tqdm(total=config.runs * len(variants), desc="conditioning bench", unit="run",
              disable=not config.progress) as bar:
        names = list(variants)
        for round_ in range(config.runs):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotated each round
                marks: list[float] = []
                result = generate(name, callback=lambda event, m=marks: m.append(time.process_time()))
                synchronize(device)
                if len(marks) > 1:  # the steps after the first (the first also encodes the prompt)
                    cpu_per_step[name].append((marks[-1] - marks[0]) / (len(marks) - 1))
                per_step[name].append(result.timings["unet"] / config.num_inference_steps)
                totals[name].append(result.timings["total"])
                bar.update(1)
    base = next(iter(variants))  # plain, or no_adapter
    plain = summarize(per_step[base])["median"]
    plain_cpu = summarize(cpu_per_step[base])["median"] if cpu_per_step[base] else None
    report = {
        "config": asdict(config), "machine": machine, "load_after": current_load(), "setup": setup,
        "dtype": str(dtype).removeprefix("torch."), "backend": "torch", "speedups": list(engine.info.speedups),
        "image_encoder_once_s": encoder_s,
        "embedding_cache": None if engine.ip_embeddings is None else {"hits": engine.ip_embeddings.hits,
                                                                      "misses": engine.ip_embeddings.misses},
        "baseline": base, "variants": {},
    }
    for name in variants:
        step = summarize(per_step[name])
        report["variants"][name] = {"per_step_s": step, "total_s": summarize(totals[name]),
                                    "extra_per_step_ms": (step["median"] - plain) * 1e3,
                                    "ratio_to_plain": step["median"] / plain if plain > 0 else None}
        if plain_cpu:
            cpu = summarize(cpu_per_step[name])
            report["variants"][name].update(cpu_per_step_s=cpu, cpu_ratio_to_plain=cpu["median"] / plain_cpu)
    return report


def format_conditioning(report: dict[str, Any]) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"conditioning bench: {c['arch']} {c['width']}x{c['height']}, {c['num_inference_steps']} steps, "
             f"{report['dtype']} torch ({', '.join(report['speedups'])}), {m.get('cpu') or m.get('gpu') or ''}",
             f"load before {m.get('load_average_1m')}, after {report['load_after']} ({m.get('started_utc')})"]
    if report["image_encoder_once_s"] is not None:
        lines.append(f"image encoder (once per reference image, then cached): {report['image_encoder_once_s']:.2f} s")
    for name, v in report["variants"].items():
        lines.append(f"  {name:<24} {v['per_step_s']['median'] * 1e3:8.0f} ms/step (spread "
                     f"{v['per_step_s']['spread']:.0%}), +{v['extra_per_step_ms']:.0f} ms, "
                     f"x{v['ratio_to_plain']:.2f} of {report['baseline']}"
                     + (f"; CPU {v['cpu_per_step_s']['median'] * 1e3:.0f} ms/step (spread "
                        f"{v['cpu_per_step_s']['spread']:.0%}), x{v['cpu_ratio_to_plain']:.2f}"
                        if "cpu_per_step_s" in v else ""))
    return "\n".join(lines)
