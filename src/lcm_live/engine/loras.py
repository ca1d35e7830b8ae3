"""LCM-LoRA and style LoRAs: loaded through diffusers/peft as named adapters, weighted, fused, unloaded.

Fusing folds B @ A * scale into the base weights, so a fused LoRA costs nothing per step. LoRA weights are
read only from safetensors (``safetensors.torch.load_file``): a local file, a folder holding one, or a hub repo's
``pytorch_lora_weights.safetensors`` fetched into the Hugging Face cache.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import (
    BUILTIN_PREFIX,
    PICKLE_SUFFIXES,
    builtin_lora,
    looks_like_path,
    quiet_logs,
    unavailable,
)
from lcm_live.errors import UserError, first_line

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights names it
LCM_LORA_IDS = {"sd15": "latent-consistency/lcm-lora-sdv1-5", "sdxl": "latent-consistency/lcm-lora-sdxl"}
# The shipped LCM-LoRA ``auto`` picks for a model of the built-in family, told apart by its cross-attention
# width (builtin:shapes-teacher and its fine-tunes: 64; the hub's LCM-LoRAs fit only 768 and 2048).
BUILTIN_LCM_LORAS = {64: "builtin:shapes-lcm-lora"}


def _field(flag: str) -> str:
    """The settings field behind a flag (EngineSettings.lcm_lora / .loras), for UserError.field."""
    return "lcm_lora" if flag == "--lcm-lora" else "loras"


def lcm_lora_source(setting: str, arch: str, context_width: int | None = None) -> str | None:
    """``--lcm-lora auto|none|PATH_OR_ID|builtin:NAME`` -> the LoRA to load, or None for "none"."""
    if setting == "none":
        return None
    if setting == "auto":
        return BUILTIN_LCM_LORAS.get(context_width) or LCM_LORA_IDS[arch]
    return setting


def read_lora(source: str, *, flag: str, cache_dir: str | None) -> dict[str, Any]:
    """A LoRA's state dict, read from a local .safetensors file or folder, a shipped ``builtin:NAME``, or a hub
    repo's safetensors file."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    if source.startswith(BUILTIN_PREFIX):
        path = builtin_lora(source[len(BUILTIN_PREFIX):], flag=flag, field=_field(flag))
    elif not path.exists() and not looks_like_path(source):
        path = _download_lora(source, flag=flag, cache_dir=cache_dir)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            what = f"only pickle weights ({pickles[0]})" if pickles else "no .safetensors file"
            raise UserError(f"{flag} {source}: the folder holds {what}; LoRAs load only from .safetensors",
                            field=_field(flag))
        if len(files) > 1:
            raise UserError(f"{flag} {source}: {len(files)} .safetensors files in the folder; name the file",
                            field=_field(flag))
        path = files[0]
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{flag} {source}: LoRAs load only from .safetensors files (pickle formats such as "
                            f"{path.suffix or 'this'} can run code when loaded)", field=_field(flag))
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"{flag} {source}: not a readable safetensors file ({exc})",
                            field=_field(flag)) from None
    raise UserError(f"{flag} {source}: no such file or folder", field=_field(flag))


def _download_lora(repo_id: str, *, flag: str, cache_dir: str | None) -> Path:
    """The repo's diffusers-named LoRA file (``pytorch_lora_weights.safetensors``), else its only .safetensors."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        with quiet_logs():
            try:
                return Path(hf_hub_download(repo_id, LORA_FILE, cache_dir=cache_dir))
            except RemoteEntryNotFoundError:  # the repo is there but names its file otherwise
                files = [f for f in list_repo_files(repo_id) if f.endswith(".safetensors")]
                if len(files) != 1:
                    raise UserError(f"{flag} {repo_id}: the repo has {len(files)} .safetensors files and no "
                                    f"{LORA_FILE}; download the one you want and pass its path",
                                    field=_field(flag)) from None
                return Path(hf_hub_download(repo_id, files[0], cache_dir=cache_dir))
    except UserError:
        raise
    except Exception as exc:  # offline, unreachable, not cached, no such repo
        ways_out = f"{flag} PATH (a .safetensors LoRA file)" + (
            ", --lcm-lora none (a model that needs none)" if flag == "--lcm-lora" else "")
        raise unavailable(repo_id, cache_dir, exc, flag=flag, ways_out=ways_out, field=_field(flag)) from None


@dataclass
class LoraWeights:
    source: str  # as the user gave it (path or hub id)
    scale: float
    flag: str  # "--lcm-lora" or "--lora", for error messages
    state: dict[str, Any]  # the LoRA's tensors, read from safetensors


def read_loras(loras: list[tuple[str, float, str]], *, cache_dir: str | None) -> list[LoraWeights]:
    """Check scales and read every (source, scale, flag) LoRA: done before the model loads, so that a missing
    file, a pickle or an unreachable hub LoRA fails in a second rather than after a long model load."""
    for source, scale, flag in loras:
        if not math.isfinite(scale):
            raise UserError(f"{flag} {source}: scale {scale} is not a finite number; give e.g. {source}:0.8",
                            field=_field(flag))
    return [LoraWeights(source, scale, flag, read_lora(source, flag=flag, cache_dir=cache_dir))
            for source, scale, flag in loras]


def apply_loras(pipe: Any, loras: list[LoraWeights], *, model_name: str) -> None:
    """Load each LoRA as an adapter, weight them, fuse them and drop the adapters.

    1. load every LoRA under its own adapter name (a misfit raises one short UserError naming LoRA and model);
    2. ``set_adapters(names, scales)`` stacks them;
    3. ``fuse_lora`` folds them into the weights; ``unload_lora_weights`` removes the now-empty adapter layers.
    """
    if not loras:
        return
    names = [f"lora{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras, strict=True):
        load_adapter(pipe, lora.state, name, source=lora.source, flag=lora.flag, model_name=model_name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def load_adapter(pipe: Any, weights: dict[str, Any], name: str, *, source: str, flag: str, model_name: str) -> None:
    """Load one LoRA into ``pipe`` as peft adapter ``name``; a file mixing formats, or one that does not fit the
    model, is one short UserError naming LoRA and model."""
    _check_one_format(weights, source=source, flag=flag)
    before = _adapter_count(pipe)
    try:
        with quiet_logs():  # diffusers logs the whole size-mismatch wall before it raises
            pipe.load_lora_weights(weights, adapter_name=name)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise misfit(source, model_name, exc, flag) from None
    if _adapter_count(pipe) == before:  # diffusers only warns when no key matched any module
        raise UserError(f"{flag} {source} does not fit the model {model_name}: none of its keys match the "
                        "model's layers (a LoRA for another architecture?)", field=_field(flag))


# The down (A) matrix of a LoRA layer under each naming format diffusers reads: peft's, diffusers' older one, kohya's.
_DOWN_SUFFIXES = {"peft (lora_A)": ".lora_A.weight", "diffusers (lora.down)": ".lora.down.weight",
                  "kohya (lora_down)": ".lora_down.weight"}


def _check_one_format(weights: dict[str, Any], *, source: str, flag: str) -> None:
    """diffusers reads a LoRA file in the one format its keys suggest and drops the layers named in another with
    a warning only (a file mixing peft's names for its convolutions with diffusers' older ones for its attention
    lost its attention layers that way). Layers a model lacks (BK-SDM under SD1.5's LCM-LoRA) are not this."""
    counts = {name: sum(key.endswith(suffix) for key in weights) for name, suffix in _DOWN_SUFFIXES.items()}
    found = {name: n for name, n in counts.items() if n}
    if len(found) > 1:
        mix = ", ".join(f"{n} layers named as {name}" for name, n in found.items())
        raise UserError(f"{flag} {source} mixes LoRA naming formats ({mix}): diffusers would load one and drop "
                        "the others' layers; re-save it in one format, e.g. with diffusers' save_lora_weights",
                        field=_field(flag))


def _adapter_count(pipe: Any) -> int:
    return sum(len(v) for v in pipe.get_list_adapters().values())


def misfit(source: str, model_name: str, exc: BaseException, flag: str) -> UserError:
    """One line for what peft reports as a wall of ``size mismatch for ...`` lines."""
    text = str(exc)
    mismatches = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\))"
                            r".*?current model is (torch\.Size\(\[[\d, ]*\]\))", text)
    if mismatches:
        key, got, want = mismatches[0]
        key = re.sub(r"\.lora\d+\.", ".", key)  # our adapter name is noise to the user
        detail = (f"{len(mismatches)} weight shape(s) differ, e.g. {key}: LoRA {got[11:-1]} vs model {want[11:-1]}"
                  " (a LoRA for another architecture, e.g. SDXL vs SD1.5?)")
    else:
        detail = first_line(exc, 160)
    return UserError(f"{flag} {source} does not fit the model {model_name}: {detail}", field=_field(flag))


def scales_move(wanted: dict[str, float], scales: dict[str, float], model_name: str) -> bool:
    """Whether ``wanted`` differs from the ``scales`` in use; a UserError naming a style the model lacks."""
    if wanted == scales:
        return False
    unknown = sorted(set(wanted) - set(scales))
    if unknown:
        raise UserError(f"lora_scales: {unknown[0]!r} is not a style of {model_name}", field="lora_scales")
    return True


class StyleScales:
    """Style LoRA scales that change after load (the studio's sliders), on a pipeline whose UNet is torch.

    The model loaded with each style fused at its default scale (``apply_loras``: any backend, nothing per step).
    A change loads the styles once more as adapters and fuses only the difference from the default, so that::

        weights = base + default * delta + (wanted - default) * delta = base + wanted * delta

    1. the first change reads each style's safetensors and loads it as adapter ``style{i}``; in 16-bit weights it
       also keeps a copy of every weight the styles touch, as loaded;
    2. every change takes out the adjustment fused before: in float32 peft unfuses it (subtracts it again: rounding
       of ~1e-7 over hundreds of changes), in 16-bit weights the copy is put back (subtracting there would leave a
       16-bit rounding step per change: 2e-2 of the layer's largest weight after 200 changes, docs/benchmarks.md);
    3. ``set_adapters`` gives each adapter its ``wanted - default`` weight, and ``fuse_lora`` folds that in: frames
       after it cost what they did.

    ``scales``: the scales now in the weights.
    """

    def __init__(self, pipe: Any, styles: list[tuple[str, str, float]], *, cache_dir: str | None, model_name: str):
        self.pipe = pipe
        self.styles = styles  # (name, source, default scale), in load order
        self.cache_dir = cache_dir
        self.model_name = model_name
        self.scales = {name: scale for name, _, scale in styles}
        self._adapters: list[str] | None = None  # loaded on the first change
        self._saved: list[tuple[Any, Any]] | None = None  # 16-bit weights: (peft layer, its weight as loaded)
        self._fused = False

    def set(self, wanted: dict[str, float]) -> bool:
        """Make the weights carry ``wanted`` ({style: scale}, every style named); False when they already did."""
        if not scales_move(wanted, self.scales, self.model_name):
            return False
        if self._adapters is None:
            self._load_adapters()
        assert self._adapters is not None
        if self._fused and self._saved is not None:  # 2. the weights as loaded, exactly
            for layer, weight in self._saved:
                layer.get_base_layer().weight.data.copy_(weight)
                layer.merged_adapters.clear()
            self._fused = False
        elif self._fused:
            self.pipe.unfuse_lora()
            self._fused = False
        deltas = [float(wanted[name]) - default for name, _, default in self.styles]
        self.pipe.set_adapters(self._adapters, adapter_weights=deltas)
        self.pipe.fuse_lora(adapter_names=self._adapters, lora_scale=1.0)
        self._fused = True
        self.scales = {name: float(wanted[name]) for name, _, _ in self.styles}
        return True

    def _load_adapters(self) -> None:
        names = [f"style{i}" for i in range(len(self.styles))]
        loaded: list[str] = []
        try:
            for name, (style, source, _) in zip(names, self.styles, strict=True):
                state = read_lora(source, flag=f"style {style}", cache_dir=self.cache_dir)
                load_adapter(self.pipe, state, name, source=source, flag=f"style {style}", model_name=self.model_name)
                loaded.append(name)
        except Exception:
            if loaded:  # nothing half-loaded: the adapters that did load go again
                self.pipe.delete_adapters(loaded)
            raise
        self._adapters = names
        self._saved = self._snapshot(names)

    def _snapshot(self, names: list[str]) -> list[tuple[Any, Any]] | None:
        """In 16-bit weights, a copy of each weight the adapters ``names`` touch (None in float32)."""
        import torch
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [module for part in ("unet", "text_encoder", "text_encoder_2")
                  if isinstance(getattr(self.pipe, part, None), torch.nn.Module)
                  for module in getattr(self.pipe, part).modules()
                  if isinstance(module, BaseTunerLayer) and any(n in getattr(module, "lora_A", {}) for n in names)]
        if not layers or layers[0].get_base_layer().weight.dtype in (torch.float32, torch.float64):
            return None
        return [(layer, layer.get_base_layer().weight.detach().clone()) for layer in layers]
