"""Device and precision choice: ``--device auto|cpu|cuda|mps`` and ``--dtype auto|float32|bfloat16|float16``.

Auto precision: float16 on CUDA and MPS (tensor cores / the Apple GPU run it natively); bfloat16 on CPUs with
fast bf16 matrix units (AMX ``amx_bf16`` or AVX-512 ``avx512_bf16``: about 5x fp32 GEMM throughput on a
Sapphire Rapids core), else float32 (a CPU without those units emulates bf16 and runs slower than fp32).
Every choice comes with the reason, which ``lcm-live info`` prints.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_live.errors import UserError

logger = logging.getLogger(__name__)

# The CPU flags (Linux /proc/cpuinfo names) that matter for inference speed, in the order `info` shows them.
INTERESTING_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                         "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
FAST_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass
class CpuFeatures:
    flags: list[str] = field(default_factory=list)  # the INTERESTING_CPU_FLAGS found
    torch_capability: str | None = None  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    model_name: str | None = None
    source: str = "none"  # where the flags came from: "/proc/cpuinfo", "torch", "none"

    @property
    def fast_bf16(self) -> list[str]:
        """The fast-bf16 features present (empty: none)."""
        return [f for f in FAST_BF16_FLAGS if f in self.flags]


def _read_cpuinfo(path: Path) -> tuple[set[str], str | None]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set(), None
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:  # x86 "flags", ARM "Features"; first CPU only
            flags = set(value.split())
        elif key == "model name" and model is None:
            model = value.strip()
    return flags, model


def detect_cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """The CPU's speed-relevant features, from /proc/cpuinfo (Linux) and torch's own probe (any OS)."""
    import torch

    flags, model = _read_cpuinfo(Path(cpuinfo))
    found = [f for f in INTERESTING_CPU_FLAGS if f in flags]
    source = "/proc/cpuinfo" if flags else "none"
    # torch's runtime probes (CPUID): they also work where /proc/cpuinfo does not exist (macOS, Windows).
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
              "amx_fp16": "_is_amx_fp16_supported"}
    for flag, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe() and flag not in found:
                found.append(flag)
                source = "torch" if source == "none" else source
        except Exception:  # a probe that fails means "unknown", not an error
            pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    return CpuFeatures(flags=found, torch_capability=capability, model_name=model or platform.processor() or None,
                       source=source)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(choice: str = "auto") -> Any:
    """``auto``: CUDA, then MPS, then CPU. An explicit device that is absent is a UserError naming the fix."""
    import torch

    if choice == "auto":
        if cuda_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice.startswith("cuda:") and choice[5:].isdigit():  # one GPU of several (serve --devices)
        count = torch.cuda.device_count() if cuda_available() else 0
        if int(choice[5:]) >= count:
            raise UserError(f"--device {choice}: torch sees {count} CUDA device(s) (cuda:0..cuda:{max(count - 1, 0)})"
                            "; pick one of those, or --device cpu", field="device")
        return torch.device(choice)
    if choice == "cuda" and not cuda_available():
        raise UserError("--device cuda: no CUDA device is visible to torch (a CPU-only torch build, or no driver); "
                        "use --device cpu or --device auto", field="device")
    if choice == "mps" and not mps_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or --device auto",
                        field="device")
    if choice not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {choice!r}: choose auto, cpu, cuda or mps", field="device")
    return torch.device(choice)


@dataclass
class DtypeChoice:
    dtype: Any  # torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_dtype(choice: str, device: Any, cpu: CpuFeatures | None = None) -> DtypeChoice:
    """The precision to run in, and why. ``device`` is a torch.device (or its type as a string)."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    kind = device if isinstance(device, str) else device.type
    if choice != "auto":
        if choice not in names:
            raise UserError(f"--dtype {choice!r}: choose auto, float32, bfloat16 or float16", field="dtype")
        return DtypeChoice(names[choice], f"--dtype {choice} was asked for")
    if kind == "cuda":
        return DtypeChoice(torch.float16, "auto: float16 on CUDA (tensor cores)")
    if kind == "mps":
        return DtypeChoice(torch.float16, "auto: float16 on Apple MPS")
    cpu = cpu or detect_cpu_features()
    if cpu.fast_bf16:
        return DtypeChoice(torch.bfloat16, f"auto: bfloat16 on a CPU with fast bf16 ({', '.join(cpu.fast_bf16)})")
    return DtypeChoice(torch.float32, "auto: float32 (this CPU has neither amx_bf16 nor avx512_bf16, "
                                      "so bf16 would be emulated and slower)")


def cuda_device_name() -> str | None:
    if not cuda_available():
        return None
    import torch

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"{props.name} ({props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor})"


def try_xformers(pipe: Any) -> list[str]:
    """xFormers attention where it is installed and works (else PyTorch SDPA stays); what was applied."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        return []
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as exc:  # xFormers present but unusable for this GPU/build: SDPA stays
        logger.warning("xFormers is installed but could not be enabled (%s); using PyTorch SDPA", exc)
        return []
    return ["xformers"]
