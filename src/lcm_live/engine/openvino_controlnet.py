"""A ControlNet run by OpenVINO beside the OpenVINO UNet (``--backend openvino`` or auto on a CPU, ``--controlnet``).

Why: in the studio's lines mode at 256x256 a frame on the 2-core dev CPU was UNet 554 ms (OpenVINO) + ControlNet
543 ms (torch bf16) + TAESD 92 ms: the ControlNet in torch was half of the frame (docs/benchmarks.md).

How: diffusers' ControlNet pipelines check ``isinstance(pipe.controlnet, ControlNetModel)``, so the module stays the
real ``ControlNetModel`` and only its instance's ``forward`` is replaced. The new forward runs an IR converted once
per input shape (from a float32 copy, as the UNet's), cached on disk next to the UNet's and keyed by the
ControlNet's weights, shapes and precision. The IR is traced at ``conditioning_scale`` 1 and its residuals scaled
after, as diffusers does; what the IR does not cover (guess mode, pooled conditions, class labels, masks) goes to
the torch forward.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from lcm_live.engine.interrupt import infer_interruptible
from lcm_live.engine.memory import paging_out, release_freed_memory
from lcm_live.engine.openvino_backend import default_cache_dir, weights_fingerprint
from lcm_live.engine.openvino_module import (
    batch_timesteps,
    cache_name,
    compile_request,
    save_ir,
    save_weights_once,
)


class _TraceableControlNet(torch.nn.Module):
    """Keyword view of a ControlNet for tracing: its residuals as a flat tuple (down blocks, then the middle)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds=None, time_ids=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}  # SDXL
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                                    added_cond_kwargs=added, return_dict=False)
        return (*down, mid)


class OpenVINOControlNet:
    """The OpenVINO forward installed on a ControlNetModel instance (see :func:`run_in_openvino`)."""

    def __init__(self, controlnet: Any, *, model_name: str, precision: str, cache_dir: str | Path | None = None,
                 device: str = "CPU"):
        import openvino as ov

        self.controlnet = controlnet
        self.torch_forward = controlnet.forward  # the class's, bound: the fallback and the conversion's source
        self.model_name = model_name
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.ov_device = device
        self.fingerprint = weights_fingerprint(controlnet)
        self._core = ov.Core()
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.conversions = 0  # IRs converted from torch by this instance (0 when all came from the cache)
        self.torch_calls = 0  # calls the IR does not cover, run by the torch forward
        self._offloaded = False

    def cache_path(self, shapes: dict[str, tuple]) -> Path:
        key = json.dumps([self.model_name, self.fingerprint, shapes, self.precision])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        sample = "x".join(map(str, shapes["sample"]))
        return self._folder() / f"sample{sample}-{self.precision}-{digest}" / "controlnet.xml"

    def _folder(self) -> Path:
        """This ControlNet's and weights' folder in the IR cache (beside the UNet's)."""
        return self.cache_dir / f"{cache_name(self.model_name)}-controlnet-{self.fingerprint}"

    def _ir(self, inputs: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> Path:
        import openvino as ov

        path = self.cache_path(shapes)
        if path.exists():
            return path
        self._torch_module()
        installed = self.controlnet.__dict__.pop("forward", None)  # the copy traces the class's forward, not this
        try:
            source = copy.deepcopy(self.controlnet)
        finally:
            if installed is not None:
                self.controlnet.__dict__["forward"] = installed
        source = source.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        example = {k: v.to(torch.float32) for k, v in inputs.items()}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = ov.convert_model(_TraceableControlNet(source.eval()), example_input=example)
        del source
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        save_ir(model, path, compress_to_fp16=self.precision != "float32")
        self.conversions += 1
        del model
        release_freed_memory()
        return path

    def _request(self, inputs: dict[str, torch.Tensor]) -> Any:
        key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        with self._lock:
            request = self._compiled.get(key)
            if request is None:
                path = self._ir(inputs, dict(key))
                self._offload()  # before compiling: the torch weights and the compile's peak never overlap
                with paging_out(path.with_suffix(".bin")):  # the compiled model keeps its own copy (as the UNet's)
                    request = self._compiled[key] = compile_request(self._core, self._core.read_model(path),
                                                                    self.ov_device, self.precision)
        return request

    # The torch weights are needed only for a new shape's conversion and for what the IR does not cover: between
    # those they wait in a safetensors file next to the IRs (0.7 GB for an sd15 ControlNet in bf16). Each
    # parameter keeps its dtype on the CPU with no elements, not the meta device: diffusers pipelines take their
    # execution device from their first component by name, which is the ControlNet.
    def _weights_path(self) -> Path:
        return self._folder() / f"torch-controlnet-{self.precision}.safetensors"

    def _offload(self) -> None:
        if self._offloaded:
            return
        save_weights_once(self.controlnet, self._weights_path())
        for param in self.controlnet.parameters():
            param.data = torch.empty(0, dtype=param.dtype)
        self._offloaded = True
        release_freed_memory()

    def _torch_module(self) -> Any:
        if self._offloaded:
            from safetensors.torch import load_file

            state = load_file(str(self._weights_path()))
            for name, param in self.controlnet.named_parameters():
                param.data = state[name]
            self._offloaded = False
        return self.controlnet

    def __call__(self, sample, timestep, encoder_hidden_states=None, controlnet_cond=None, conditioning_scale=1.0,
                 class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                 cross_attention_kwargs=None, guess_mode=False, return_dict=True):
        if (guess_mode or class_labels is not None or timestep_cond is not None or attention_mask is not None
                or cross_attention_kwargs or self.controlnet.config.global_pool_conditions):
            self.torch_calls += 1
            self._torch_module()
            return self.torch_forward(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                      controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                                      class_labels=class_labels, timestep_cond=timestep_cond,
                                      attention_mask=attention_mask, added_cond_kwargs=added_cond_kwargs,
                                      cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode,
                                      return_dict=return_dict)
        inputs = {"sample": sample, "timestep": batch_timesteps(timestep, sample.shape[0]),
                  "encoder_hidden_states": encoder_hidden_states, "controlnet_cond": controlnet_cond}
        if added_cond_kwargs:
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"]
            inputs["time_ids"] = added_cond_kwargs["time_ids"]
        request = self._request(inputs)
        infer_interruptible(request, {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in inputs.items()})
        outs = [torch.from_numpy(request.get_output_tensor(i).data.copy()).to(sample.dtype) * conditioning_scale
                for i in range(len(request.model_outputs))]
        down, mid = tuple(outs[:-1]), outs[-1]
        if not return_dict:
            return down, mid
        from diffusers.models.controlnets.controlnet import ControlNetOutput

        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


def run_in_openvino(controlnet: Any, unet: Any) -> OpenVINOControlNet:
    """Run ``controlnet`` by OpenVINO in the precision, and with the cache, of the OpenVINO ``unet`` beside it
    (once: a ControlNet already run so keeps its runner)."""
    if isinstance(controlnet.__dict__.get("forward"), OpenVINOControlNet):
        return controlnet.__dict__["forward"]
    runner = OpenVINOControlNet(controlnet, model_name=unet.model_name, precision=unet.precision,
                                cache_dir=unet.cache_dir, device=unet.ov_device)
    controlnet.forward = runner  # an instance attribute: nn.Module.__call__ runs it; isinstance checks still hold
    return runner
