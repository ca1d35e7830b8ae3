"""The OpenVINO UNet backend: the torch UNet converted once per (model, weights, shape, precision), cached on
disk as OpenVINO IR, and run through a module that stands in for ``pipe.unet``.

Why: on CPUs OpenVINO's static-shape graph (fused kernels, bf16 on AVX512-BF16/AMX) runs a UNet step faster
than eager torch (measured 4.3 against 11.9 s per sd15 step at 512x512 on a 2-core AVX512-BF16 CPU, see
docs/benchmarks.md). Only imported when that backend is asked for (it imports torch and openvino). Shapes are
static: each new (batch, latent height, latent width, text length) is converted (or read from the cache) and
compiled once, then reused.

The stand-in keeps what the diffusers pipelines read from a UNet: ``.config``, ``.dtype``, ``.device``,
``.add_embedding`` (SDXL's time-ids check), ``.encoder_hid_proj``, and ``forward(sample, timestep,
encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None, down_block_additional_residuals=None,
mid_block_additional_residual=None, return_dict=True)``: a ControlNet's residuals are inputs of an IR of their own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

from lcm_live.engine.interrupt import infer_interruptible
from lcm_live.engine.memory import paging_out, release_freed_memory
from lcm_live.engine.openvino_int8 import CALIBRATION_CALLS
from lcm_live.engine.openvino_module import (
    PRECISION_HINT,
    batch_timesteps,
    cache_name,
    compile_request,
    save_ir,
    save_weights_once,
)
from lcm_live.errors import UserError

logger = logging.getLogger(__name__)



def weights_fingerprint(module: Any, *, samples_per_tensor: int = 512) -> str:
    """A stable hash of a module's weights that reads a strided sample of each tensor (not all 3.4 GB):
    names, shapes, dtypes and up to ``samples_per_tensor`` values per tensor. Different random seeds or
    fine-tunes differ in every tensor, so a sample tells them apart at a fraction of a full hash's cost."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(torch.float32).cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lcm-live" / "openvino"


# A ControlNet's residuals become inputs of their own: one per down-block output (SD1.5 12, SDXL 9) and the middle's.
MAX_DOWN_RESIDUALS = 12
DOWN_RESIDUAL = "down_residual_{}"
MID_RESIDUAL = "mid_residual"


class _TraceableUNet(torch.nn.Module):
    """Keyword view of a diffusers UNet for tracing: returns the sample tensor, not a dataclass. A ControlNet's
    residuals come as named tensors (the tracer maps inputs by name; an absent one is None)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, text_embeds=None, time_ids=None,
                mid_residual=None, down_residual_0=None, down_residual_1=None, down_residual_2=None,
                down_residual_3=None, down_residual_4=None, down_residual_5=None, down_residual_6=None,
                down_residual_7=None, down_residual_8=None, down_residual_9=None, down_residual_10=None,
                down_residual_11=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}  # SDXL
        down = [r for r in (down_residual_0, down_residual_1, down_residual_2, down_residual_3, down_residual_4,
                            down_residual_5, down_residual_6, down_residual_7, down_residual_8, down_residual_9,
                            down_residual_10, down_residual_11) if r is not None]
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=added, down_block_additional_residuals=down or None,
                         mid_block_additional_residual=mid_residual, return_dict=False)[0]


class _TraceableUNetWithFeature(torch.nn.Module):
    """Feature reuse's full evaluation (engine/feature_reuse.py): the UNet's output and its deep feature."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, text_embeds=None, time_ids=None):
        from lcm_live.engine.feature_reuse import capturing_deep_feature

        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        with capturing_deep_feature(self.unet) as store:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                            timestep_cond=timestep_cond, added_cond_kwargs=added, return_dict=False)[0]
        return out, store["feature"]


class _TraceableShallow(torch.nn.Module):
    """Feature reuse's reused evaluation: the shallow blocks around a cached deep feature."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature, timestep_cond=None, text_embeds=None,
                time_ids=None):
        from lcm_live.engine.feature_reuse import shallow_forward

        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return shallow_forward(self.unet, sample, timestep, encoder_hidden_states, deep_feature, timestep_cond,
                               added)


# The graphs an OpenVINOUNet converts: the UNet itself, and feature reuse's two (each its own IR per shape).
GRAPHS = {"unet": _TraceableUNet, "unet+feature": _TraceableUNetWithFeature, "shallow": _TraceableShallow}


class OpenVINOUNet(torch.nn.Module):
    """A stand-in for ``pipe.unet`` that runs OpenVINO IR compiled for each input shape it meets."""

    def __init__(self, unet, *, model_name: str, precision: str, cache_dir: str | Path | None = None,
                 quantize: str = "none", device: str = "CPU", offload_torch_unet: bool = True,
                 calibration_calls: int = CALIBRATION_CALLS):
        import openvino as ov

        super().__init__()
        if precision not in PRECISION_HINT:
            raise UserError(f"--dtype {precision}: the OpenVINO backend runs float32, bfloat16 or float16",
                            field="dtype")
        self.config = unet.config
        self._torch_dtype = unet.dtype
        self._torch_unet = [unet]  # a list: kept out of this module's parameters and state_dict
        # SDXL's pipeline reads add_embedding.linear_1.in_features; a small module, kept as is.
        self.add_embedding = getattr(unet, "add_embedding", None)
        self.encoder_hid_proj = getattr(unet, "encoder_hid_proj", None)
        self.model_name = model_name
        self.precision = precision
        self.quantize = quantize
        self.ov_device = device
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.fingerprint = weights_fingerprint(unet)
        self._core = ov.Core()
        self._compiled: dict[tuple, Any] = {}  # ((input name, shape), ...) -> OpenVINO infer request
        self.offload_torch_unet = offload_torch_unet
        self._offloaded = False
        self.calibration_calls = calibration_calls
        self._calibration: dict[tuple, Any] = {}  # shape key -> openvino_int8.Calibration, while recording
        self._quantizing: dict[tuple, threading.Thread] = {}  # shape key -> its quantization thread
        self.quantized_shapes = 0  # int8 IRs this instance quantized (0 when all came from the cache)
        self.quantize_errors: list[str] = []
        self.conversions = 0  # how many IRs this instance converted from torch (0 when all came from the cache)
        self.feature_reuse = None  # engine/feature_reuse.py's FeatureReuse, set by apply_speedups (--feature-reuse)
        self.graphs = dict(GRAPHS)  # graph name -> wrapper to trace; openvino_lora.py adds its style branches' graph
        self.styles = None  # engine/openvino_lora.py's OpenVINOStyles, once a style scale moved (it routes calls)

    # What pipelines read from a UNet.
    @property
    def dtype(self):
        return self._torch_dtype

    @property
    def device(self):
        return torch.device("cpu")

    def to(self, *args, **kwargs):  # the IR lives in OpenVINO; pipe.to("cpu") must not fail
        return self

    # 1. Inputs, keyed by shape.
    def _inputs(self, sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs,
                down_residuals=None, mid_residual=None):
        inputs = {"sample": sample, "timestep": batch_timesteps(timestep, sample.shape[0]),
                  "encoder_hidden_states": encoder_hidden_states}
        if timestep_cond is not None:
            inputs["timestep_cond"] = timestep_cond
        if added_cond_kwargs:
            inputs["text_embeds"] = added_cond_kwargs["text_embeds"]
            inputs["time_ids"] = added_cond_kwargs["time_ids"]
        if down_residuals is not None:  # a ControlNet's: an IR of their own (the shape key names them)
            if len(down_residuals) > MAX_DOWN_RESIDUALS:
                raise UserError(f"the OpenVINO UNet takes at most {MAX_DOWN_RESIDUALS} ControlNet residuals (this "
                                f"ControlNet gives {len(down_residuals)}): use --backend torch", field="backend")
            if mid_residual is not None:
                inputs[MID_RESIDUAL] = mid_residual
            inputs.update((DOWN_RESIDUAL.format(i), r) for i, r in enumerate(down_residuals))
        return inputs

    def cache_path(self, shapes: dict[str, tuple], quantize: str = "none", graph: str = "unet") -> Path:
        # The folder names the main inputs' shapes (the digest covers them all): 13 residuals would make it too long
        shown = {k: v for k, v in shapes.items() if not k.startswith(("down_residual", MID_RESIDUAL))}
        shape_text = "_".join(f"{k}{'x'.join(map(str, v))}" for k, v in shown.items())
        if len(shown) < len(shapes):
            shape_text += f"_controlnet{len(shapes) - len(shown)}"
        key = [self.model_name, self.fingerprint, shapes, self.precision, quantize]
        if graph != "unet":  # feature reuse's graphs (the UNet's own keys stay as they were)
            key.append(graph)
            shape_text = f"{graph.replace('+', '-')}_{shape_text}"
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
        return self._folder() / f"{shape_text}-{self.precision}-{quantize}-{digest}" / "unet.xml"

    def _folder(self) -> Path:
        """This model's and weights' folder in the IR cache."""
        return self.cache_dir / f"{cache_name(self.model_name)}-{self.fingerprint}"

    # 2. Convert (or read from the cache), then compile for this shape.
    def _ir(self, inputs: dict, shapes: dict[str, tuple], graph: str = "unet") -> Path:
        """The cached IR (inference precision, no quantization) for these shapes, converted from torch first when
        the cache has none."""
        import openvino as ov

        path = self.cache_path(shapes, graph=graph)
        if path.exists():
            return path
        unet = self.torch_module()
        # Traced in float32 whatever the torch dtype: OpenVINO lowers precision itself (the inference hint
        # below), and an IR traced from bfloat16 weights gave NaNs under the bf16 hint here. A half-precision
        # UNet is copied to float32 for the conversion only (a one-off: the IR is cached).
        source = unet if self._torch_dtype == torch.float32 else copy.deepcopy(unet).to(torch.float32)
        example = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape asserts frozen: shapes are static
            model = ov.convert_model(self.graphs[graph](source), example_input=example)
        del source
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})  # static shapes
        # Half-precision weights on disk when inference runs in bf16/f16: half the file to read and map.
        save_ir(model, path, compress_to_fp16=self.precision != "float32")
        self.conversions += 1
        del model
        release_freed_memory()
        return path

    def _request(self, inputs: dict, graph: str = "unet") -> tuple[tuple, Any]:
        """(shape key, infer request) for these inputs, compiled at their first call."""
        key = tuple((k, tuple(v.shape)) for k, v in inputs.items())
        if graph != "unet":  # feature reuse's graphs: bf16 (or the dtype's) IR, never int8 (refused at load)
            request = self._compiled.get((graph, key))
            if request is None:
                request = self._compiled[(graph, key)] = self._compile_ir(self._ir(inputs, dict(key), graph))
            return key, request
        request = self._compiled.get(key)
        if request is None:
            request = self._compiled[key] = self._compile(inputs, key)
        return key, request

    def _compile(self, inputs: dict, key: tuple):
        """An infer request for these shapes: the int8 IR when asked for and cached; else the bf16 (or f32/f16)
        IR, recording calibration inputs when int8 is asked for (see engine/openvino_int8.py)."""
        shapes = dict(key)
        if self.quantize == "int8":
            from lcm_live.engine.openvino_int8 import INT8_TAG, Calibration

            quantized = self.cache_path(shapes, INT8_TAG)
            if quantized.exists():
                return self._compile_ir(quantized)
            base = self._ir(inputs, shapes)
            self._calibration[key] = Calibration(base, self.calibration_calls)
            return self._compile_ir(base)
        return self._compile_ir(self._ir(inputs, shapes))

    def _compile_ir(self, path: Path, *, offload: bool = True):
        if offload and self.offload_torch_unet:  # before compiling: the torch weights and the compile's peak never overlap
            self._offload_torch_unet()
        # The compiled model holds its own packed copy of the weights: the IR's mapped pages, read once while
        # compiling, are handed back as it goes (engine/memory.py) and are not read again.
        with paging_out(path.with_suffix(".bin")):
            return compile_request(self._core, self._core.read_model(path), self.ov_device, self.precision)

    @property
    def recording(self) -> bool:
        """True while some shape runs its bf16 IR and records inputs for int8 calibration."""
        return bool(self._calibration)

    @property
    def calibrating(self) -> bool:
        """True until every shape met with ``--quantize int8`` runs int8 (recording, or quantizing)."""
        return bool(self._calibration) or bool(self._quantizing)

    def wait_quantized(self, timeout: float | None = None) -> None:
        """Wait for the quantizations in progress (``Engine.calibrate`` does, at warm-up)."""
        for thread in list(self._quantizing.values()):
            thread.join(timeout)

    def _start_quantizing(self, key: tuple) -> None:
        """Quantize in a thread: frames keep running on the bf16 IR meanwhile (a shape met after warm-up does
        not stall its session for the minute or two that NNCF takes at 512x512), then the int8 one takes over."""
        calibration = self._calibration.pop(key)
        thread = threading.Thread(target=self._quantize, args=(key, calibration), name="int8-quantize", daemon=True)
        self._quantizing[key] = thread
        thread.start()

    def _quantize(self, key: tuple, calibration: Any) -> None:
        from lcm_live.engine.openvino_int8 import INT8_TAG, quantize_ir

        try:
            out = self.cache_path(dict(key), INT8_TAG)
            logger.info("int8: quantizing the UNet for %s over %d recorded calls", dict(key),
                        len(calibration.samples))
            quantize_ir(self._core, calibration.base_ir, calibration.samples, out)
            del calibration
            release_freed_memory()
            self._compiled[key] = self._compile_ir(out, offload=False)  # the next call runs int8
            self.quantized_shapes += 1
        except Exception as exc:  # a failed quantization fails only itself: the shape stays on its bf16 IR
            if isinstance(exc, UserError):  # refused with its reason (not enough memory, no NNCF): one line
                logger.warning("int8: not quantizing the UNet for %s: %s", dict(key), exc.message)
            else:
                logger.exception("int8: quantizing the UNet for %s failed; it keeps running unquantized", dict(key))
            self.quantize_errors.append(f"{dict(key)}: {exc}")
        finally:
            self._quantizing.pop(key, None)
            release_freed_memory()

    # The torch UNet is needed only to convert a shape not seen before: between conversions its weights wait in
    # a safetensors file next to the IRs instead of in memory (1.7 GB for sd15 in bf16).
    def _torch_weights_path(self) -> Path:
        return self._folder() / f"torch-unet-{self.precision}.safetensors"

    def _offload_torch_unet(self) -> None:
        unet = self._torch_unet[0]
        if unet is None or self._offloaded:
            return
        save_weights_once(unet, self._torch_weights_path())
        unet.to("meta")  # frees the weights, keeps the module (and its config) for a later reload
        self._offloaded = True
        release_freed_memory()

    def torch_module(self):
        """The torch UNet the IRs are converted from, its weights read back in if they were offloaded."""
        unet = self._torch_unet[0]
        if unet is None:
            raise UserError("OpenVINO: this size has no converted UNet yet and the torch UNet was released; "
                            "keep the size fixed or rebuild the engine", field="width")
        if self._offloaded:
            from safetensors.torch import load_file

            unet.to_empty(device="cpu")
            unet.load_state_dict(load_file(str(self._torch_weights_path())))
            self._offloaded = False
        return unet

    def infer(self, inputs: dict, graph: str = "unet") -> list[torch.Tensor]:
        """The outputs (float32) of ``graph`` on these inputs; the UNet's own records int8 calibration inputs."""
        key, request = self._request(inputs, graph)
        feed = {k: v.detach().to(torch.float32).contiguous().numpy() if v.is_floating_point() else v.numpy()
                for k, v in inputs.items()}
        infer_interruptible(request, feed)  # a superseded generation stops mid-step (engine/interrupt.py)
        outs = [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(request.model_outputs))]
        calibration = self._calibration.get(key) if graph == "unet" else None
        if calibration is not None and calibration.add(feed):
            self._start_quantizing(key)
        return outs

    def warm(self, sample, timestep, encoder_hidden_states, timestep_cond=None, added_cond_kwargs=None):
        """Convert/compile for these shapes now (e.g. at engine warm-up), without running."""
        self._request(self._inputs(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs))

    # 3. Run.
    def forward(self, sample, timestep, encoder_hidden_states=None, timestep_cond=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, down_block_additional_residuals=None,
                mid_block_additional_residual=None, return_dict: bool = True, **unused):
        if cross_attention_kwargs and cross_attention_kwargs.get("scale", 1.0) != 1.0:
            raise UserError("the OpenVINO backend runs fused weights: a LoRA scale at call time is not supported; "
                            "fuse the LoRA or use --backend torch", field="backend")
        inputs = self._inputs(sample, timestep, encoder_hidden_states, timestep_cond, added_cond_kwargs,
                              down_block_additional_residuals, mid_block_additional_residual)
        if self.feature_reuse is not None and down_block_additional_residuals is None:
            from lcm_live.engine.feature_reuse import conditioning_of

            def full() -> tuple[torch.Tensor, torch.Tensor]:
                out, feature = self.infer(inputs, "unet+feature")
                # The reused evaluations' IR now, not at the next call: a full evaluation is what the engine's
                # warm-up runs, so a live session's second frame does not wait for a conversion.
                self._request({**inputs, "deep_feature": feature}, "shallow")
                return out.to(sample.dtype), feature

            def shallow(feature: torch.Tensor) -> torch.Tensor:
                return self.infer({**inputs, "deep_feature": feature}, "shallow")[0].to(sample.dtype)

            out = self.feature_reuse(sample, timestep, conditioning_of(sample, encoder_hidden_states, timestep_cond,
                                                                       added_cond_kwargs), full, shallow)
        else:
            graph, inputs = self.styles.route(inputs) if self.styles is not None else ("unet", inputs)
            out = self.infer(inputs, graph)[0].to(sample.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
