"""Speed-ups that change how the UNet (and VAE) run, applied once after loading:

1. channels_last memory format for the UNet and the VAE (CPU and CUDA): oneDNN and cuDNN convolutions run
   NHWC natively, so this saves a layout conversion around every conv (measured 1.45 -> 1.17 s per bf16
   UNet step at 512x512 on a 2-core CPU; see docs/benchmarks.md).
2. Quantization behind ``--quantize``: ``int8`` on CPU through NNCF weight compression (OpenVINO backend) or
   torch's dynamic int8 Linear (torch backend, float32); ``int8`` / ``nf4`` on CUDA through bitsandbytes.
3. The OpenVINO UNet backend (``--backend openvino``, CPU): see ``openvino_backend.py``.
4. ``torch.compile`` of the UNet (``settings.compile``): ``max-autotune`` (Triton GEMM autotuning plus CUDA graphs)
   on CUDA, the default mode with weight freezing on CPU.

dtype itself (bf16/fp16) is chosen by the device logic and applied at load time; SDPA is diffusers' default.
"""

from __future__ import annotations

from typing import Any

from lcm_live.config import EngineSettings
from lcm_live.errors import UserError


def check_speedups(settings: EngineSettings, device: Any, dtype: Any) -> None:
    """Refuse combinations that cannot work, with one line naming the flag and the fix."""
    import torch

    device = torch.device(device)
    if settings.backend == "openvino":
        if device.type != "cpu":
            raise UserError(f"--backend openvino runs on the CPU, not {device.type}: use --device cpu, "
                            "or --backend torch on a GPU", field="backend")
        from lcm_live.engine.openvino_backend import openvino_available

        if not openvino_available():
            raise UserError("--backend openvino needs the openvino package: pip install 'lcm-live[openvino]'",
                            field="backend")
        if settings.compile:
            raise UserError("--compile applies to the torch backend; with --backend openvino leave it off "
                            "(OpenVINO compiles its own graph)", field="compile")
    if settings.quantize == "nf4" and device.type != "cuda":
        raise UserError("--quantize nf4 needs a CUDA GPU (bitsandbytes); on a CPU use --quantize int8",
                        field="quantize")
    if (settings.quantize == "int8" and device.type == "cpu" and settings.backend == "torch"
            and dtype != torch.float32):
        raise UserError(f"--quantize int8 with --backend torch runs torch's dynamic int8 Linear, which needs "
                        f"float32 (got {str(dtype).removeprefix('torch.')}): add --dtype float32, or use "
                        "--backend openvino", field="quantize")
    if settings.quantize != "none" and device.type == "mps":
        raise UserError("--quantize is not supported on mps: use --quantize none", field="quantize")


def apply_speedups(pipe: Any, settings: EngineSettings, device: Any, dtype: Any) -> list[str]:
    """Apply what ``settings`` asks for (and channels_last where it helps) to ``pipe`` in place.

    Returns the names of what was applied, in order, for ``info`` and the bench report.
    """
    import torch

    device = torch.device(device)
    check_speedups(settings, device, dtype)
    applied: list[str] = []

    # 1. channels_last: NHWC convolutions on CPU (oneDNN) and CUDA (cuDNN); MPS gains nothing.
    if device.type in ("cpu", "cuda"):
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
        applied.append("channels_last")

    # 2. Quantization.
    if settings.quantize != "none":
        if device.type == "cuda":
            count = quantize_linears_bitsandbytes(pipe.unet, settings.quantize, device=device, dtype=dtype)
            applied.append(f"{settings.quantize}:bitsandbytes({count} linears)")
        elif settings.backend == "torch":
            count = quantize_linears_dynamic_int8(pipe.unet)
            applied.append(f"int8:torch-dynamic({count} linears)")
        # OpenVINO: NNCF weight compression happens at conversion, below.

    # 3. OpenVINO UNet.
    if settings.backend == "openvino":
        from lcm_live.engine.openvino_backend import OpenVINOUNet

        precision = str(dtype).removeprefix("torch.")
        pipe.unet = OpenVINOUNet(pipe.unet, model_name=settings.model, precision=precision,
                                 cache_dir=settings.openvino_cache_dir, quantize=settings.quantize)
        applied.append(f"openvino:{precision}" + (":int8-weights" if settings.quantize == "int8" else ""))

    # 4. torch.compile.
    if settings.compile:
        if device.type == "cuda":
            # max-autotune: Triton GEMM/conv autotuning and CUDA graphs (static shapes, no per-launch overhead).
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
            applied.append("torch.compile(max-autotune)")
        else:
            import torch._inductor.config as inductor_config

            # Freezing folds the (inference-only) weights into the graph so oneDNN can prepack them.
            inductor_config.freezing = True
            pipe.unet = torch.compile(pipe.unet)
            applied.append("torch.compile(default, freezing)")
    return applied


def quantize_linears_dynamic_int8(unet: Any) -> int:
    """Replace the UNet's ``nn.Linear`` layers (attention projections, feed-forwards: about a third of the
    FLOPs at 512x512) with torch's dynamic int8 Linear: int8 weights, activations quantized per call, VNNI
    int8 GEMMs. float32 modules only. Returns how many layers were replaced."""
    import warnings

    import torch

    count = sum(isinstance(m, torch.nn.Linear) for m in unet.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantized tensor types as deprecated
        torch.ao.quantization.quantize_dynamic(unet, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return count


def quantize_linears_bitsandbytes(module: Any, mode: str, *, device: Any, dtype: Any) -> int:
    """Replace every ``nn.Linear`` under ``module`` by bitsandbytes' int8 (LLM.int8) or 4-bit NF4 layer;
    the weights are quantized when moved to the GPU. CUDA only. Returns how many layers were replaced."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(f"--quantize {mode} on CUDA needs bitsandbytes: pip install bitsandbytes",
                        field="quantize") from exc
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            has_bias = child.bias is not None
            weight = child.weight.data.to("cpu", torch.float16)
            if mode == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0)
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=dtype, quant_type="nf4")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if has_bias:
                new.bias = torch.nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(module, name, new.to(device))  # .to(cuda) performs the quantization
            count += 1
        else:
            count += quantize_linears_bitsandbytes(child, mode, device=device, dtype=dtype)
    return count
