"""`lcm-live bench --live`: the studio's sustained frame rate, measured the way a user meets it.

1. Build lcm-live's fast Engine on the random-weight architecture (as `bench`), hand it to the studio's app
   factory (``create_app(settings, engine_factory=...)``) and serve it with uvicorn on a free loopback port, in
   this process (a thread); wait for ``/readyz`` (the studio warms the engine up first).
2. A ``websockets`` client draws a moving stroke in sketch (img2img) mode: it sends the params once, then a new
   canvas (JPEG, as the page sends) each time a frame arrives, so one canvas is in flight at a time.
3. Latency is canvas sent -> frame image received; fps is frames over the measured seconds (the first frame,
   which may wait for kernel selection, is left out).
4. The roofline: the FLOPs of a frame (what the UNet, the decoder and the encoder processed while drawing, counted
   from the components at this size: bench/flops.py) times ``live_fps``, over this machine's GEMM peak in the
   UNet's backend and dtype, measured right after the drawing. The last two lines printed are
   ``roofline_fraction: X`` and ``live_fps: X``.

``sessions`` K: K clients draw at once (each its own stroke and seed, the same size and steps, so the studio may
batch their frames: ``max_batch_size``, default the studio's own choice). ``live_fps`` is then the total, the sum
of the clients' fps; the per-client fps are reported beside it.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from lcm_live.bench.broadcast_viewers import BroadcastViewers, broadcast_line
from lcm_live.bench.local_http import free_port, http_get
from lcm_live.errors import UserError

FIRST_FRAME_TIMEOUT_S = 900.0


@dataclass
class LiveConfig:
    arch: str = "sd15"
    width: int = 256
    height: int = 256
    # LCM img2img runs every step on the strength-shortened schedule: 1 step at strength 0.5 is one UNet
    # evaluation per frame (at t ~ 500), the live mode of docs/benchmarks.md. A plain UNet (the fast families, an
    # LCM-LoRA) follows SD img2img, int(steps * strength) evaluations: None gives ceil(1 / strength), one as well.
    num_inference_steps: int | None = None
    strength: float = 0.5
    guidance_scale: float | None = None  # None: 8 for a full LCM (its w-embedding), the family's otherwise (no CFG)
    seconds: float = 20.0
    backend: str = "auto"
    decoder: str = "taesd"
    dtype: str = "auto"
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "auto"
    quantize: str = "none"
    quantize_vae: str = "none"  # --quantize-vae int8 (the tiny autoencoder, OpenVINO)
    openvino_cache_dir: str | None = None
    prompt: str = "a watercolor fox in a snowy forest"
    ready_timeout_s: float = 900.0
    sessions: int = 1  # WebSocket clients drawing at once
    max_batch_size: int | None = None  # the studio's; None: its default (1 on a CPU, sessions on a GPU)
    controlnet: bool = False  # lines mode: the stroke is a ControlNet's image (random weights of the arch's shape)
    feature_reuse: int = 1  # --feature-reuse K (engine/feature_reuse.py; 1: off)
    token_merging: float = 0.0  # --token-merging R (engine/tome.py; 0: off)
    typing: bool = False  # --typing: the sketch stays and the prompt grows a letter a frame (typing over a sketch)
    broadcast_viewers: int = 0  # --broadcast-viewers N: the first client broadcasts, N MJPEG clients watch


def with_live_defaults(config: LiveConfig, fam: Any) -> LiveConfig:
    """One UNet evaluation a frame at the family's guidance: a full LCM 1 step (its img2img runs every step) at
    guidance 8 (its w-embedding); a plain UNet ceil(1 / strength) steps (SD img2img runs int(steps x strength))
    at the family's guidance (no CFG)."""
    import dataclasses
    import math

    if config.guidance_scale is None:
        config = dataclasses.replace(config, guidance_scale=8.0 if fam.full_lcm else fam.guidance_scale)
    if config.num_inference_steps is None:
        steps = 1 if fam.full_lcm else math.ceil(1 / config.strength - 1e-9)
        config = dataclasses.replace(config, num_inference_steps=steps)
    return config


def stroke_canvas(width: int, height: int, points: list[tuple[float, float]]) -> bytes:
    """A white canvas with a black stroke through ``points`` (pixels), as JPEG bytes (quality 85, as the page)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    if len(points) > 1:
        ImageDraw.Draw(image).line(points, fill="black", width=max(2, width // 64), joint="curve")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def typed_prompt(prompt: str, letters: int) -> str:
    """``prompt`` with a word being typed after it, ``letters`` letters long (every one a new prompt)."""
    words = "on a frozen lake under northern lights with pine trees and a red lantern glowing softly "
    tail = (words * (letters // len(words) + 1))[:letters]
    return f"{prompt}, {tail}" if tail else prompt


def stroke_point(i: int, width: int, height: int) -> tuple[float, float]:
    """The i-th point of a slowly widening spiral around the centre: every canvas differs from the last."""
    angle = i * 0.35
    radius = min(width, height) * (0.12 + 0.3 * (i % 60) / 60)
    return width / 2 + radius * math.cos(angle), height / 2 + radius * math.sin(angle)


def _wait_ready(base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http_get(f"{base}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise UserError(f"--live: the studio was not ready after {timeout:.0f} s")


async def _draw(url: str, config: LiveConfig, client: int = 0) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    params = {"type": "params", "mode": "control" if config.controlnet else "img2img", "prompt": config.prompt,
              "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
              "seed": 1 + client, "width": config.width, "height": config.height, "strength": config.strength,
              "previews": False}
    latencies: list[float] = []
    frame_times: list[float] = []
    server_ms: list[dict[str, float]] = []  # each final frame's `timings` from the studio
    errors: list[dict] = []
    offset = 17 * client  # each client draws its own part of the spiral
    points = [stroke_point(offset, config.width, config.height)]
    async with connect(url, max_size=8 * 2**20) as ws:
        hello = json.loads(await ws.recv())
        if hello.get("type") != "hello":
            raise UserError(f"--live: the studio answered {hello.get('type')!r} instead of hello: {hello}")
        if client == 0 and config.broadcast_viewers:  # as the page's Broadcast button
            await ws.send(json.dumps({"type": "broadcast", "on": True}))
        await ws.send(json.dumps(params))
        start = time.perf_counter()
        sent = time.perf_counter()
        await ws.send(stroke_canvas(config.width, config.height, points))
        info = None
        while True:
            # The first frame may wait for a conversion the warm-up did not make (an image-to-image IR of a new
            # shape: minutes on a loaded 2-core machine); it is left out of fps and latency.
            first_timeout = max(FIRST_FRAME_TIMEOUT_S, config.seconds)
            message = await asyncio.wait_for(ws.recv(), timeout=first_timeout if not frame_times else
                                             max(60.0, config.seconds))
            if isinstance(message, str):
                data = json.loads(message)
                if data.get("type") == "frame" and data.get("final"):
                    info = data
                elif data.get("type") == "error":
                    errors.append(data)
                    if len(errors) > 3:
                        raise UserError(f"--live: the studio keeps answering errors: {errors[-1]}")
                continue
            if info is None:  # an image without its frame header (a preview): not a finished frame
                continue
            now = time.perf_counter()
            latencies.append(now - sent)
            frame_times.append(now)
            server_ms.append({k: float(v) for k, v in info.get("timings", {}).items()})
            info = None
            if now - start >= config.seconds:
                break
            sent = time.perf_counter()
            if config.typing:  # the next letter of the prompt, over the same sketch
                params["prompt"] = typed_prompt(config.prompt, len(frame_times))
                await ws.send(json.dumps(params))
                continue
            # The next stroke segment, sent as soon as the frame is in (the page does the same on each change).
            points.append(stroke_point(offset + len(points), config.width, config.height))
            await ws.send(stroke_canvas(config.width, config.height, points[-40:]))
    return {"latencies": latencies, "frame_times": frame_times, "server_ms": server_ms, "errors": errors}


async def _draw_all(url: str, config: LiveConfig) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(_draw(url, config, k) for k in range(config.sessions))))


def _batch_stats(metrics: Any) -> tuple[float, float]:
    """(engine calls, frames in them) so far, from the studio's lcm_live_batch_size histogram."""
    samples = {s.name: s.value for family in metrics.batch_size.collect() for s in family.samples}
    return samples.get("lcm_live_batch_size_count", 0.0), samples.get("lcm_live_batch_size_sum", 0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_live(config: LiveConfig) -> dict[str, Any]:
    import uvicorn

    from lcm_live.bench.bench_engine import (
        BenchConfig,
        bench_family,
        build_fast_engine,
        quiet_diffusers,
        resolve_device_dtype,
    )
    from lcm_live.bench.measure import StageTimer, current_load, describe_machine
    from lcm_live.config import Settings, StudioSettings
    from lcm_live.studio.app import create_app

    # 1. The engine and the studio around it.
    quiet_diffusers()
    config = with_live_defaults(config, bench_family(config.arch))
    bench_config = BenchConfig(arch=config.arch, width=config.width, height=config.height,
                               num_inference_steps=config.num_inference_steps, backend=config.backend,
                               decoder=config.decoder, dtype=config.dtype, device=config.device,
                               compile=config.compile, compile_mode=config.compile_mode, quantize=config.quantize,
                               quantize_vae=config.quantize_vae, openvino_cache_dir=config.openvino_cache_dir, controlnet=config.controlnet,
                               feature_reuse=config.feature_reuse, token_merging=config.token_merging)
    device, dtype = resolve_device_dtype(bench_config)
    machine = describe_machine(device)  # at the start: its time and load average are the run's start
    engine, applied = build_fast_engine(bench_config, device, dtype)
    side = min(config.width, config.height, 256)
    studio = StudioSettings(min_size=min(64, side), max_size=max(768, config.width, config.height),
                            default_width=config.width, default_height=config.height,
                            warmup_width=config.width, warmup_height=config.height,
                            warmup_steps=config.num_inference_steps, max_sessions=config.sessions,
                            max_batch_size=config.max_batch_size)
    settings = Settings(engine=engine.settings, studio=studio)
    from lcm_live.bench.roofline import best_of, measure_peak, path_precision, vae_stage_peaks

    precision = path_precision(engine.settings.backend, str(dtype).removeprefix("torch."), config.quantize,
                               device.type)
    peak_before = measure_peak(*precision, refresh=True)  # measured again after the drawing: the better is kept
    vae_peaks = vae_stage_peaks(config.quantize_vae, engine.settings.backend)  # --quantize-vae int8: int8 GEMM
    app = create_app(settings, engine_factory=lambda: engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws="websockets-sansio", log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        t0 = time.perf_counter()
        _wait_ready(f"http://127.0.0.1:{port}", config.ready_timeout_s)
        ready_s = time.perf_counter() - t0
        # 2. Draw.
        if not config.controlnet:
            # The studio warms up with text-to-image: the first sketch frame would convert and compile the
            # encoder (TAESD in OpenVINO: seconds on a loaded CPU) inside the encode stage's time, which the
            # few frames of a slow run then share (3.9 s a frame against 0.75 s for the decoder, measured so).
            import torch

            with torch.no_grad():
                engine.pipe.vae.encode(torch.zeros(1, 3, config.height, config.width, dtype=dtype, device=device))
        # Timers on the shared components (the img2img pipeline reuses the same unet/vae objects).
        timer = StageTimer(device).attach(engine.pipe, engine.loaded.controlnet)
        studio_state = app.state.studio  # no job ran yet (the warm-up is none): its batch counts start at 0
        from lcm_live.bench.flops import reuse_of

        reuse = reuse_of(engine.pipe.unet)  # feature reuse (--feature-reuse K): full and reused evaluations
        reuse_before = reuse.stats() if reuse is not None else None
        viewers = None
        if config.broadcast_viewers:
            viewers = BroadcastViewers(port, studio_state.broadcast.path, config.broadcast_viewers)
        clients = asyncio.run(_draw_all(f"ws://127.0.0.1:{port}/ws", config))
        broadcast = viewers.stop() if viewers is not None else None
        timer.detach()
        reuse_counts = None
        if reuse is not None:
            after = reuse.stats()
            reuse_counts = {k: after[k] - reuse_before[k] for k in ("full_evaluations", "reused_evaluations")}
        engine_calls, batched_frames = _batch_stats(studio_state.metrics)
        max_batch = studio_state.worker.max_batch_size
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    # 4. The peak again, right after the drawing (the same load), in the UNet's backend and dtype.
    from lcm_live.bench.flops import pipeline_flops
    from lcm_live.bench.roofline import flops_by_stage, mixed_peak, roofline

    peak = best_of(peak_before, measure_peak(*precision, refresh=True))
    machine["load_average_1m_end"] = current_load()
    flops = pipeline_flops(engine.pipe, config.width, config.height, engine.loaded.controlnet)

    # 3. Summarise (each client's first frame is left out of fps and latency).
    per_client_fps, lat, server_ms, errors, spans = [], [], [], [], []
    for raw in clients:
        times = raw["frame_times"]
        if len(times) < 2:
            raise UserError(f"--live: a client got only {len(times)} frame(s) in {config.seconds} s: raise --seconds")
        span = times[-1] - times[0]
        spans.append(span)
        per_client_fps.append((len(times) - 1) / span if span > 0 else 0.0)
        lat += raw["latencies"][1:] or raw["latencies"]
        server_ms += raw["server_ms"]
        errors += raw["errors"]
    server_median = {key: statistics.median(t[key] for t in server_ms if key in t)
                     for key in ("queue_ms", "generation_ms", "encode_ms", "total_ms") if any(key in t for t in server_ms)}
    # Counted, not derived: LCM's img2img runs num_inference_steps UNet calls spread over the strength-shortened
    # schedule (unlike SD img2img's steps * strength). With batching one call serves several frames.
    generations = max(1, timer.calls["decode"])
    frames_made = max(1, timer.samples.get("decode", 0))
    samples = dict(timer.samples)
    if reuse_counts is not None:  # a reused evaluation runs the shallow blocks only (one sample each: batch 1)
        samples["unet"] = reuse_counts["full_evaluations"]
        samples["unet_shallow"] = reuse_counts["reused_evaluations"]
    by_stage = flops_by_stage(samples, flops, {"unet_shallow": "unet"})
    flops_per_frame = sum(by_stage.values()) / frames_made
    live_fps = sum(per_client_fps)
    whole = mixed_peak(by_stage, vae_peaks, peak)  # the UNet's peak unless a stage runs at another precision
    line = roofline(flops_per_frame * live_fps, 1.0, whole)
    unet_flops = samples.get("unet", 0) * flops["unet"] + samples.get("unet_shallow", 0) * flops.get("unet_shallow", 0)
    return {
        "config": asdict(config),
        "machine": machine,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "speedups": applied,
        "unet_evaluations_per_frame": timer.calls["unet"] / generations,  # per engine call when batched
        "feature_reuse": reuse_counts,  # full and reused UNet evaluations while drawing (--feature-reuse K)
        "stage_ms_per_generation": {stage: timer.seconds[stage] / generations * 1000
                                    for stage in ("unet", "decode", "encode", "controlnet") if stage in timer.seconds},
        "studio_ready_s": ready_s,
        "sessions": config.sessions,
        "max_batch_size": max_batch,
        "engine_calls": int(engine_calls),
        "mean_batch_size": batched_frames / engine_calls if engine_calls else None,
        "frames": sum(len(raw["frame_times"]) for raw in clients),
        "seconds": max(spans),
        "per_client_fps": per_client_fps,
        "roofline": {"flops_per_frame": flops_per_frame, "flops_per_sample": flops, "samples": samples,
                     "peak": whole.to_dict(), **line,
                     "unet_stage_fraction": roofline(unet_flops, timer.seconds["unet"], peak)["roofline_fraction"]
                     if timer.seconds["unet"] > 0 else None},
        "roofline_fraction": line["roofline_fraction"],
        "live_fps": live_fps,
        "latency_ms": {"p50": _percentile(lat, 0.5) * 1000, "p95": _percentile(lat, 0.95) * 1000,
                       "mean": statistics.fmean(lat) * 1000},
        "server_total_ms_median": server_median.get("total_ms"),
        # The studio's own split of a frame (its `timings`): waiting for the worker, the engine call (preparing the
        # input, the stages above and turning latents into a picture), encoding the JPEG; total from submission.
        "server_ms_median": server_median,
        "broadcast": broadcast,  # --broadcast-viewers: the parts and bytes each viewer got
        "errors": errors,
    }


def format_live(report: dict[str, Any]) -> str:
    c, m = report["config"], report["machine"]
    per = "frame" if (report.get("mean_batch_size") or 1) <= 1 else "engine call"  # batched: one call, several frames
    return "\n".join([
        f"live: arch {c['arch']}  {c['width']}x{c['height']}  "
        + (f"lines (ControlNet), {c['num_inference_steps']} steps" if c.get("controlnet") else
           f"img2img {'sketch, typing' if c.get('typing') else 'sketch'}, {c['num_inference_steps']} steps x "
           f"strength {c['strength']}")
        + f": {report['unet_evaluations_per_frame']:.2g} UNet evaluation(s) per {per} (counted)",
        "per generation: " + ", ".join(f"{'UNet' if k == 'unet' else k} {v:.0f} ms"
                                       for k, v in report["stage_ms_per_generation"].items()),
        f"device {report['device']} ({m.get('gpu') or m['cpu']}, {m['torch_threads']} threads)  dtype {report['dtype']}"
        f"  speedups {','.join(report['speedups'])}  decoder {c['decoder']}",
        *([f"sessions {report['sessions']}: per-client fps "
           f"{', '.join(f'{x:.2f}' for x in report['per_client_fps'])} (total {report['live_fps']:.2f}); up to "
           f"{report['max_batch_size']} frame(s) per engine call, mean {report['mean_batch_size'] or 0:.2f} over "
           f"{report['engine_calls']} calls"] if report["sessions"] > 1 else []),
        *([f"feature reuse (K={c['feature_reuse']}): {report['feature_reuse']['full_evaluations']} full and "
           f"{report['feature_reuse']['reused_evaluations']} reused UNet evaluations"] if report.get("feature_reuse")
          else []),
        f"studio ready after {report['studio_ready_s']:.1f} s; {report['frames']} frames in {report['seconds']:.1f} s"
        f"; errors {len(report['errors'])}",
        f"latency canvas -> frame: p50 {report['latency_ms']['p50']:.0f} ms  p95 {report['latency_ms']['p95']:.0f} ms"
        f"  (server total median {report['server_total_ms_median'] or 0:.0f} ms)",
        *([_server_line(report["server_ms_median"])] if report.get("server_ms_median") else []),
        *([broadcast_line(report["broadcast"])] if report.get("broadcast") else []),
        *_roofline_lines(report),
        f"live_fps: {report['live_fps']:.2f}",
    ])


def _server_line(median: dict[str, float]) -> str:
    """The studio's own split of a frame, medians: where the time goes that the stage timers do not see."""
    names = {"queue_ms": "queue", "generation_ms": "engine call", "encode_ms": "JPEG", "total_ms": "total"}
    return "server medians: " + ", ".join(f"{names[k]} {v:.1f} ms" for k, v in median.items())


def _roofline_lines(report: dict[str, Any]) -> list[str]:
    r = report.get("roofline")
    if not r:
        return []
    p, unet = r["peak"], r.get("unet_stage_fraction")
    return [f"roofline: {r['flops_per_frame'] / 1e9:.1f} GFLOP per frame x {report['live_fps']:.2f} fps = "
            f"{r['achieved_tflops']:.3g} TFLOP/s of {r['peak_tflops']:.3g} ({p['backend']} {p['dtype']} "
            f"{p['n']}x{p['n']} GEMM, best of before and after the drawing)"
            + (f"; UNet stage {unet:.2f}" if unet is not None else ""),
            f"roofline_fraction: {report['roofline_fraction']:.2f}"]
