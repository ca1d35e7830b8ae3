"""Style LoRA sliders on the OpenVINO UNet: each style's low-rank branch kept unfused in an IR of its own, its
scale a runtime input (``lora_scales``), so that moving a slider changes an input: no conversion, no compile.

Why: the OpenVINO IR has the weights baked in, so a scale re-fused into torch weights (``loras.StyleScales``) would
mean a new IR and a new compile per slider move. OpenVINO GenAI's answer for LoRA is the same idea: the adapter
stays a separate low-rank branch and its alpha is an input of the compiled model.

How (``OpenVINOStyles.set``, the first time a scale moves from its default):

1. each style's safetensors is read and loaded into the torch UNet (the one ``OpenVINOUNet`` converts from) and
   into the text encoders as peft adapters ``style{i}``, through diffusers' ``load_lora_weights`` (formats,
   misfits and half-loaded failures as ``loras.py`` handles them);
2. the UNet's adapter layers are copied out (down ``A``, up ``B``, peft's ``scaling``) and the peft wrappers are
   removed again: the torch UNet is what it was, and a forward hook on each touched layer adds
   ``sum_i lora_scales[i] * scaling_i * B_i(A_i(x))``, only while the ``lora_scales`` graph is traced;
3. frames whose scales differ from the defaults run that graph (converted once per shape, cached on disk like the
   UNet's own IR) with ``lora_scales = wanted - default``: the model loaded with each style fused at its default
   (``apply_loras``), so the branch adds the difference. At the defaults frames run the fused IR, as before;
4. the text encoders (torch on every backend) keep their adapters unfused, weighted ``wanted - default``.

Cost: the unfused branches are extra matrix products per step, and a shape whose scales moved holds a second
compiled UNet (docs/benchmarks.md). With ``--quantize int8`` the branch graph runs unquantized (bf16 or the dtype's).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch

from lcm_live.engine.loras import load_adapter, read_lora, scales_move
from lcm_live.engine.openvino_backend import _TraceableUNet
from lcm_live.errors import UserError

logger = logging.getLogger(__name__)

SCALES_INPUT = "lora_scales"  # the IR input: (number of styles,) float32, each style's wanted - default


class LoraBranches:
    """The unfused low-rank branches of the styles, by UNet layer: ``(A, B, scaling, style index)``.

    Forward hooks on the torch UNet read ``scales`` (a (styles,) tensor): None outside tracing, so the hooks add
    nothing to the fused graph's conversions or anything else the torch UNet runs."""

    def __init__(self):
        self.scales: torch.Tensor | None = None
        self.layers: dict[str, list[tuple[torch.nn.Module, torch.nn.Module, float, int]]] = {}
        self.modules = torch.nn.ModuleList()  # holds the A and B copies (out of the UNet's state_dict)

    def add(self, name: str, down: torch.nn.Module, up: torch.nn.Module, scaling: float, index: int) -> None:
        down, up = (_copy_float32(m) for m in (down, up))
        self.modules.extend([down, up])
        self.layers.setdefault(name, []).append((down, up, float(scaling), index))

    def hook(self, name: str):
        branches = self.layers[name]

        def add_branches(_module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.scales is None:
                return None
            x = args[0]
            for down, up, scaling, index in branches:
                output = output + up(down(x)) * (self.scales[index] * scaling)
            return output

        return add_branches


def _copy_float32(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to(torch.float32).requires_grad_(False)


class _TraceableScaledUNet(_TraceableUNet):
    """The UNet graph with the styles' branches on, their scales the ``lora_scales`` input."""

    def __init__(self, unet: Any, branches: LoraBranches):
        super().__init__(unet)
        self.branches = [branches]  # a list: not a submodule (its copies stay out of the traced parameters)

    def forward(self, sample, timestep, encoder_hidden_states, lora_scales, *conditioning, **named):
        self.branches[0].scales = lora_scales
        try:  # the rest in _TraceableUNet.forward's order (the signature below tells the tracer)
            return super().forward(sample, timestep, encoder_hidden_states, *conditioning, **named)
        finally:
            self.branches[0].scales = None


def _signature_with_scales():
    """The UNet graph's named inputs and ``lora_scales`` (the tracer maps inputs by the names it reads here)."""
    import inspect

    params = list(inspect.signature(_TraceableUNet.forward).parameters.values())
    scales = inspect.Parameter(SCALES_INPUT, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([*params[:4], scales, *params[4:]])


_TraceableScaledUNet.forward.__signature__ = _signature_with_scales()


class OpenVINOStyles:
    """Style LoRA scales that change after load, on a pipeline whose UNet is ``OpenVINOUNet`` (the same
    interface as ``loras.StyleScales``). ``scales``: the scales frames run with now."""

    def __init__(self, pipe: Any, styles: list[tuple[str, str, float]], *, cache_dir: str | None, model_name: str):
        self.pipe = pipe
        self.unet = pipe.unet  # the OpenVINOUNet
        self.styles = styles  # (name, source, default scale), in load order
        self.cache_dir = cache_dir
        self.model_name = model_name
        self.scales = {name: scale for name, _, scale in styles}
        self.deltas = [0.0] * len(styles)
        self.graph: str | None = None  # the branch graph's name in the UNet's graphs, once loaded
        self._text_adapters: list[str] = []

    def set(self, wanted: dict[str, float]) -> bool:
        """Frames run with ``wanted`` ({style: scale}, every style named) from now; False when they already did."""
        if not scales_move(wanted, self.scales, self.model_name):
            return False
        if self.graph is None:
            self._load()
        self.deltas = [float(wanted[name]) - default for name, _, default in self.styles]
        if self._text_adapters:
            from diffusers.utils.peft_utils import set_weights_and_activate_adapters

            for encoder in _text_encoders(self.pipe):
                set_weights_and_activate_adapters(encoder, self._text_adapters, self.deltas)
        self.scales = {name: float(wanted[name]) for name, _, _ in self.styles}
        return True

    def route(self, inputs: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
        """(graph, inputs) a UNet call runs: the fused IR at the default scales, the branch graph otherwise."""
        if self.graph in (None, "unet") or not any(self.deltas):  # "unet": the styles touch only text encoders
            return "unet", inputs
        return self.graph, {**inputs, SCALES_INPUT: torch.tensor(self.deltas, dtype=torch.float32)}

    def _load(self) -> None:
        names = [f"style{i}" for i in range(len(self.styles))]
        states = [read_lora(source, flag=f"style {style}", cache_dir=self.cache_dir) for style, source, _ in self.styles]
        torch_unet = self.unet.torch_module()
        loaded: list[str] = []
        self.pipe.unet = torch_unet  # 1. diffusers loads into the torch UNet and the text encoders
        try:
            for name, state, (style, source, _) in zip(names, states, self.styles, strict=True):
                load_adapter(self.pipe, state, name, source=source, flag=f"style {style}", model_name=self.model_name)
                loaded.append(name)
            branches = _copy_branches(torch_unet, names)  # 2.
        except Exception:
            if loaded:  # nothing half-loaded: the text encoders' adapters go again
                self.pipe.delete_adapters(loaded)
            raise
        finally:
            if getattr(torch_unet, "peft_config", None):
                torch_unet.unload_lora()  # the peft wrappers out: the UNet's layers and state_dict as they were
            self.pipe.unet = self.unet
        for name in branches.layers:
            torch_unet.get_submodule(name).register_forward_hook(branches.hook(name))
        self._text_adapters = [n for n in names if any(n in a for a in _text_adapter_lists(self.pipe))]
        if self._text_adapters:
            from diffusers.utils.peft_utils import set_weights_and_activate_adapters

            for encoder in _text_encoders(self.pipe):  # at the defaults until set() gives the deltas
                set_weights_and_activate_adapters(encoder, self._text_adapters, [0.0] * len(self._text_adapters))
        self.graph = f"lora-{_digest(names, states)}" if branches.layers else "unet"  # 3. cached under its own key
        if branches.layers:
            self.unet.graphs[self.graph] = lambda unet: _TraceableScaledUNet(unet, branches)
            logger.info("style sliders: %d UNet layers carry %s as branches; each image size converts (or reads "
                        "from the IR cache) and compiles their graph at its first moved frame", len(branches.layers),
                        ", ".join(style for style, _, _ in self.styles))
        self.unet.styles = self


def _copy_branches(unet: Any, names: list[str]) -> LoraBranches:
    """The peft adapters ``names`` in ``unet``, copied out as low-rank branches (DoRA is refused: its magnitude
    vector rescales the whole weight, not a branch)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    branches = LoraBranches()
    for layer_name, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        for index, name in enumerate(names):
            if name not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(name):
                raise UserError(f"style {name}: a DoRA LoRA cannot move its scale on the OpenVINO backend; serve "
                                "with --backend torch", field="lora_scales")
            branches.add(layer_name, module.lora_A[name], module.lora_B[name], module.scaling[name], index)
    return branches


def _text_encoders(pipe: Any) -> list[Any]:
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if isinstance(e, torch.nn.Module)]


def _text_adapter_lists(pipe: Any) -> list[list[str]]:
    return [list(getattr(encoder, "peft_config", {}) or {}) for encoder in _text_encoders(pipe)]


def _digest(names: list[str], states: list[dict[str, Any]]) -> str:
    """A key for the styles' LoRA tensors (all of them: style LoRAs are megabytes), for the branch graph's IRs."""
    h = hashlib.sha256()
    for name, state in zip(names, states, strict=True):
        h.update(name.encode())
        for key in sorted(state):
            h.update(f"{key}:{tuple(state[key].shape)}".encode())
            h.update(state[key].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]
