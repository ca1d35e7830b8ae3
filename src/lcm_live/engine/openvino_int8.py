"""int8 for the OpenVINO UNet (``--backend openvino --quantize int8``): post-training quantization of weights
*and* activations through NNCF, calibrated on the UNet inputs of the engine's own generations.

Why: weights-only int8 saves disk but computes in bf16 (no faster: the CPU plugin unpacks them at compile time).
Quantizing the activations too runs the convolutions and matmuls on int8 kernels (VNNI, AMX-INT8 where present):
one sd15 step at 256x256 measured 0.46 s in bf16 against 0.31 s int8 on a 2-core avx512_vnni CPU, and the step's
output matched the bf16 step's at cosine 0.998. Parity of whole images is measured by ``lcm-live bench``.

How: the backend runs the bf16 IR for a shape while it records the inputs of its first ``CALIBRATION_CALLS``
calls (real prompts, timesteps and latents: the engine's warm-up makes them, see ``Engine.calibrate``); then NNCF
collects activation ranges over those inputs, inserts the int8 quantizers, and the quantized IR is cached on disk
beside the bf16 one (keyed the same way), so later runs read it directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lcm_live.errors import UserError

CALIBRATION_CALLS = 16  # UNet calls recorded per shape (e.g. 4 generations of 4 steps)
# NNCF's peak memory per byte of the IR's weights file: it compiles the model in float32 to collect activation
# ranges. Measured 12.65 GB for sd15's 1.72 GB float16 .bin (2026-11-26, a process of its own), so 7.5x.
NNCF_MEMORY_PER_WEIGHT_BYTE = 7.5
INT8_TAG = "int8-ptq"  # the cache key's quantize part (the weights-only int8 IRs of earlier versions differ)

# Prompts for the warm-up generations that calibrate: varied subjects and styles, so the text conditioning spans
# more than one prompt's range.
CALIBRATION_PROMPTS = (
    "a photo of a red fox in a snowy forest, golden hour",
    "an oil painting of a lighthouse on a cliff, stormy sea",
    "a portrait of an old man with a beard, studio lighting",
    "a futuristic city street at night, neon signs, rain",
    "a bowl of fruit on a wooden table, still life",
    "a watercolor of mountains above a lake, morning mist",
)


class Calibration:
    """The inputs recorded for one shape, and the bf16 IR they will quantize."""

    def __init__(self, base_ir: Path, calls: int = CALIBRATION_CALLS):
        if calls < 1:
            raise UserError(f"int8 calibration needs at least 1 UNet call, not {calls}", field="quantize")
        self.base_ir = base_ir
        self.calls = calls
        self.samples: list[dict[str, np.ndarray]] = []

    def add(self, feed: dict[str, np.ndarray]) -> bool:
        """Record one call's inputs (copied); True once there are enough."""
        self.samples.append({k: np.array(v, copy=True) for k, v in feed.items()})
        return len(self.samples) >= self.calls


def check_memory_for_quantization(base_ir: Path) -> None:
    """Refuse, with the figures, when NNCF's peak would not fit in the memory available now: the OOM killer
    would take the whole studio, where a refusal leaves this shape on its bf16 IR and everything else running."""
    import psutil

    weights = Path(base_ir).with_suffix(".bin")
    need = NNCF_MEMORY_PER_WEIGHT_BYTE * weights.stat().st_size if weights.exists() else 0
    available = psutil.virtual_memory().available
    if need > available:
        raise UserError(f"--quantize int8: NNCF needs about {need / 2**30:.1f} GB of free memory to quantize this "
                        f"UNet once (its int8 copy is then cached), and {available / 2**30:.1f} GB is available; "
                        "the UNet keeps running in bf16. Close other programs and restart, or leave --quantize off",
                        field="quantize")


def quantize_ir(core: Any, base_ir: Path, samples: list[dict[str, np.ndarray]], out_ir: Path) -> None:
    """NNCF post-training quantization of the IR at ``base_ir`` over ``samples``; saved to ``out_ir``."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )
    except ImportError as exc:
        raise UserError("--quantize int8 with --backend openvino needs NNCF: pip install 'lcm-live[openvino]'",
                        field="quantize") from exc
    from lcm_live.engine.openvino_module import save_ir

    check_memory_for_quantization(base_ir)
    model = core.read_model(base_ir)
    quantized = nncf.quantize(
        model, nncf.Dataset(samples), subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER,
        # SmoothQuant off: the parity figures in docs/benchmarks.md were measured without it.
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)),
    )
    del model
    save_ir(quantized, out_ir, compress_to_fp16=True)  # int8 weights stay int8; scales and biases in f16


def quantize_small_model(model: Any, samples: list[dict]) -> Any:
    """NNCF post-training quantization (weights and activations) of a small in-memory model, such as a tiny
    autoencoder half (``--quantize-vae int8``), over ``samples`` (its recorded inputs); returns the int8 model.
    NNCF's defaults for a convolutional network (no transformer preset: TAESD is convolutions only)."""
    try:
        import nncf
    except ImportError as exc:
        raise UserError("--quantize-vae int8 needs NNCF: pip install 'lcm-live[openvino]'",
                        field="quantize_vae") from exc
    if not samples:
        raise UserError("int8 calibration of the tiny autoencoder needs at least one recorded input",
                        field="quantize_vae")
    return nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
