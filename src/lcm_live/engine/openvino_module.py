"""OpenVINO for a small single-tensor module: TAESD's encoder and decoder (``--backend openvino``); and the
compile and save steps that it shares with the UNet backend (``openvino_backend.py``, ``openvino_int8.py``).

Why: in live sketch mode at 256x256 a frame is one UNet call plus a TAESD encode and decode, and with the UNet
in OpenVINO the two TAESD halves in torch were a third of the frame (77 + 91 ms of 465 ms, bf16, 2-core CPU).
Measured standalone on that CPU: decode 111 -> 84 ms and encode 95 -> 69 ms at 256x256 in OpenVINO bf16, outputs
equal to torch float32 at cosine 1.0000.

How: the wrapped module stays registered (its few MB of weights keep the parent's ``dtype``/``device`` and the
conversion's source); each new input shape is converted in memory (about a second for TAESD, so no disk cache)
and compiled once. One lock per module: the engine's previews may decode from another thread.

``--quantize-vae int8`` (issue 17): the two halves in int8 as well, through NNCF post-training quantization of
weights and activations (``VAE_CALIBRATION_CALLS`` real inputs per shape recorded while running bf16, then
quantized in memory on a thread of its own, seconds for TAESD). Measured on the 2-core EPYC (avx512 VNNI, no
AMX), random TAESD weights: decode 82 -> 46 ms at 256x256 and 340 -> 175 ms at 512x512, encode 73 -> 41 ms at
256x256, outputs at cosine 0.99999 to bf16. Not cached on disk: the in-memory quantization is seconds, and the
engine's warm-up does it (``Engine.calibrate``).
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

VAE_CALIBRATION_CALLS = 4  # inputs recorded per shape before the tiny autoencoder's halves are quantized

# torch dtype name -> OpenVINO INFERENCE_PRECISION_HINT
PRECISION_HINT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def compile_request(core: Any, model: Any, device: str, precision: str) -> Any:
    """Compile ``model`` with float32 tensors in and out whatever its own types (numpy has no bfloat16) and
    ``precision`` (a torch dtype name) as the inference precision; returns an infer request."""
    import openvino as ov

    ppp = ov.preprocess.PrePostProcessor(model)
    for i in range(len(model.inputs)):
        if model.inputs[i].get_element_type().is_real():
            ppp.input(i).tensor().set_element_type(ov.Type.f32)
    for i in range(len(model.outputs)):
        ppp.output(i).tensor().set_element_type(ov.Type.f32)
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINT.get(precision, "f32"), "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(ppp.build(), device, config).create_infer_request()


def save_ir(model: Any, path: Path, *, compress_to_fp16: bool) -> None:
    """Save an IR so that a reader never sees half of it: the weights first, then the xml that names them."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path, ".tmp.xml")  # OpenVINO writes its weights beside it as .tmp.bin
    try:
        ov.save_model(model, tmp, compress_to_fp16=compress_to_fp16)
        tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)


def private_tmp(path: Path, suffix: str) -> Path:
    """A temporary name beside ``path`` that no other writer uses: the studio's pool workers (and parallel tests)
    share one IR cache, and two processes converting the same shape must not write into one temporary file."""
    return path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def batch_timesteps(timestep: Any, batch: int) -> torch.Tensor:
    """A step's timestep (a number, 0-d or (B,) tensor) as the (B,) float32 input the traced IRs take."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
    return t.reshape(-1).to(torch.float32).expand(batch).contiguous()


def cache_name(model_name: str) -> str:
    """``model_name`` as a folder name in the IR cache (its last 48 characters, anything odd made "-")."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in model_name)[-48:]


def save_weights_once(module: torch.nn.Module, path: Path) -> None:
    """``module``'s weights as a safetensors file at ``path``, unless one is there (written whole, then renamed:
    a reader never sees half of it)."""
    if path.exists():
        return
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path, ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class OpenVINOModule(torch.nn.Module):
    """``forward(x) -> tensor`` of ``module``, run by OpenVINO compiled for each input shape it meets; with
    ``quantize="int8"`` each shape's first ``calibration_calls`` inputs are recorded (the bf16 model answers them)
    and the shape then moves to an int8 model that NNCF made from them on a background thread."""

    def __init__(self, module: torch.nn.Module, *, device: str = "CPU", quantize: str = "none",
                 calibration_calls: int = VAE_CALIBRATION_CALLS):
        import openvino as ov

        super().__init__()
        if quantize not in ("none", "int8"):
            raise ValueError(f"quantize: 'none' or 'int8', not {quantize!r}")
        self.module = module
        self.ov_device = device
        self.quantize = quantize
        self.calibration_calls = calibration_calls
        self._core = ov.Core()
        self._compiled: dict[tuple, Any] = {}  # input shape -> infer request
        self._models: dict[tuple, Any] = {}  # input shape -> converted float model (int8: until quantized)
        self._samples: dict[tuple, list] = {}  # input shape -> recorded inputs (int8: until quantized)
        self._threads: dict[tuple, threading.Thread] = {}
        self._lock = threading.Lock()
        self.conversions = 0
        self.quantized: set[tuple] = set()  # shapes that run int8
        self.quantize_errors: list[str] = []

    @property
    def precision(self) -> str:
        return str(next(self.module.parameters()).dtype).removeprefix("torch.")

    def _convert(self, x: torch.Tensor):
        import openvino as ov

        # Converted from a float32 copy (OpenVINO lowers precision itself through the hint, as for the UNet).
        source = copy.deepcopy(self.module).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        with torch.no_grad():
            model = ov.convert_model(source.eval(), example_input=x.detach().to(torch.float32).contiguous())
        model.reshape({0: ov.PartialShape(list(x.shape))})  # static: one compiled model per shape
        self.conversions += 1
        return model

    @property
    def recording(self) -> bool:
        """True while int8 waits for inputs: no shape met yet, or one whose quantization has not started."""
        return self.quantize == "int8" and (not self._compiled or any(k not in self._threads for k in self._compiled))

    def wait_quantized(self, timeout: float | None = None) -> None:
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def _record(self, key: tuple, feed: Any) -> None:
        samples = self._samples.setdefault(key, [])
        samples.append({0: feed.copy()})
        if len(samples) >= self.calibration_calls:
            thread = threading.Thread(target=self._quantize, args=(key,), name="int8-vae-quantize", daemon=True)
            self._threads[key] = thread
            thread.start()

    def _quantize(self, key: tuple) -> None:
        from lcm_live.engine.openvino_int8 import quantize_small_model

        try:
            quantized = quantize_small_model(self._models[key], self._samples[key])
            request = compile_request(self._core, quantized, self.ov_device, self.precision)
        except Exception as exc:  # the shape keeps its bf16 model: slower, never broken
            logger.exception("int8: quantizing the tiny autoencoder for shape %s failed; it keeps running in %s",
                             key, self.precision)
            self.quantize_errors.append(f"{key}: {exc}")
            return
        with self._lock:
            self._compiled[key] = request
            self.quantized.add(key)
            self._models.pop(key, None)
            self._samples.pop(key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        feed = x.detach().to(torch.float32).contiguous().numpy()
        with self._lock:
            request = self._compiled.get(key)
            if request is None:
                model = self._convert(x)
                if self.quantize == "int8":
                    self._models[key] = model
                request = self._compiled[key] = compile_request(self._core, model, self.ov_device, self.precision)
            if self.quantize == "int8" and key not in self.quantized and key not in self._threads:
                self._record(key, feed)
            request.infer({0: feed})
            out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        return out.to(x.dtype)


def wrap_tiny_autoencoder(vae: Any, *, device: str = "CPU", quantize: str = "none") -> bool:
    """Run an ``AutoencoderTiny``'s encoder and decoder through OpenVINO (``quantize="int8"``: int8 once
    calibrated), in place; False if ``vae`` is not one."""
    if type(vae).__name__ != "AutoencoderTiny" or isinstance(vae.decoder, OpenVINOModule):
        return False
    vae.encoder = OpenVINOModule(vae.encoder, device=device, quantize=quantize)
    vae.decoder = OpenVINOModule(vae.decoder, device=device, quantize=quantize)
    return True


def vae_modules(vae: Any) -> list[OpenVINOModule]:
    """The OpenVINO-run halves of ``vae`` (none for a torch VAE)."""
    return [m for m in (getattr(vae, "encoder", None), getattr(vae, "decoder", None)) if isinstance(m, OpenVINOModule)]
