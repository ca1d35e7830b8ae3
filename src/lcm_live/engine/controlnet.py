"""ControlNet: an image (lines, edges, a scribble) guides the layout of a generation.

``--controlnet SOURCE`` loads a diffusers ``ControlNetModel`` from a hub id (into the Hugging Face cache), a local
folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a single ``.safetensors`` file in the original
layout (``control_model.*``, e.g. the ControlNet 1.1 releases converted to safetensors), safetensors only. A single
file has no config: it is the one ``ControlNetModel.from_unet`` derives from the model's UNet (the released
ControlNets are made that way), read through diffusers' ``from_single_file``. It must fit the model: its
cross-attention width and down blocks are those of the UNet it feeds residuals into (an SD1.5 ControlNet for SD1.5
models, an SDXL one for SDXL), which is checked before it loads.

Several (``--controlnet A --controlnet B``) load side by side into diffusers' ``MultiControlNetModel``; each takes
its own control image, scale and ``control_guidance_start/end`` and their residuals are summed.

It runs inside the engine's own loop (engine/denoiser.py) as diffusers' ControlNet pipelines run it: on the UNet's
rows, its residuals added to the UNet's, scaled by ``controlnet_conditioning_scale``; so it composes with an init
image, a mask and region prompts too. The images equal diffusers' ``StableDiffusionControlNetPipeline`` and
``StableDiffusionXLControlNetPipeline`` (tests/engine/test_controlnet.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import PICKLE_SUFFIXES, hub_progress, looks_like_path, quiet_logs, unavailable
from lcm_live.errors import UserError, first_line

WEIGHTS = "diffusion_pytorch_model.safetensors"
# What must match between a ControlNet and the UNet it feeds: one residual per down-block layer, of these widths.
FIT_KEYS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "in_channels")


def controlnet_sources(value: str | list[str] | None) -> list[str]:
    """``EngineSettings.controlnet`` (one source, several, or None) as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def controlnet_nets(controlnet: Any) -> list[Any]:
    """The ControlNetModels of ``LoadedModel.controlnet`` (one, a MultiControlNetModel's, or none)."""
    if controlnet is None:
        return []
    return list(controlnet.nets) if hasattr(controlnet, "nets") else [controlnet]


def combine(nets: list[Any]) -> Any:
    """One ControlNetModel as it is; several as diffusers' MultiControlNetModel (what its pipelines take)."""
    if len(nets) == 1:
        return nets[0]
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    return MultiControlNetModel(nets)


def _error(source: str, text: str) -> UserError:
    return UserError(f"--controlnet {source}: {text}", field="controlnet")


def _made_for(cross_attention_dim: Any) -> str:
    """The architecture a ControlNet of this cross-attention width is for (SD1.5's CLIP-L 768, SDXL's 2048)."""
    return {768: "sd15", 2048: "sdxl"}.get(cross_attention_dim, "another model")


def controlnet_location(source: str, *, cache_dir: str | None, progress: bool) -> Path:
    """Where ``source``'s weights are: a single .safetensors file, a folder as given, or a hub repo's config and
    safetensors weights fetched into (or found in) the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise _error(source, f"{path.suffix or 'this file'} is not a safetensors file (pickle formats such as "
                                 ".pth or .ckpt can run code when loaded); use the model's .safetensors release")
        return path
    if not path.exists():
        if looks_like_path(source):
            raise _error(source, "no such folder; give a diffusers ControlNet folder or a hub id (org/name)")
        path = _download(source, cache_dir=cache_dir, progress=progress)
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise _error(source, "no readable config.json: not a diffusers ControlNet folder") from None
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        what = config.get("_class_name") if isinstance(config, dict) else None
        raise _error(source, f"config.json describes a {what or 'different model'}, not a ControlNetModel")
    if not (path / WEIGHTS).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        what = f"only pickle weights ({pickles[0]})" if pickles else f"no {WEIGHTS}"
        raise _error(source, f"the folder holds {what}; lcm-live loads only safetensors")
    return path


def _download(repo_id: str, *, cache_dir: str | None, progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        with hub_progress(progress), quiet_logs():
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=["config.json", WEIGHTS]))
    except Exception as exc:  # offline, unreachable, not cached, no such repo
        raise unavailable(repo_id, cache_dir, exc, flag="--controlnet", field="controlnet",
                          ways_out="--controlnet PATH (a diffusers ControlNet folder or a .safetensors file)") from None


def check_fit(source: str, config: dict[str, Any], unet_config: Any, arch: str) -> None:
    """Refuse a ControlNet whose residuals would not fit the UNet (before loading its weights)."""
    for key in FIT_KEYS:
        have, want = config.get(key), getattr(unet_config, key, None)
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if key == "layers_per_block" and isinstance(want, int) and have is None:
            continue
        if have != want:
            raise _error(source, f"made for {_made_for(config.get('cross_attention_dim'))} ({key} {have}), but the model is {arch} ({key} {want}); use "
                                 f"a ControlNet trained for {arch}")


def load_controlnet(source: str, location: Path, *, unet: Any, arch: str, dtype: Any, device: Any) -> Any:
    """The ControlNetModel at ``location`` (from :func:`controlnet_location`), checked against ``unet``, on
    ``device`` in ``dtype``."""
    import torch
    from diffusers import ControlNetModel

    try:
        if location.is_file():
            controlnet = _load_single_file(source, location, unet=unet, arch=arch, dtype=dtype)
        else:
            check_fit(source, json.loads((location / "config.json").read_text()), unet.config, arch)
            with quiet_logs():
                controlnet = ControlNetModel.from_pretrained(str(location), torch_dtype=dtype, use_safetensors=True)
    except UserError:
        raise
    except Exception as exc:
        raise _error(source, f"could not be loaded ({first_line(exc)}); is it a ControlNet "
                             f"for {arch}?") from None
    controlnet.to(device)
    if torch.device(device).type in ("cpu", "cuda"):
        controlnet.to(memory_format=torch.channels_last)
    return controlnet.eval()


def _load_single_file(source: str, path: Path, *, unet: Any, arch: str, dtype: Any) -> Any:
    """An original-layout file, with the config ``from_unet`` derives from ``unet`` (written to a temporary folder:
    ``from_single_file`` reads configs from folders). Its cross-attention width is read from the header first."""
    import tempfile

    import accelerate
    from diffusers import ControlNetModel
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if not any(k.startswith("control_model.") or k.startswith("time_embed.") for k in keys):
            raise _error(source, "not a ControlNet in the original layout (no control_model.* weights); give a "
                                 "diffusers ControlNet folder or a hub id")
        width = next((f.get_slice(k).get_shape()[1] for k in keys if k.endswith("attn2.to_k.weight")), None)
    want = unet.config.cross_attention_dim
    if width is not None and width != want:
        raise _error(source, f"made for {_made_for(width)} (cross_attention_dim {width}), but the model is {arch} "
                             f"(cross_attention_dim {want}); use a ControlNet trained for {arch}")
    with accelerate.init_empty_weights():  # the config only: no weights are made
        shaped = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    with tempfile.TemporaryDirectory(prefix="lcm-live-controlnet-") as folder, quiet_logs():
        shaped.save_config(folder)
        return ControlNetModel.from_single_file(str(path), config=folder, torch_dtype=dtype)
