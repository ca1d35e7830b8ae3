"""Speed-ups that change how the UNet (and VAE) run, applied once after loading:

0. The UNet backend: ``--backend auto|torch|openvino``; ``auto`` is resolved by :func:`resolve_backend`
   (OpenVINO on a CPU with fast bf16 when the extra is installed and the model is big enough to gain, else torch),
   and the choice with its reason is reported in ``Engine.info.speedups``.
1. channels_last memory format for the UNet and the VAE (CPU and CUDA): oneDNN and cuDNN convolutions run
   NHWC natively, so this saves a layout conversion around every conv (measured 1.45 -> 1.17 s per bf16
   UNet step at 512x512 on a 2-core CPU; see docs/benchmarks.md).
2. Quantization behind ``--quantize``: ``int8`` on CPU through NNCF post-training quantization of weights and
   activations, calibrated on the engine's warm-up (OpenVINO backend, see ``openvino_int8.py``) or torch's
   dynamic int8 Linear (torch backend, float32); ``int8`` / ``nf4`` on CUDA through bitsandbytes.
3. The OpenVINO UNet backend (CPU): see ``openvino_backend.py``.
4. ``torch.compile`` of the UNet (``settings.compile``): ``reduce-overhead`` (Inductor kernels plus CUDA graphs) on
   CUDA, see :data:`CUDA_COMPILE_MODE`; the default mode with weight freezing on CPU.
5. Fewer FLOPs per evaluation (issue 17): token merging (``--token-merging R``, ``tome.py``), applied to the torch
   UNet before any conversion; feature reuse (``--feature-reuse K``, ``feature_reuse.py``), around the UNet last:
   the OpenVINO UNet runs it over two IRs of its own, a torch UNet is wrapped.

dtype itself (bf16/fp16) is chosen by the device logic and applied at load time; SDPA is diffusers' default.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from lcm_live.config import EngineSettings
from lcm_live.engine import devices
from lcm_live.errors import UserError

# ``--backend auto`` leaves UNets smaller than this on torch: converting to OpenVINO costs seconds (and a disk
# cache entry) and pays on the real architectures (sd15: 860M parameters, a bf16 512x512 step 0.87 s in OpenVINO
# against 1.17 s in torch on a 2-core CPU), not on test models or the 1.5M-parameter builtin:shapes, where
# per-call overhead, not GEMM throughput, is the cost.
OPENVINO_AUTO_MIN_PARAMETERS = 100_000_000

# torch.compile's mode on CUDA under --compile-mode auto. "reduce-overhead": Inductor's fused kernels plus CUDA
# graphs, so a UNet call is one graph launch instead of about a thousand kernel launches (an sd15 step at 512x512
# went from 38 to 6 ms on an H200). Not "max-autotune" by default: on top of the same CUDA graphs it benchmarks
# Triton templates for every GEMM/conv shape, which takes many minutes for an SD UNet on the first call (and again
# for every new image size the studio sees), for a gain over cuBLAS/cuDNN not measured here; it is there for
# whoever can wait (--compile-mode max-autotune).
CUDA_COMPILE_MODE = "reduce-overhead"


@dataclass(frozen=True)
class BackendChoice:
    name: str  # "torch" or "openvino"
    reason: str


def openvino_installed() -> bool:
    """Whether the openvino package can be imported (found on the path; not imported here: that takes a second)."""
    return importlib.util.find_spec("openvino") is not None


def nncf_installed() -> bool:
    """Whether NNCF (``--quantize int8`` on OpenVINO) can be imported; found on the path, not imported."""
    return importlib.util.find_spec("nncf") is not None


def resolve_backend(settings: EngineSettings, device: Any, *, unet_parameters: int | None = None,
                    cpu: devices.CpuFeatures | None = None) -> BackendChoice:
    """The UNet backend to run, and why. ``auto``: OpenVINO when the device is the CPU, the CPU has fast bf16
    (AMX or avx512_bf16), the openvino extra is installed, torch.compile was not asked for and the UNet has at
    least :data:`OPENVINO_AUTO_MIN_PARAMETERS` parameters (unknown before loading: then it is not held against
    OpenVINO); else torch. An explicit ``torch`` / ``openvino`` is taken as asked (check_speedups refuses the
    impossible ones)."""
    import torch

    if settings.backend != "auto":
        return BackendChoice(settings.backend, f"--backend {settings.backend} was asked for")
    kind = torch.device(device).type
    if kind != "cpu":
        return BackendChoice("torch", f"auto: torch on {kind} (OpenVINO is the CPU backend)")
    if settings.compile:
        return BackendChoice("torch", "auto: torch, because --compile applies to the torch backend")
    cpu = cpu or devices.detect_cpu_features()
    if not cpu.fast_bf16:
        return BackendChoice("torch", "auto: torch (this CPU has neither amx_bf16 nor avx512_bf16, where "
                                      "OpenVINO's bf16 UNet is faster)")
    if unet_parameters is not None and unet_parameters < OPENVINO_AUTO_MIN_PARAMETERS:
        return BackendChoice("torch", f"auto: torch (a small UNet, {unet_parameters / 1e6:.1f}M parameters: "
                                      f"auto converts to OpenVINO from {OPENVINO_AUTO_MIN_PARAMETERS // 10**6}M)")
    if not openvino_installed():
        return BackendChoice("torch", "auto: torch (OpenVINO, faster on this CPU, is not installed: "
                                      "pip install 'lcm-live[openvino]')")
    return BackendChoice("openvino", f"auto: OpenVINO (a CPU with fast bf16: {', '.join(cpu.fast_bf16)}; "
                                     "the openvino extra is installed)")


def _unet_parameters(pipe: Any) -> int | None:
    import torch

    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        return None
    return sum(p.numel() for p in unet.parameters())


def check_speedups(settings: EngineSettings, device: Any, dtype: Any, *, backend: BackendChoice | None = None) -> None:
    """Refuse combinations that cannot work, with one line naming the flag and the fix. ``backend``: the resolved
    choice where the caller has it (apply_speedups), else it is resolved here without the model's size."""
    import torch

    device = torch.device(device)
    backend = backend or resolve_backend(settings, device)
    if backend.name == "openvino":
        if device.type != "cpu":
            raise UserError(f"--backend openvino runs on the CPU, not {device.type}: use --device cpu, "
                            "or --backend torch on a GPU", field="backend")
        if not openvino_installed():
            raise UserError("--backend openvino needs the openvino package: pip install 'lcm-live[openvino]'",
                            field="backend")
        if settings.compile:
            raise UserError("--compile applies to the torch backend; with --backend openvino leave it off "
                            "(OpenVINO compiles its own graph)", field="compile")
        if settings.quantize == "int8" and not nncf_installed():
            raise UserError("--quantize int8 with the OpenVINO backend needs NNCF (post-training quantization): "
                            "pip install 'lcm-live[openvino]', or leave --quantize off", field="quantize")
    if settings.quantize_vae == "int8":
        if backend.name != "openvino":
            raise UserError(f"--quantize-vae int8 runs the tiny autoencoder's int8 in OpenVINO, and the backend here "
                            f"is {backend.name} ({backend.reason}): add --backend openvino on a CPU, or leave "
                            "--quantize-vae off", field="quantize_vae")
        if settings.decoder == "vae":
            raise UserError("--quantize-vae int8 applies to the tiny autoencoder: use --decoder taesd (or auto), or "
                            "leave --quantize-vae off", field="quantize_vae")
        if not nncf_installed():
            raise UserError("--quantize-vae int8 needs NNCF (post-training quantization): pip install "
                            "'lcm-live[openvino]', or leave --quantize-vae off", field="quantize_vae")
    if settings.quantize == "nf4" and device.type != "cuda":
        raise UserError("--quantize nf4 needs a CUDA GPU (bitsandbytes); on a CPU use --quantize int8",
                        field="quantize")
    if (settings.quantize == "int8" and device.type == "cpu" and backend.name == "torch"
            and dtype != torch.float32):
        how = "--backend torch" if settings.backend == "torch" else f"the torch backend ({backend.reason})"
        raise UserError(f"--quantize int8 with {how} runs torch's dynamic int8 Linear, which needs float32 "
                        f"(got {str(dtype).removeprefix('torch.')}): add --dtype float32, or use "
                        "--backend openvino", field="quantize")
    if settings.compile_mode != "auto" and not settings.compile:
        raise UserError(f"--compile-mode {settings.compile_mode} applies with --compile: add --compile, or leave "
                        "--compile-mode off", field="compile_mode")
    if settings.compile and settings.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise UserError(f"--compile-mode reduce-overhead records CUDA graphs, which {device.type} has not: use "
                        "--compile-mode auto (default) or max-autotune", field="compile_mode")
    if settings.feature_reuse > 1:
        why = {"controlnet": settings.controlnet, "compile": settings.compile,
               "quantize": backend.name == "openvino" and settings.quantize == "int8"}
        for field, on in why.items():
            if on:
                raise UserError(f"--feature-reuse {settings.feature_reuse} does not combine with --{field} (its "
                                f"reused evaluations run graphs of their own): leave one of them off", field=field)
    if settings.quantize != "none" and device.type == "mps":
        raise UserError("--quantize is not supported on mps: use --quantize none", field="quantize")


def apply_speedups(pipe: Any, settings: EngineSettings, device: Any, dtype: Any) -> list[str]:
    """Apply what ``settings`` asks for (and channels_last where it helps) to ``pipe`` in place.

    Returns the names of what was applied, in order, for ``info`` and the bench report; with ``--backend auto``
    the first entry is the backend chosen and why (``backend:torch (auto: ...)``).
    """
    import torch

    device = torch.device(device)
    backend = resolve_backend(settings, device, unet_parameters=_unet_parameters(pipe))
    check_speedups(settings, device, dtype, backend=backend)
    applied: list[str] = []
    if settings.backend == "auto":
        applied.append(f"backend:{backend.name} ({backend.reason})")

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
        elif backend.name == "torch":
            count = quantize_linears_dynamic_int8(pipe.unet)
            applied.append(f"int8:torch-dynamic({count} linears)")
        # OpenVINO: NNCF quantizes the IR once calibrated (engine warm-up), see openvino_int8.py.

    # 3. Token merging, on the torch UNet (an OpenVINO conversion below traces it merged).
    if settings.token_merging > 0:
        from lcm_live.engine.tome import apply_token_merging

        apply_token_merging(pipe.unet, settings.token_merging)
        applied.append(f"token_merging:{settings.token_merging:g}")

    # 4. OpenVINO UNet.
    if backend.name == "openvino":
        from lcm_live.engine.openvino_backend import OpenVINOUNet

        precision = str(dtype).removeprefix("torch.")
        # A merged UNet is another graph: its IRs get a cache key of their own.
        model_name = settings.model + (f"+tome{settings.token_merging:g}" if settings.token_merging > 0 else "")
        pipe.unet = OpenVINOUNet(pipe.unet, model_name=model_name, precision=precision,
                                 cache_dir=settings.openvino_cache_dir, quantize=settings.quantize)
        applied.append(f"openvino:{precision}" + (":int8-ptq" if settings.quantize == "int8" else ""))
        from lcm_live.engine.openvino_module import wrap_tiny_autoencoder

        if wrap_tiny_autoencoder(pipe.vae, quantize=settings.quantize_vae):
            applied.append("openvino:taesd" + (":int8-ptq" if settings.quantize_vae == "int8" else ""))
        elif settings.quantize_vae == "int8":
            raise UserError("--quantize-vae int8 applies to the tiny autoencoder, and this model decodes with its "
                            "full VAE (--decoder auto found no tiny one that fits): leave --quantize-vae off",
                            field="quantize_vae")

    # 5. torch.compile.
    if settings.compile:
        mode = compile_mode(settings, device)
        if device.type == "cuda":
            # fullgraph: the UNet compiles as one graph (diffusers keeps it break-free); bitsandbytes layers may
            # break it, so a quantized UNet compiles in pieces.
            pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=settings.quantize == "none")
            applied.append(f"torch.compile({mode})")
        else:
            import torch._inductor.config as inductor_config

            # Freezing folds the (inference-only) weights into the graph so oneDNN can prepack them.
            inductor_config.freezing = True
            pipe.unet = torch.compile(pipe.unet, mode=mode)
            applied.append(f"torch.compile({mode}, freezing)")
        # Runs before the compiled code's guards: see contiguous_inputs.
        pipe.unet.register_forward_pre_hook(contiguous_inputs, with_kwargs=True)

    # 6. Feature reuse, around the UNet as it now runs.
    if settings.feature_reuse > 1:
        from lcm_live.engine.feature_reuse import FeatureReuse, FeatureReuseUNet

        reuse = FeatureReuse(settings.feature_reuse, across_steps=settings.feature_reuse_across_steps)
        if backend.name == "openvino":
            pipe.unet.feature_reuse = reuse
        else:
            pipe.unet = FeatureReuseUNet(pipe.unet, reuse)
        applied.append(f"feature_reuse:{settings.feature_reuse}"
                       + (":across-steps" if settings.feature_reuse_across_steps else ""))
    return applied


def compile_mode(settings: EngineSettings, device: Any) -> str:
    """torch.compile's mode for ``--compile-mode`` on ``device`` (a torch.device): auto is CUDA_COMPILE_MODE on
    CUDA, "default" elsewhere."""
    if settings.compile_mode != "auto":
        return settings.compile_mode
    return CUDA_COMPILE_MODE if device.type == "cuda" else "default"


def contiguous_inputs(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a compiled UNet: every tensor input in the default (NCHW) layout. A compiled graph is
    guarded on its inputs' strides, and img2img's latents come out of a channels_last encoder with other strides
    than txt2img's noise: without this the first sketch frame after a txt2img warm-up recompiles the UNet (about
    a minute on a GPU; measured as a recompile of the tiny model on the CPU, tests/engine/test_speedups.py)."""
    import torch

    def fix(value: Any) -> Any:
        return value.contiguous() if isinstance(value, torch.Tensor) else value

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


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
    """Replace every ``nn.Linear`` under ``module`` by bitsandbytes' int8 (LLM.int8, ``Linear8bitLt``) or 4-bit
    NF4 (``Linear4bit``) layer, as bitsandbytes documents: the layer gets the float16 weights on the CPU and
    ``.to(device)`` quantizes them (int8: per-row absmax; nf4: blocks of 64, double-quantized statistics).
    ``dtype`` is the compute dtype of the NF4 layers. Meant for CUDA (bitsandbytes' CPU kernels also run it).
    Returns how many layers were replaced."""
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise UserError(f"--quantize {mode} on CUDA needs bitsandbytes: pip install bitsandbytes",
                        field="quantize") from exc
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:  # bitsandbytes' layers subclass nn.Linear: never quantize twice
            has_bias = child.bias is not None
            # The quantizing .to() only acts on weights that are on the CPU.
            weight = child.weight.data.to("cpu", torch.float16)
            # device="meta": no throw-away random init of the new layer's own weight (seconds for an SDXL UNet).
            if mode == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=has_bias,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=has_bias,
                                        compute_dtype=dtype, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=new)
            if has_bias:
                new.bias = torch.nn.Parameter(child.bias.data.to(device, dtype), requires_grad=False)
            setattr(module, name, new.to(device))  # .to(device) performs the quantization
            count += 1
        else:
            count += quantize_linears_bitsandbytes(child, mode, device=device, dtype=dtype)
    return count
