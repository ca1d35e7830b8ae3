"""`lcm-live info`: the device lcm-live would use, the dtype auto picks and why, CPU features, the CUDA device,
library versions. Loads no model."""

from __future__ import annotations

import argparse
import json
import platform
import sys

LIBRARIES = ["torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface-hub",
             "openvino", "nncf", "xformers", "bitsandbytes"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("info", help="show the device, the dtype auto picks and why, versions",
                                   description="Device, precision, CPU features and library versions; no model load.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    from lcm_live import __version__
    from lcm_live.engine import devices

    cpu = devices.detect_cpu_features()
    device = devices.resolve_device("auto")
    auto = devices.resolve_dtype("auto", device, cpu)
    on_cpu = devices.resolve_dtype("auto", "cpu", cpu)
    from lcm_live.config import EngineSettings
    from lcm_live.engine.speedups import OPENVINO_AUTO_MIN_PARAMETERS, resolve_backend

    backend = resolve_backend(EngineSettings(), device, cpu=cpu)  # before a model is loaded: its size unknown
    try:
        from huggingface_hub import constants

        hf_cache = constants.HF_HUB_CACHE
    except Exception:
        hf_cache = None
    return {
        "lcm_live": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "dtype": auto.name,
        "dtype_reason": auto.reason,
        "backend": backend.name,
        "backend_reason": backend.reason + (f" (UNets under {OPENVINO_AUTO_MIN_PARAMETERS // 10**6}M parameters "
                                            "stay on torch)" if backend.name == "openvino" else ""),
        "cpu_dtype": on_cpu.name,
        "cpu_dtype_reason": on_cpu.reason,
        "cpu": {"model": cpu.model_name, "features": cpu.flags, "torch_capability": cpu.torch_capability,
                "threads": torch.get_num_threads()},
        "cuda": {"available": devices.cuda_available(), "device": devices.cuda_device_name(),
                 "torch_cuda": torch.version.cuda},
        "mps": {"available": devices.mps_available()},
        "huggingface_cache": hf_cache,
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = sys.stdout
    print(f"lcm-live {info['lcm_live']} (Python {info['python']}, {info['platform']})", file=out)
    print(f"device:       {info['device']}", file=out)
    print(f"dtype (auto): {info['dtype']} - {info['dtype_reason']}", file=out)
    print(f"backend (auto): {info['backend']} - {info['backend_reason']}", file=out)
    if info["device"] != "cpu":
        print(f"on CPU:       {info['cpu_dtype']} - {info['cpu_dtype_reason']}", file=out)
    cpu = info["cpu"]
    print(f"CPU:          {cpu['model'] or 'unknown'}; {cpu['threads']} torch threads", file=out)
    print(f"CPU features: {', '.join(cpu['features']) or 'none of note'} (torch kernels: {cpu['torch_capability']})",
          file=out)
    cuda = info["cuda"]
    print(f"CUDA:         {cuda['device'] or 'none'}" + (f" (torch built for CUDA {cuda['torch_cuda']})"
                                                         if cuda["torch_cuda"] else " (CPU-only torch build)"),
          file=out)
    print(f"MPS:          {'available' if info['mps']['available'] else 'no'}", file=out)
    print(f"HF cache:     {info['huggingface_cache']}", file=out)
    libs = ", ".join(f"{name} {version}" for name, version in info["libraries"].items() if version)
    missing = ", ".join(name for name, version in info["libraries"].items() if not version)
    print(f"libraries:    {libs}", file=out)
    if missing:
        print(f"not installed: {missing}", file=out)
    return 0
