"""What a model switch and a style re-fuse cost on the studio's worker (issue 16: a switch to an already-loaded
preset under 50 ms on the worker). Run: ``python -m lcm_live.bench.bench_models --arch tiny|sd15 [--json FILE]``.

1. switch: a :class:`~lcm_live.studio.worker.Worker` with two presets, each a real Engine around the architecture
   with random weights (bench_engine.build_fast_engine, different seeds), both kept loaded (max_loaded_models 2).
   After a warm-up, pairs of frames alternate between the presets: the first of each pair right after a switch, the
   second on the same model. Reported: the worker's ``select()`` time at each switch
   (``ModelSwitcher.last_switch_s``: finding the loaded engine and the LRU bookkeeping), and the engine call's time
   of the pair's first frame against its second (the median ratio: a cold-cache cost a switch may add to its first
   frame shows there, measured pair by pair so that the machine's load drifts out).
2. refuse: ``StyleScales.set`` on a random LoRA (rank 4, attention projections, peft) of the same architecture:
   the first change (read the safetensors, load the adapter, fuse) and the next ones (unfuse, re-weight, fuse);
   then a 1-step frame with the adapter fused against unfused (the alternative: ``set_adapters`` weights change
   for free, every step pays the LoRA).

Each figure is the median of ``runs``; the machine and its load average are in the report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lcm_live.bench.measure import current_load, describe_machine


class _Sink:
    """Records one job's engine time; ``done`` is set when it is over."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.generation_s: float | None = None
        self.error: str | None = None

    def wants_preview(self) -> bool:
        return False

    def on_frame(self, job: Any, image: Any, *, final: bool, generation_s: float, **kwargs: Any) -> None:
        if final:
            self.generation_s = generation_s

    def on_error(self, job: Any, code: str, message: str, field: str | None) -> None:
        self.error = f"{code}: {message}"

    def on_done(self, job: Any, outcome: str) -> None:
        self.done.set()


def _engine_factory(arch: str, dtype: str, side: int):
    from lcm_live.bench.bench_engine import BenchConfig, build_fast_engine, resolve_device_dtype

    def factory(device: Any = None, *, preset: Any) -> Any:
        config = BenchConfig(arch=arch, width=side, height=side, baseline=None, backend="torch", decoder="taesd",
                             dtype=dtype, device="cpu", model_seed=int(preset.model.rsplit("-", 1)[1]),
                             progress=False)
        device_, dtype_ = resolve_device_dtype(config)
        return build_fast_engine(config, device_, dtype_)[0]

    return factory


def bench_switch(arch: str, dtype: str, side: int, steps: int, runs: int) -> dict[str, Any]:
    from lcm_live.config import ModelPreset, StudioSettings
    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.models import ModelRegistry
    from lcm_live.studio.params import build_params_model
    from lcm_live.studio.worker import Job, Worker

    registry = ModelRegistry([ModelPreset(name="a", model="random-1"), ModelPreset(name="b", model="random-2")])
    settings = StudioSettings(max_loaded_models=2, warmup_width=side, warmup_height=side, warmup_steps=1,
                              min_size=64, default_width=side, default_height=side, default_previews=False,
                              queue_wait_timeout_s=600, generation_timeout_s=600)
    worker = Worker(_engine_factory(arch, dtype, side), settings, StudioMetrics(), models=registry)
    worker.start()
    while worker.state == "loading":
        time.sleep(0.05)
    if not worker.ready:
        raise SystemExit(f"bench_models: the worker did not start: {worker.detail}")
    model = build_params_model(worker.settings, models=registry)

    def frame(name: str, seed: int) -> tuple[float, float | None]:
        worker.switcher.last_switch_s = None
        sink = _Sink()
        worker.submit("bench", Job(params=model(model=name, prompt="a fox", seed=seed, width=side, height=side,
                                                num_inference_steps=steps), sink=sink))
        sink.done.wait()
        if sink.error or sink.generation_s is None:
            raise SystemExit(f"bench_models: a frame failed: {sink.error}")
        return sink.generation_s, worker.switcher.last_switch_s

    try:
        frame("b", 0)  # loads b (with its warm-up), then warm both once more
        frame("a", 0), frame("b", 0)
        switch_s, after_switch, same, ratios = [], [], [], []
        for k in range(runs):  # pairs: a frame right after a switch, then one more on the same model
            name = "a" if k % 2 == 0 else "b"
            generation, switched = frame(name, k)
            again, not_switched = frame(name, 100 + k)
            if switched is None or not_switched is not None:
                raise SystemExit("bench_models: the pairs did not switch as planned")
            switch_s.append(switched)
            after_switch.append(generation)
            same.append(again)
            ratios.append(generation / again)
    finally:
        worker.stop()
    med = statistics.median
    return {"select_ms": {"median": round(med(switch_s) * 1000, 3), "max": round(max(switch_s) * 1000, 3)},
            "frame_after_switch_ms": round(med(after_switch) * 1000, 1),
            "frame_same_model_ms": round(med(same) * 1000, 1),
            "after_switch_over_same": round(med(ratios), 4), "switches": len(switch_s)}


def bench_refuse(arch: str, dtype: str, runs: int, side: int, frames: int) -> dict[str, Any]:
    import torch

    from lcm_live.bench.bench_engine import BenchConfig, build_fast_engine, resolve_device_dtype
    from lcm_live.engine.loras import StyleScales
    from lcm_live.engine.tiny import save_tiny_lora

    config = BenchConfig(arch=arch, baseline=None, backend="torch", decoder="taesd", dtype=dtype, device="cpu",
                         progress=False)
    device, torch_dtype = resolve_device_dtype(config)
    engine = build_fast_engine(config, device, torch_dtype)[0]
    with tempfile.TemporaryDirectory() as tmp:
        unet32 = engine.pipe.unet.to(torch.float32)  # peft's LoRA made on float32 weights, then cast back
        lora = save_tiny_lora(Path(tmp) / "style.safetensors", unet32, rank=4, seed=7, std=0.01)
        engine.pipe.unet.to(torch_dtype)
        styles = StyleScales(engine.pipe, [("style", str(lora), 0.0)], cache_dir=None, model_name=arch)
        t0 = time.perf_counter()
        styles.set({"style": 0.5})
        first = time.perf_counter() - t0
        times = []
        for k in range(runs):
            t0 = time.perf_counter()
            styles.set({"style": 0.2 + 0.1 * (k % 7)})
            times.append(time.perf_counter() - t0)
        layers = sum(1 for name, _ in engine.pipe.unet.named_modules() if name.endswith(".base_layer"))
        frames = _fused_against_unfused(engine, side, frames) if frames else {}
    return {"first_change_ms": round(first * 1000, 1), "refuse_ms": round(statistics.median(times) * 1000, 1),
            "lora_layers": layers, **frames}


def _fused_against_unfused(engine: Any, side: int, runs: int) -> dict[str, Any]:
    """The other way to move a scale: peft's adapter left unfused (``set_adapters`` weights change at no cost),
    paid at every step instead. One frame each way, alternating, after a warm-up of each."""
    from lcm_live.engine.request import GenerationRequest

    request = GenerationRequest("a fox", num_inference_steps=1, seed=0, width=side, height=side)
    fused, unfused = [], []
    for k in range(runs + 1):
        for is_fused, out in ((True, fused), (False, unfused)):
            if not is_fused:
                engine.pipe.unfuse_lora()  # the adapter now runs in every forward, at its set weight
            t0 = time.perf_counter()
            engine.generate(request)
            if k:  # the first of each: warm-up
                out.append(time.perf_counter() - t0)
            if not is_fused:
                engine.pipe.fuse_lora(adapter_names=engine.pipe.get_active_adapters(), lora_scale=1.0)
    med_f, med_u = statistics.median(fused), statistics.median(unfused)
    return {"frame_fused_ms": round(med_f * 1000, 1), "frame_unfused_ms": round(med_u * 1000, 1),
            "unfused_overhead": round(med_u / med_f - 1, 4), "frame_side": side}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny", help="tiny or a real architecture with random weights (sd15)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--side", type=int, default=None, help="image side (default: 64 tiny, 256 otherwise)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--frames", type=int, default=3, help="frames fused against unfused (0: none)")
    parser.add_argument("--skip", choices=["switch", "refuse"], default=None)
    parser.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)
    import torch

    side = args.side or (64 if args.arch == "tiny" else 256)
    report: dict[str, Any] = {"bench": "models", "arch": args.arch, "dtype": args.dtype, "side": side,
                              "steps": args.steps, "runs": args.runs,
                              "machine": describe_machine(torch.device("cpu")), "load_before": current_load()}
    if args.skip != "switch":
        report["switch"] = bench_switch(args.arch, args.dtype, side, args.steps, args.runs)
    if args.skip != "refuse":
        report["refuse"] = bench_refuse(args.arch, args.dtype, args.runs, side, args.frames)
    report["load_after"] = current_load()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
