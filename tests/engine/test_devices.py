"""Device and dtype choice, with the reason; CPU feature detection."""

from __future__ import annotations

import pytest
import torch

from lcm_live.engine import devices
from lcm_live.engine.devices import CpuFeatures, detect_cpu_features, resolve_device, resolve_dtype
from lcm_live.errors import UserError

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""


def test_cpuinfo_flags_and_model(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    cpu = detect_cpu_features(path)
    assert cpu.model_name == "Intel(R) Xeon(R) Platinum 8480+" and cpu.source == "/proc/cpuinfo"
    for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"):
        assert flag in cpu.flags
    assert "fpu" not in cpu.flags  # only the speed-relevant ones are listed
    assert cpu.fast_bf16 == ["amx_bf16", "avx512_bf16"]


def test_missing_cpuinfo_still_answers(tmp_path):
    cpu = detect_cpu_features(tmp_path / "nope")
    assert cpu.source in ("none", "torch") and cpu.torch_capability  # torch's probe still runs


def test_auto_dtype_per_device():
    assert resolve_dtype("auto", torch.device("cuda")).dtype == torch.float16
    assert resolve_dtype("auto", "mps").dtype == torch.float16
    fast = resolve_dtype("auto", "cpu", CpuFeatures(flags=["avx2", "amx_bf16"]))
    assert fast.dtype == torch.bfloat16 and "amx_bf16" in fast.reason and fast.name == "bfloat16"
    slow = resolve_dtype("auto", "cpu", CpuFeatures(flags=["avx2", "avx512f"]))
    assert slow.dtype == torch.float32 and "avx512_bf16" in slow.reason


def test_explicit_dtype_wins():
    choice = resolve_dtype("float32", torch.device("cuda"))
    assert choice.dtype == torch.float32 and "asked" in choice.reason
    with pytest.raises(UserError):
        resolve_dtype("int4", "cpu")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: False)


def test_device_auto_and_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_absent_device_is_one_clear_error(no_gpu, name):
    with pytest.raises(UserError) as err:
        resolve_device(name)
    assert err.value.field == "device" and f"--device {name}" in err.value.message
    assert "--device cpu" in err.value.message and "\n" not in err.value.message


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
