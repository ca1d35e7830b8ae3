"""OpenVINO for a small single-tensor module: TAESD's encoder and decoder (``--backend openvino``).

Why: in live sketch mode at 256x256 a frame is one UNet call plus a TAESD encode and decode, and with the UNet
in OpenVINO the two TAESD halves in torch were a third of the frame (77 + 91 ms of 465 ms, bf16, 2-core CPU).
Measured standalone on that CPU: decode 111 -> 84 ms and encode 95 -> 69 ms at 256x256 in OpenVINO bf16, outputs
equal to torch float32 at cosine 1.0000.

How: the wrapped module stays registered (its few MB of weights keep the parent's ``dtype``/``device`` and the
conversion's source); each new input shape is converted in memory (about a second for TAESD, so no disk cache)
and compiled once. One lock per module: the engine's previews may decode from another thread.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch

_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class OpenVINOModule(torch.nn.Module):
    """``forward(x) -> tensor`` of ``module``, run by OpenVINO compiled for each input shape it meets."""

    def __init__(self, module: torch.nn.Module, *, device: str = "CPU"):
        import openvino as ov

        super().__init__()
        self.module = module
        self.ov_device = device
        self._core = ov.Core()
        self._compiled: dict[tuple, Any] = {}  # input shape -> infer request
        self._lock = threading.Lock()
        self.conversions = 0

    def _compile(self, x: torch.Tensor):
        import openvino as ov

        dtype = next(self.module.parameters()).dtype
        # Converted from a float32 copy (OpenVINO lowers precision itself through the hint, as for the UNet).
        source = copy.deepcopy(self.module).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        with torch.no_grad():
            model = ov.convert_model(source.eval(), example_input=x.detach().to(torch.float32).contiguous())
        model.reshape({0: ov.PartialShape(list(x.shape))})  # static: one compiled model per shape
        ppp = ov.preprocess.PrePostProcessor(model)
        ppp.input(0).tensor().set_element_type(ov.Type.f32)
        ppp.output(0).tensor().set_element_type(ov.Type.f32)
        config = {"INFERENCE_PRECISION_HINT": _PRECISION.get(dtype, "f32"), "PERFORMANCE_HINT": "LATENCY"}
        compiled = self._core.compile_model(ppp.build(), self.ov_device, config)
        self.conversions += 1
        return compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        with self._lock:
            request = self._compiled.get(key)
            if request is None:
                request = self._compiled[key] = self._compile(x)
            request.infer({0: x.detach().to(torch.float32).contiguous().numpy()})
            out = torch.from_numpy(request.get_output_tensor(0).data.copy())
        return out.to(x.dtype)


def wrap_tiny_autoencoder(vae: Any, *, device: str = "CPU") -> bool:
    """Run an ``AutoencoderTiny``'s encoder and decoder through OpenVINO, in place; False if ``vae`` is not one."""
    if type(vae).__name__ != "AutoencoderTiny" or isinstance(vae.decoder, OpenVINOModule):
        return False
    vae.encoder = OpenVINOModule(vae.encoder, device=device)
    vae.decoder = OpenVINOModule(vae.decoder, device=device)
    return True
