"""``--backend auto``: OpenVINO on a CPU with fast bf16 when the extra is installed and the UNet is big enough to
gain, else torch; the choice and its reason in what apply_speedups reports. CPU flags and the installed extra are
monkeypatched, so these hold on any machine."""

from __future__ import annotations

import argparse

import pytest
import torch

from lcm_live.cli.common import add_engine_arguments, engine_settings_from_args
from lcm_live.config import EngineSettings
from lcm_live.engine import speedups
from lcm_live.engine.architectures import build_pipeline
from lcm_live.engine.devices import CpuFeatures
from lcm_live.engine.speedups import (
    OPENVINO_AUTO_MIN_PARAMETERS,
    apply_speedups,
    check_speedups,
    resolve_backend,
)
from lcm_live.errors import UserError

AMX = CpuFeatures(flags=["avx2", "avx512f", "amx_tile", "amx_bf16"])
AVX512_BF16 = CpuFeatures(flags=["avx2", "avx512f", "avx512_bf16"])
PLAIN = CpuFeatures(flags=["avx2", "fma", "avx512f"])
SD15_UNET = 859_602_884  # parameters of the sd15 UNet (engine/architectures.py)


@pytest.fixture
def machine(monkeypatch):
    """Set the CPU's flags and whether openvino is installed, for resolve_backend's own probes."""

    def set_machine(cpu: CpuFeatures, openvino: bool) -> None:
        monkeypatch.setattr(speedups.devices, "detect_cpu_features", lambda *a, **k: cpu)
        monkeypatch.setattr(speedups, "openvino_installed", lambda: openvino)

    return set_machine


@pytest.mark.parametrize("cpu", [AMX, AVX512_BF16], ids=["amx", "avx512_bf16"])
def test_auto_picks_openvino_on_a_bf16_cpu_with_the_extra(machine, cpu):
    machine(cpu, openvino=True)
    choice = resolve_backend(EngineSettings(), "cpu", unet_parameters=SD15_UNET)
    assert choice.name == "openvino"
    assert choice.reason.startswith("auto:") and cpu.fast_bf16[0] in choice.reason
    # Before loading, the size is unknown: not held against OpenVINO.
    assert resolve_backend(EngineSettings(), "cpu").name == "openvino"


@pytest.mark.parametrize(
    "cpu, openvino, parameters, settings, device, why",
    [
        (PLAIN, True, SD15_UNET, {}, "cpu", "neither amx_bf16 nor avx512_bf16"),
        (AMX, False, SD15_UNET, {}, "cpu", "pip install 'lcm-live[openvino]'"),
        (AMX, True, OPENVINO_AUTO_MIN_PARAMETERS - 1, {}, "cpu", "small UNet"),
        (AMX, True, SD15_UNET, {"compile": True}, "cpu", "--compile"),
        (AMX, True, SD15_UNET, {}, "cuda", "on cuda"),
        (AMX, True, SD15_UNET, {}, "mps", "on mps"),
    ],
    ids=["no-fast-bf16", "no-openvino", "small-unet", "compile", "cuda", "mps"],
)
def test_auto_keeps_torch_and_says_why(machine, cpu, openvino, parameters, settings, device, why):
    machine(cpu, openvino)
    choice = resolve_backend(EngineSettings(**settings), device, unet_parameters=parameters)
    assert choice.name == "torch"
    assert choice.reason.startswith("auto: torch") and why in choice.reason


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_an_explicit_backend_is_taken_as_asked(machine, backend):
    machine(PLAIN, openvino=False)  # neither would auto pick openvino here
    choice = resolve_backend(EngineSettings(backend=backend), "cpu", unet_parameters=10)
    assert choice.name == backend and "was asked for" in choice.reason


def test_apply_keeps_a_tiny_model_on_torch_and_reports_the_choice(machine):
    """The test suite's tiny models never start OpenVINO conversions, even on a bf16 CPU with the extra."""
    machine(AMX, openvino=True)
    pipe = build_pipeline("tiny", dtype=torch.float32)
    applied = apply_speedups(pipe, EngineSettings(model="tiny"), "cpu", torch.float32)
    assert applied[0].startswith("backend:torch (auto: torch (a small UNet")
    assert applied[1:] == ["channels_last"]
    assert isinstance(pipe.unet, torch.nn.Module) and type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_auto_int8_on_a_small_model_is_torch_dynamic_int8(machine):
    machine(AMX, openvino=True)
    pipe = build_pipeline("tiny", dtype=torch.float32)
    applied = apply_speedups(pipe, EngineSettings(model="tiny", quantize="int8"), "cpu", torch.float32)
    assert applied[-1].startswith("int8:torch-dynamic(")
    # bf16 cannot take torch's dynamic int8: the error names the auto choice and both ways out.
    with pytest.raises(UserError) as err:
        apply_speedups(build_pipeline("tiny", dtype=torch.float32).to(dtype=torch.bfloat16),
                       EngineSettings(model="tiny", quantize="int8"), "cpu", torch.bfloat16)
    message = err.value.message
    assert err.value.field == "quantize" and "small UNet" in message
    assert "--dtype float32" in message and "--backend openvino" in message


def test_cli_backend_defaults_to_auto():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args([])
    assert args.backend == "auto"
    assert engine_settings_from_args(args).backend == "auto"
    assert parser.parse_args(["--backend", "torch"]).backend == "torch"
    assert engine_settings_from_args(args).compile_mode == "auto"
    tuned = engine_settings_from_args(parser.parse_args(["--compile", "--compile-mode", "max-autotune"]))
    assert tuned.compile and tuned.compile_mode == "max-autotune"
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile-mode", "fastest"])


def test_int8_on_openvino_without_nncf_is_refused_before_loading(machine, monkeypatch):
    """Without NNCF the quantization could only fail later, in its thread, leaving the model on bf16: refused
    up front, naming the flag and the install."""
    machine(AMX, openvino=True)
    monkeypatch.setattr(speedups, "nncf_installed", lambda: False)
    with pytest.raises(UserError, match=r"needs NNCF.*lcm-live\[openvino\]") as caught:
        check_speedups(EngineSettings(quantize="int8"), "cpu", torch.bfloat16)
    assert caught.value.field == "quantize"
    check_speedups(EngineSettings(), "cpu", torch.bfloat16)  # without --quantize: fine
    monkeypatch.setattr(speedups, "nncf_installed", lambda: True)
    check_speedups(EngineSettings(quantize="int8"), "cpu", torch.bfloat16)
