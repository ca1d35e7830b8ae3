"""`lcm-live bench`: the seed article's code path against lcm-live's fast path, on the real architectures with
random weights (same shapes, FLOPs and kernels as the released models; no download).

1. Build lcm-live's path: the architecture in float32, cast to the fast dtype (so both paths hold the same
   weights), TAESD (random weights, the taesd config) as decoder, ``apply_speedups``, then the real ``Engine``
   (cached prompt embeddings). Warm it up (OpenVINO converts or reads its cache here) and sample its memory.
2. Build the seed's path: ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) with an
   ``LCMScheduler``, full VAE, float32 on CPU / float16 on CUDA, guidance 1.5. Warm it up.
3. Alternate timed runs (seed, lcm-live, seed, ...) in this one process, same prompt and seed, so drift on a
   shared machine hits both alike. Per-stage times come from timers on the components.
4. Measure the machine's peak in each path's backend and dtype (a GEMM, bench/roofline.py), right after the
   timed runs, and count each path's FLOPs from its components (bench/flops.py).
5. Report medians and spreads, per-stage times, peak memory, the rooflines and the closing lines:
   ``roofline_fraction`` (lcm-live's achieved FLOP/s over its peak), ``parity_cosine`` (lcm-live's final latents
   against the seed path's, run once more untimed from lcm-live's own noise: ``seed_reference``) and
   ``speedup_vs_seed``.

``arch``: sd15 and sdxl are full LCMs (the seed article's guidance 1.5); the fast families (sd-turbo,
sdxl-turbo, sdxs, bk-sdm-tiny/small; engine/architectures.py) run with their own step count and guidance
(no CFG) unless given, on both paths.

``batch_size`` N: both paths make N images per call (``num_images_per_prompt=N``, one seed, so the same noise),
one UNet call per step for all N; the report gives ms per call, ms per image (call / N) and images per second.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from typing import Any

from lcm_live.bench.measure import (
    RssSampler,
    StageTimer,
    current_load,
    describe_machine,
    summarize,
    synchronize,
)
from lcm_live.bench.random_parts import control_lines, random_controlnet, random_taesd
from lcm_live.bench.report import format_report, write_json  # noqa: F401 (their home before report.py)
from lcm_live.bench.seed_path import build_seed_pipeline, seed_reference, seed_run
from lcm_live.errors import UserError

SEED_GUIDANCE = 1.5  # the seed article's value
CONTROLNET_NAME = "bench:random-controlnet"


@dataclass
class BenchConfig:
    arch: str = "sd15"
    width: int = 512
    height: int = 512
    num_inference_steps: int | None = None  # None: the family's (sd15 4, sd-turbo/sdxs 1, ...)
    runs: int = 3
    warmup: int = 1
    batch_size: int = 1  # images per call on both paths (num_images_per_prompt)
    baseline: str | None = "seed"  # "seed", or None: lcm-live only (no speedup, no parity)
    backend: str = "auto"  # auto: openvino when installed (CPU), else torch
    decoder: str = "taesd"
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "auto"
    quantize: str = "none"
    quantize_vae: str = "none"  # --quantize-vae int8: the tiny autoencoder in int8 (OpenVINO)
    guidance_scale: float | None = None  # None: the family's (sd15: the seed article's 1.5; turbo: 0)
    prompt: str = "a watercolor fox in a snowy forest, detailed, soft light"
    seed: int = 0  # the image seed (noise)
    model_seed: int = 0  # the random weights' seed
    openvino_cache_dir: str | None = None
    progress: bool = True
    profile: str | None = None  # a file: one more lcm-live call under torch.profiler (bench/profile.py)
    controlnet: bool = False  # lcm-live's path with a ControlNet of the arch's shape (random weights), lines given
    feature_reuse: int = 1  # --feature-reuse K on lcm-live's path (1: off)
    token_merging: float = 0.0  # --token-merging R on lcm-live's path (0: off)

    def __post_init__(self) -> None:  # the family's step count and guidance where none is given
        f = bench_family(self.arch)
        self.num_inference_steps = self.num_inference_steps or f.num_inference_steps
        self.guidance_scale = f.guidance_scale if self.guidance_scale is None else self.guidance_scale


def bench_family(arch: str) -> Any:
    """The family of ``arch`` (engine/architectures.py); "tiny": the seconds-long test model, a full LCM at 64x64."""
    from lcm_live.engine.architectures import Family, family

    if arch == "tiny":
        return Family("tiny", "tiny", "sd15", 64, 4, SEED_GUIDANCE, full_lcm=True)
    return family(arch)


def engine_family(arch: str) -> Any:
    """The engine's family for ``arch`` (engine/families.py): its sampler and defaults, as the released model's name
    would select it (sd-turbo and sdxs: Euler on trailing timesteps; sdxl-turbo: Euler ancestral; bk-sdm: LCM
    with its LCM-LoRA); sd15 and sdxl (and the tiny test model) are full LCMs."""
    from lcm_live.engine.families import FAMILIES, preset

    fam = bench_family(arch)
    return preset([arch], fam.pipeline_arch) or FAMILIES["lcm" if fam.full_lcm else "lcm-lora"]


def quiet_diffusers() -> None:
    """No per-cast "modules that should be kept in float32" notes in the bench output."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def resolve_device_dtype(config: BenchConfig) -> tuple[Any, Any]:
    from lcm_live.engine.devices import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    return device, resolve_dtype(config.dtype, device).dtype


def resolve_backend(config: BenchConfig, device: Any, pipe: Any) -> str:
    """The product's rule (engine/speedups.py), so `bench` times what `generate` and `serve` would run."""
    from lcm_live.config import EngineSettings
    from lcm_live.engine.speedups import resolve_backend as engine_rule

    settings = EngineSettings(backend=config.backend, compile=config.compile,
                              controlnet=CONTROLNET_NAME if config.controlnet else None)
    return engine_rule(settings, device, unet_parameters=sum(p.numel() for p in pipe.unet.parameters())).name


def build_fast_engine(config: BenchConfig, device: Any, dtype: Any) -> tuple[Any, list[str]]:
    """lcm-live's path: the real Engine around the random-weight architecture, with its speed-ups applied."""
    import torch

    from lcm_live.config import EngineSettings
    from lcm_live.engine.architectures import build_pipeline
    from lcm_live.engine.families import make_scheduler
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.speedups import apply_speedups

    # 1. float32 weights first, then cast: the fast path and the float32 seed path hold the same weights.
    fam = bench_family(config.arch)
    pipe = build_pipeline(config.arch, full_lcm=fam.full_lcm, dtype=torch.float32, seed=config.model_seed)
    sampler = engine_family(config.arch)  # the family's own scheduler, as loading a released model sets it
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler)
    pipe.to(dtype=dtype)
    if config.decoder == "taesd":
        pipe.vae = random_taesd(config.arch, dtype, config.model_seed + 10)
    pipe.to(device)
    from lcm_live.engine.memory import release_freed_memory

    release_freed_memory()  # the float32 build's heap: the fast path's memory is then its own
    settings = EngineSettings(
        model=f"bench:{config.arch}-random-{config.model_seed}", device=device.type,
        dtype=str(dtype).removeprefix("torch."), decoder=config.decoder, backend=resolve_backend(config, device, pipe),
        controlnet=CONTROLNET_NAME if config.controlnet else None,
        compile=config.compile, compile_mode=config.compile_mode, quantize=config.quantize,
        quantize_vae=config.quantize_vae, openvino_cache_dir=config.openvino_cache_dir, feature_reuse=config.feature_reuse,
        token_merging=config.token_merging,
    )
    applied = apply_speedups(pipe, settings, device, dtype)
    size = fam.native_size
    controlnet = None
    if config.controlnet:  # built in float32 and cast, like the pipeline: the float32 heap handed back after
        controlnet = random_controlnet(pipe.unet, pipe.vae_scale_factor, dtype, device, config.model_seed + 20)
        release_freed_memory()
    loaded = LoadedModel(pipe=pipe, kind="lcm" if fam.full_lcm else "lcm-lora", arch=fam.pipeline_arch,
                         name=settings.model, native_width=size, native_height=size, controlnet=controlnet,
                         family=sampler,
                         controlnet_name=CONTROLNET_NAME if controlnet is not None else None)
    engine = Engine(loaded, settings, device, dtype, speedups=applied)
    return engine, engine.info.speedups  # with what the engine adds (a ControlNet run by OpenVINO)


def _fast_run(engine: Any, config: BenchConfig, device: Any) -> Any:
    from lcm_live.engine.request import GenerationRequest

    final = {}
    request = GenerationRequest(prompt=config.prompt, num_inference_steps=config.num_inference_steps,
                                guidance_scale=config.guidance_scale, seed=config.seed, width=config.width,
                                height=config.height, num_images_per_prompt=config.batch_size,
                                control_image=control_lines(config.width, config.height) if config.controlnet
                                else None)
    engine.generate(request, callback=lambda event: final.__setitem__("latents", event.latents))
    synchronize(device)
    return final["latents"]


class _Path:
    """One side of the comparison: how to run it, its stage timer, and what was measured."""

    def __init__(self, name: str, run, pipe: Any, device: Any, controlnet: Any = None):
        self.name, self.run, self.device = name, run, device
        self.timer = StageTimer(device).attach(pipe, controlnet)
        self.totals: list[float] = []
        self.stages: list[dict[str, float]] = []
        self.unet_calls = 0
        self.samples: dict[str, int] = {}  # what each component processed in one call (bench/flops.py)
        self.stage_seconds: list[dict[str, float]] = []
        self.latents = None
        self.memory = RssSampler(device)

    def timed(self) -> None:
        """One timed run: its total, and its per-stage times. On CUDA the stage timer's synchronizations would
        slow the run it measures, so the total comes from a run without them and the stages from a second run."""
        import torch

        separate = torch.device(self.device).type == "cuda"
        self.timer.reset()
        self.timer.enabled = not separate
        try:
            with self.memory.measure():
                t0 = time.perf_counter()
                self.latents = self.run()
                total = time.perf_counter() - t0
        finally:
            self.timer.enabled = True
        self.totals.append(total)
        if separate:
            self.timer.reset()
            t0 = time.perf_counter()
            self.run()
            total = time.perf_counter() - t0  # "other" below: the stage run's own remainder
        s = self.timer.seconds
        self.samples, self.stage_seconds = dict(self.timer.samples), self.stage_seconds + [dict(s)]
        self.unet_calls = self.timer.calls["unet"]
        per_step = s["unet"] / max(1, self.timer.calls["unet"])
        stage = {"text_encoder": s["text_encoder"], "unet_per_step": per_step, "decode": s["decode"],
                 "other": total - sum(s.values())}
        if s.get("encode"):
            stage["encode"] = s["encode"]
        if "controlnet" in s:
            stage["controlnet_per_step"] = s["controlnet"] / max(1, self.timer.calls["controlnet"])
        self.stages.append(stage)

    def report(self, dtype: Any, batch_size: int = 1) -> dict[str, Any]:
        import statistics

        stages = {k: statistics.median(x[k] for x in self.stages) * 1000 for k in self.stages[0]}
        calls = summarize(self.totals)
        out = {
            # One call makes batch_size images: ms per image is the call's time / batch_size (spread unchanged).
            "ms_per_call": {k: v * 1000 if k in ("median", "min", "max") else v for k, v in calls.items()},
            "ms_per_image": {k: v * 1000 / batch_size if k in ("median", "min", "max") else v
                             for k, v in calls.items()},
            "images_per_s": batch_size / calls["median"] if calls["median"] > 0 else 0.0,
            "stages_ms": stages,  # per call
            "unet_calls_per_call": self.unet_calls,
            "unet_calls_per_image": self.unet_calls / batch_size if batch_size > 1 else self.unet_calls,
            "dtype": str(dtype).removeprefix("torch."),
            "peak_rss_gb": round(self.memory.peak_rss / 2**30, 2),
        }
        if self.memory.peak_cuda:
            out["peak_cuda_gb"] = round(self.memory.peak_cuda / 2**30, 2)
        return out


def _roofline(path: _Path, pipe: Any, config: BenchConfig, peak: Any, controlnet: Any = None,
              stage_peaks: dict | None = None) -> dict[str, Any]:
    import statistics

    from lcm_live.bench.flops import pipeline_flops
    from lcm_live.bench.roofline import path_roofline

    flops = pipeline_flops(pipe, config.width, config.height, controlnet)
    stage_seconds = {k: statistics.median(run.get(k, 0.0) for run in path.stage_seconds)
                     for k in path.stage_seconds[-1]}
    out = path_roofline(path.samples, stage_seconds, flops, statistics.median(path.totals), peak, stage_peaks)
    return out | {"flops_per_sample": flops}


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the comparison and return the report (see the module docstring for the order of things)."""
    import torch
    from tqdm import tqdm

    quiet_diffusers()
    device, dtype = resolve_device_dtype(config)
    if config.runs < 1 or config.warmup < 0:
        raise UserError(f"--runs {config.runs}: use 1 or more (and --warmup 0 or more)", field="runs")
    if config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size}: use 1 or more", field="batch_size")
    if config.controlnet and config.baseline:
        raise UserError("--controlnet times lcm-live's path with a ControlNet, which the seed article's has not: add "
                        "--baseline none (and compare with the same command without --controlnet)",
                        field="controlnet")
    report: dict[str, Any] = {"config": asdict(config), "machine": describe_machine(device),
                              "device": str(device), "batch_size": config.batch_size}
    t0 = time.perf_counter()

    # 1. lcm-live's path, alone in memory for its warm-up and memory sample.
    engine, applied = build_fast_engine(config, device, dtype)
    fast = _Path("lcm-live", lambda: _fast_run(engine, config, device), engine.pipe, device, engine.loaded.controlnet)
    report["lcm_live_setup_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    warm_memory = RssSampler(device)
    with warm_memory.measure():  # OpenVINO converts / compiles here: its transient peak, reported beside
        for _ in range(max(1, config.warmup)):  # at least one: OpenVINO converts / compiles on the first call
            _fast_run(engine, config, device)
        # --quantize int8 on OpenVINO: calibrating generations, then the int8 UNet's first (kernel selection).
        report["lcm_live_calibration_generations"] = engine.calibrate(config.width, config.height,
                                                                      config.num_inference_steps)
        if report["lcm_live_calibration_generations"]:
            _fast_run(engine, config, device)
    report["lcm_live_warmup_s"] = time.perf_counter() - t1
    report["lcm_live_warmup_peak_rss_gb"] = round(warm_memory.peak_rss / 2**30, 2)
    gc.collect()
    fast.timed()  # the first timed run happens with the fast path alone: its peak memory is its own
    report["lcm_live_alone_peak_rss_gb"] = round(fast.memory.peak_rss / 2**30, 2)
    if fast.memory.peak_cuda:  # CUDA: later peaks include the seed pipeline's weights, also on the GPU
        report["lcm_live_alone_peak_cuda_gb"] = round(fast.memory.peak_cuda / 2**30, 2)

    # The peak before the timed runs (measured again after them: the better of the two is kept).
    from lcm_live.bench.roofline import best_of, measure_peak, path_precision, vae_stage_peaks

    fast_precision = path_precision(engine.settings.backend, str(dtype).removeprefix("torch."), config.quantize,
                                    device.type)
    fast_peak = measure_peak(*fast_precision, refresh=True)
    vae_peaks = vae_stage_peaks(config.quantize_vae, engine.settings.backend)  # --quantize-vae int8: the int8 GEMM

    # 2. The seed's path.
    seed = None
    if config.baseline == "seed":
        pipe, seed_dtype = build_seed_pipeline(config, device)
        seed = _Path("seed", lambda: seed_run(pipe, config, device), pipe, device)
        for _ in range(config.warmup):
            seed_run(pipe, config, device)
        seed_precision = path_precision("torch", str(seed_dtype).removeprefix("torch."), "none", device.type)
        seed_peak = measure_peak(*seed_precision, refresh=True)

    # 3. Alternate.
    steps = (config.runs - 1) + (config.runs if seed else 0)
    with tqdm(total=steps, desc="bench", unit="image", disable=not config.progress) as bar:
        for i in range(config.runs):
            if seed:
                seed.timed()
                bar.update()
            if i > 0:  # run 0 of the fast path happened alone, above
                fast.timed()
                bar.update()

    # 4. The peaks again, right after the timed runs (the same load), and the FLOPs each path did.
    fast_peak = best_of(fast_peak, measure_peak(*fast_precision, refresh=True))
    seed_peak = best_of(seed_peak, measure_peak(*seed_precision, refresh=True)) if seed else None
    report["machine"]["load_average_1m_end"] = current_load()

    if config.profile:  # after the figures: a failing profiler costs its own summary only
        from lcm_live.bench.profile import profile_call

        fast.timer.enabled = False  # the stage timer's synchronizations would show as the call's host waits
        try:
            report["profile"] = profile_call(lambda: _fast_run(engine, config, device), device, config.profile)
        except Exception as exc:  # e.g. a profiler that cannot trace this device
            report["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            fast.timer.enabled = True

    # 5. Report.
    report["lcm_live"] = fast.report(dtype, config.batch_size) | {
        "speedups": applied, "decoder": config.decoder, "backend": engine.settings.backend,
        "roofline": _roofline(fast, engine.pipe, config, fast_peak, engine.loaded.controlnet, vae_peaks)}
    report["roofline_fraction"] = report["lcm_live"]["roofline"]["roofline_fraction"]
    if seed:
        report["seed"] = seed.report(seed_dtype, config.batch_size) | {
            "decoder": "vae", "pipeline": type(pipe).__name__, "guidance_scale": config.guidance_scale,
            "roofline": _roofline(seed, pipe, config, seed_peak)}
        # In float32 (a CPU) the reference run would be the timed seed image bit for bit (seed_path.py): reused.
        reference = seed.latents if seed_dtype == torch.float32 else seed_reference(pipe, config, device)
        a = fast.latents.detach().float().flatten().cpu()
        b = reference.detach().float().flatten().cpu()
        report["parity_cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        report["speedup_vs_seed"] = (report["seed"]["ms_per_image"]["median"]
                                     / report["lcm_live"]["ms_per_image"]["median"])
    return report
